"""Choosing the next token from shared logits: greedy, temperature and top-k sampling.

Only the 0/1 marks of the chosen token are revealed, to the client; the server learns nothing but the
number of steps and whether top-k is on (not k, not the temperature, not the noise).

* **Greedy**: the argmax by the narrow max tree and one sign test (``argmax_onehot``).
* **Temperature t**: the Gumbel-max trick, argmax(l / t + g) = argmax(l + t g), with g ~ Gumbel(0, 1)
  per vocabulary entry drawn by the client from the CSPRNG and t g added to its own share (local).
* **Top-k**: before the argmax, every entry more than the k-th largest logit below the maximum is
  pushed down by ``TOPK_BIG`` (k is the client's: it enters as a value the client adds to its share).
  The k-th largest is found by bisection on shares: u = max(l) - l >= 0, and the smallest theta on the
  grid ``TOPK_RES`` x {0 .. 2^TOPK_STEPS - 1} with #{u <= theta} >= k, one bit of theta per step (a
  comparison of every u against theta + 2^j RES, a sum, one comparison of the count with k).  What
  is kept is {u <= theta}: the k largest and any within ``TOPK_RES`` of the k-th (ties, as
  transformers' ``TopKLogitsWarper`` keeps them), at most everything within ``TOPK_RES`` x
  (2^TOPK_STEPS - 1) = 32 of the maximum (an entry further down has a probability below e^-32/t of
  the top one's; it is dropped even when fewer than k are kept).

A server that reveals only labels (``cometpi serve --reveal label|topk``) uses ``top_marks``: k rounds
of the same secure argmax, each after pushing the entries already found down by ``TOPK_BIG``; the
client sees only the 0/1 marks (``marks_to_indices``), never the logits.
"""

from __future__ import annotations

import hashlib

import torch

from .protocols import compare_rounds
from .protocols.compare import max_rounds
from .ring import SEED_BYTES, AesCtrPrg, logical_rshift, uniform01

#: Width of the argmax's comparisons at f = 16 (LOGIT_BITS + f - 16): logits of a row within 2^(28-16) =
#: 4096 of each other (SmolLM2's stay within 60; ``RingOps`` raises ``HeadroomError`` beyond).
LOGIT_BITS = 28

#: Top-k's bisection: theta on the grid TOPK_RES x {0, ..., 2^TOPK_STEPS - 1} (in logits below the max).
TOPK_RES = 2.0**-6
TOPK_STEPS = 11

#: What top-k subtracts from the entries it drops: 2^(LOGIT_BITS - 16) logits, more than any row's
#: spread, so a dropped entry never wins the argmax (which then runs at width LOGIT_BITS + 1).
TOPK_BIG = 2.0 ** (LOGIT_BITS - 16)


def gumbel_noise(shape) -> torch.Tensor:
    """Gumbel(0, 1) samples -log(-log U) from the CSPRNG (U uniform in (0, 1), 53 bits): in [-3.6, 36.7]."""
    return _gumbel(uniform01(shape))


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp_min(2.0**-53)))


