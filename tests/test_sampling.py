"""Choosing the next token on shares (issue 13): top-k keeps the k largest logits, samples stay among
them, the private choice equals the fixed-point simulation's and the plaintext rule's, and its rounds
and bytes are as documented."""

import math

import pytest
import torch

from cometpi.approx import FloatOps, RingOps
from cometpi.core import Role
from cometpi.party import run_local
from cometpi.sampling import TOPK_RES, choice_rounds, choose, gumbel_noise, top_k_filter

from .test_protocols import measured


def _logits(V, seed=0, spread=12.0):
    """Distinct logits at least 2 TOPK_RES apart (test data, not protocol randomness)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randperm(V, generator=g).to(torch.float64) * (spread / V) + 2 * TOPK_RES
    return (base - spread / 2).reshape(1, V)


def _kept(ops, logits, k):
    vals = ops.output(top_k_filter(ops, ops.input(logits), k))
    return set(torch.nonzero(vals[0] > logits[0].min() - 1).flatten().tolist())


@pytest.mark.parametrize("ops", [FloatOps(), RingOps()], ids=["float", "ring"])
def test_top_k_keeps_the_k_largest(ops):
    logits = _logits(40)
    for k in (1, 2, 5, 17, 40):
        assert _kept(ops, logits, k) == set(logits[0].topk(k).indices.tolist()), k


def test_top_k_keeps_ties_and_drops_the_far_tail():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.5, -40.0]])
    assert _kept(FloatOps(), logits, 2) == {0, 1, 2}  # a tie at the k-th is kept, as transformers does
    assert _kept(FloatOps(), logits, 5) == {0, 1, 2, 3}  # more than 32 below the max: always dropped


def _plain_choice(logits, t, k, g):
    s = logits[0] + (t * g[0] if t > 0 else 0)
    if k:
        drop = logits[0] < logits[0].topk(k).values[-1]
        s = torch.where(drop, torch.full_like(s, -math.inf), s)
    return int(s.argmax())


CASES = [(0.0, None), (0.0, 3), (0.8, None), (0.8, 3), (2.0, 5), (1.0, 1), (1.5, 40)]


def test_private_choice_equals_the_simulation_and_the_plaintext_rule():
    V = 40
    logits = _logits(V, seed=3)
    noises = [gumbel_noise((1, V)) for _ in CASES]
    ring = RingOps()
    want = []
    for (t, k), g in zip(CASES, noises, strict=True):
        marks = ring.output(choose(ring, ring.input(logits), temperature=t, top_k=k, noise=g))
        want.append(int(torch.nonzero(marks[0]).flatten()[0]))
        assert want[-1] == _plain_choice(logits, t, k, g), (t, k)

    def job(s):
        from cometpi.approx import ShareOps

        ops = ShareOps(s)
        x = s.share(logits if s.is_client else None, owner=Role.CLIENT, shape=logits.shape)
        out = []
        for (t, k), g in zip(CASES, noises, strict=True):
            marks = choose(ops, x, temperature=t, top_k=k if s.is_client else bool(k), noise=g if s.is_client else None,
                           owns_text=s.is_client)
            out.append(s.reveal(marks, Role.CLIENT))
        return out

    got, server = run_local(job)
    assert server == [None] * len(CASES)
    assert [int(torch.nonzero(m[0]).flatten()[0]) for m in got] == want
    assert all(int(m.sum()) == 1 for m in got)  # one token marked: nothing else of the logits


def test_samples_stay_in_the_top_k_with_the_right_frequencies():
    """Sampling with the client's CSPRNG noise: every draw among the k largest, the top token about as
    often as its share of softmax(logits / t) over them (5 sigma)."""
    V, k, t, n = 30, 4, 1.5, 400
    logits = _logits(V, seed=5, spread=6.0)
    ring = RingOps()
    x = ring.input(logits)
    top = logits[0].topk(k).indices.tolist()
    draws = [int(torch.nonzero(ring.output(choose(ring, x, temperature=t, top_k=k))[0]).flatten()[0])
             for _ in range(n)]
    assert set(draws) <= set(top) and len(set(draws)) > 1
    p = torch.softmax(logits[0, top] / t, 0)[0].item()
    assert abs(draws.count(top[0]) / n - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("V", [37, 49152])
def test_choice_costs_as_documented(V):
    """Rounds: ``choice_rounds``; at SmolLM2's vocabulary the online bytes of its docstring."""
    logits = _logits(V, seed=7, spread=20.0)

    def job(s):
        from cometpi.approx import ShareOps

        ops = ShareOps(s)
        x = s.share(logits if s.is_client else None, owner=Role.CLIENT, shape=logits.shape)
        out = []
        for k in (None, 40):
            _, on, _ = measured(s, lambda k=k: choose(ops, x, top_k=(k if s.is_client else True) if k else None,
                                                      owns_text=s.is_client))
            out.append((on.rounds, on.payload_bytes))
        return out

    (greedy, topk), _ = run_local(job, timeout=600)
    assert greedy[0] == choice_rounds(V) and topk[0] == choice_rounds(V, top_k=True)
    if V == 49152:
        doc = choice_rounds.__doc__
        assert f"{greedy[1]:,} B greedy" in doc and f"{topk[1]:,} B with top-k" in doc, (greedy, topk)