def seeded_gumbel(seed: int, shape):
    """``noise(step)`` for ``nn.greedy_decode`` from a seed: Gumbel(0, 1) samples of ``shape`` like
    ``gumbel_noise``, their 53-bit uniforms from AES-CTR under BLAKE2b(seed) (step i: counter stream i),
    so that one seed gives one sample path (an API's ``seed``).  Only the client draws the noise."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"a seed is an integer, got {seed!r}")
    key = hashlib.blake2b(str(seed).encode(), digest_size=SEED_BYTES, person=b"cometpi-seed").digest()
    prg, shape = AesCtrPrg(key), tuple(shape)
    return lambda step: _gumbel(logical_rshift(prg.ring(step, shape)[0], 11).to(torch.float64) * 2.0**-53)


def _cmp_rounds(k: int) -> int:
    """Rounds of ``compare_many`` at width k (``protocols.compare_rounds``)."""
    return compare_rounds(k)


def choice_rounds(vocab: int, frac_bits: int = 16, top_k: bool = False) -> int:
    """Online rounds of ``choose`` for one row: the max (``protocols.compare.max_rounds``: binary levels of a
    comparison with its select down to 4,096, then 8-fold all-pairs levels) and the sign test; with top-k
    first a max, TOPK_STEPS bisection steps (a comparison of every entry, one of the count) and the keep
    test, and the argmax one bit wider.  SmolLM2 (V = 49,152, f = 16), online, both directions: 48 rounds
    and 1,535,144 B greedy, 184 rounds and 8,612,550 B with top-k (7.1 MB more: a second max and 12
    comparisons of every entry)."""
    k = LOGIT_BITS + frac_bits - 16
    if not top_k:
        return max_rounds(vocab, _cmp_rounds(k)) + _cmp_rounds(k)
    kc = vocab.bit_length() + frac_bits
    return (max_rounds(vocab, _cmp_rounds(k)) + TOPK_STEPS * (_cmp_rounds(k) + _cmp_rounds(kc)) + _cmp_rounds(k)
            + max_rounds(vocab, _cmp_rounds(k + 1)) + _cmp_rounds(k + 1))


def top_k_filter(ops, logits, k, *, owns_text: bool = True):
    """``logits`` (B, V) with every entry outside the top k (up to ties within ``TOPK_RES``; module
    docstring) lowered by ``TOPK_BIG``.  ``k``: the client's (ignored elsewhere); the server runs the
    same steps for any k.  Domain: each row's logits within 2^(LOGIT_BITS - 16) of each other."""
    f = ops.frac_bits
    width = LOGIT_BITS + f - 16
    B, V = logits.shape
    with ops.span("top_k"):
        u = ops.sub(ops.maximum(logits, -1, k=width), logits)  # (B, V), >= 0
        theta = ops.const_like(logits[:, 0], 0.0)  # (B,)
        kw = V.bit_length() + f  # the count's comparison: |count - k| <= V
        for j in reversed(range(TOPK_STEPS)):
            step = 2.0**j * TOPK_RES
            below = ops.compare_thresholds(ops.sub(theta[:, None], u), [-(step - TOPK_RES)], width)  # (B, V, 1)
            count = ops.weighted_bits(ops.sum(below, -2), [1.0])  # (B,): #{u <= theta + step - res}
            if owns_text:
                count = ops.add_client_value(count, -float(k))
            enough = ops.compare_thresholds(count, [0.0], kw)  # (B, 1): the count reached k
            theta = ops.sub(ops.add_const(theta, step), ops.weighted_bits(enough, [step]))
        keep = ops.compare_thresholds(ops.sub(theta[:, None], u), [0.0], width)  # (B, V, 1): u <= theta
        return ops.add_const(ops.add(logits, ops.weighted_bits(keep, [TOPK_BIG])), -TOPK_BIG)


def choose(ops, logits, *, temperature: float = 0.0, top_k=None, noise=None, owns_text: bool = True):
    """The 0/1 marks (B, V) of the next token (revealed to the client by the caller): greedy, or with
    ``temperature`` > 0 a sample (Gumbel-max, ``noise``: the client's Gumbel(0, 1) draws, default
    ``gumbel_noise``), restricted with ``top_k`` to the k largest logits.  The server (``owns_text``
    False) passes ``top_k`` truthy or not; its steps do not depend on k or the temperature."""
    f = ops.frac_bits
    width = LOGIT_BITS + f - 16
    if top_k:
        logits = top_k_filter(ops, logits, top_k, owns_text=owns_text)
        width += 1
    if temperature > 0 and owns_text:  # the server's side is the same as for greedy decoding
        g = noise if noise is not None else gumbel_noise(tuple(logits.shape))
        logits = ops.add_client_value(logits, temperature * g)
    with ops.span("argmax"):
        return ops.argmax_onehot(logits, -1, k=width)


def top_marks(ops, logits, k: int = 1):
    """The 0/1 marks (B, k, V) of the k largest entries of each row of ``logits`` (B, V), best first,
    for a server that reveals labels instead of logits (``service.ModelServer(reveal=...)``): round r
    is the secure argmax (``argmax_onehot``: the narrow max tree and one sign test) of the logits with
    every entry marked in rounds < r lowered by ``TOPK_BIG`` (a local product of the integer marks by
    a public constant), so each entry is marked once and round r finds the r-th largest.  Ties: every
    maximum of a round is marked in that round (as greedy decoding reveals them); the client takes them
    in index order (``marks_to_indices``).  Both parties run the same steps; only the marks are meant
    to be revealed, to the client.  Domain: each row's logits within 2^(LOGIT_BITS - 16) = 4096 of each
    other (``RingOps`` raises ``HeadroomError`` beyond); the first round compares at width
    w = LOGIT_BITS + f - 16, the later ones (knocked-out entries lie up to ``TOPK_BIG`` lower) at w + 1.

    Cost: ``reveal_rounds(V, k)`` = k (``max_rounds(V, c)`` + c) + 1 rounds, c = ``compare_rounds(w)`` = 4 at
    f = 16 (a narrow comparison): each round a max (``protocols.maximum``: up to 8 entries at once,
    c + ceil(log2(a - 1)) rounds per level of a; c per binary level, its select in the sign test's
    rounds) and the sign test, then 1 round for the reveal of k V marks (8 B each, server -> client).
    Online, both directions, one row: 2 labels, the label: 9 rounds, 84 B; the top 2: 17 rounds, 168 B;
    5 labels, the top 3: 31 rounds, 954 B (4 rows: 3,426 B; the rounds do not depend on the rows).
    Revealing the logits instead: 1 round, 8 B per label and row."""
    f = ops.frac_bits
    width = LOGIT_BITS + f - 16
    B, V = logits.shape
    if not 1 <= k <= V:
        raise ValueError(f"top-{k} of {V} entries: k must be 1..{V}")
    rounds = []
    with ops.span("top_marks"):
        for r in range(k):
            marks = ops.argmax_onehot(logits, -1, k=width if r == 0 else width + 1)  # (B, V) 0/1
            rounds.append(marks.reshape(B, 1, V))
            if r + 1 < k:  # knock the found entries out: below every entry not yet found
                logits = ops.sub(logits, ops.weighted_bits(marks.reshape(B, V, 1), [TOPK_BIG]))
        return rounds[0] if k == 1 else ops.cat(rounds, 1)


def reveal_rounds(vocab: int, k: int = 1, frac_bits: int = 16) -> int:
    """Online rounds of ``top_marks`` over ``vocab`` entries plus the reveal of its marks (its Cost line)."""
    w = LOGIT_BITS + frac_bits - 16
    first = max_rounds(vocab, _cmp_rounds(w)) + _cmp_rounds(w)
    later = max_rounds(vocab, _cmp_rounds(w + 1)) + _cmp_rounds(w + 1)
    return first + (k - 1) * later + 1


def marks_to_indices(marks: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices, best first, from the revealed marks (B, k, V) of ``top_marks`` (ring integers
    0/1): round by round, the newly marked entries in index order, the first k kept.  Raises
    ``ValueError`` if fewer than k were marked (logits outside the comparisons' domain)."""
    marks = torch.as_tensor(marks)
    marks = marks.reshape(marks.shape[0], -1, marks.shape[-1])
    out = []
    for row in marks:
        order: list[int] = []
        for r in range(row.shape[0]):
            order += [j for j in torch.nonzero(row[r] != 0).reshape(-1).tolist() if j not in order]
        if len(order) < k:
            raise ValueError(f"the secure argmax marked {len(order)} of {k} entries: logits outside the "
                             f"comparison's domain (within 2^{LOGIT_BITS - 16} of each other)")
        out.append(order[:k])
    return torch.tensor(out, dtype=torch.int64)
