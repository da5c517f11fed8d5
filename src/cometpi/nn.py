"""Transformer models (BERT, RoBERTa, GPT-2, Llama) written once over a model backend.

The same ``forward`` runs on floats (the plaintext-approximate model, and the exact model when every
approximation is ``exact``), on the fixed-point simulation, and on shares between a client (token
ids) and a server (weights).  Parameter names and shapes are those of ``cometpi.convert`` (linear
weights are (in, out)).  Shapes are commented as in nanoGPT: (B, T, d), (B, nh, T, hs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .approx import (
    layernorm,
    rmsnorm,
    sigmoid,
)
from .approx.config import (  # noqa: F401 - re-exported: cometpi.nn.ApproxConfig is the public name
    GELU,
    GELUS,
    PER_CHANNEL,
    SMU_FORMS,
    SOFTMAX,
    SOFTMAXES,
    ApproxConfig,
    resolve_approx,
    trained_smu_lo,
)
from .approx.newton import warn_insecure_once
from .convert import rotary_tables, rotate_half_index
from .core import ConfigError, Role, Session, TruncMode
from .costs import LAYER_TYPES, breakdown  # noqa: F401 - re-exported
from .lookahead import DealerLookahead
from .protocols import MaskedRows
from .sampling import choose, marks_to_indices, top_marks
from .weights import (  # noqa: F401 - re-exported: the model's backends and parameters
    FloatModel,
    RingModel,
    ShareModel,
    encode_params,
    folds_norm_weights,
    param_shapes,
    prepare_params,
    prepare_private,
    private_weight_names,
)

# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _layernorm(ops, x, name, cfg: ApproxConfig, eps: float, arch=None):
    """LayerNorm with the server's private gamma and beta, or RMSNorm with its gamma (Llama)."""
    rms = arch is not None and arch.norm == "rms"
    if cfg.is_exact and isinstance(ops, FloatModel):
        if rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ops.p[name + ".weight"]
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), ops.p[name + ".weight"], ops.p[name + ".bias"],
                                              eps)
    with ops.span("ln"):
        if rms:
            if folds_norm_weights(arch):  # gamma and rms_fold(d) are in the next layer's weights
                return rmsnorm(ops, x, cfg.spec("rmsnorm_ms"), eps=eps, scaled=False)
            return ops.scale_param(rmsnorm(ops, x, cfg.spec("rmsnorm_ms"), eps=eps), name + ".weight")
        y = layernorm(ops, x, cfg.spec("layernorm_var"), eps=eps)
        return ops.add_param(ops.scale_param(y, name + ".weight"), name + ".bias")


#: Span names that classify traffic by layer type (the outermost one on a span's path wins).
def _activation(ops, x, cfg: ApproxConfig, arch, i: int):
    """The FFN's activation (GeLU, SiLU, ReLU) by the approximation ``cfg.gelu`` names (``approx.config.GELU``)."""
    with ops.span("gelu"):
        return GELU[cfg.gelu](ops, x, cfg, arch, i)


def _softmax(ops, s, mask, cfg: ApproxConfig):
    """s (B, nh, T, T); mask broadcastable 0/1 (public tensor or a shared one); by ``approx.config.SOFTMAX``."""
    with ops.span("softmax"):
        return SOFTMAX[cfg.softmax](ops, s, mask, cfg)


def _rope(ops, t, arch, positions):
    """Rotary position embedding of t (B, h, T, hs): t cos + rotate_half(t) sin, a public
    position-dependent linear map (local products, one truncation)."""
    cos, sin = rotary_tables(arch, positions)
    idx, sign = rotate_half_index(arch.head_dim)
    with ops.span("rotary"):
        return ops.mul_const_sum([(t, cos), (t[..., idx], sin * sign)])


def _attention(ops, h, i, arch, B, T, mask, cfg, cache=None):
    d, nh, nkv = arch.hidden, arch.heads, arch.n_kv
    start = cache.length if cache is not None else 0
    hs, rep = d // nh, nh // nkv
    with ops.span("attention"):
        qkv = ops.linear(h, f"layers.{i}.attn.qkv", bias=arch.bias)  # (B*T, (nh + 2 nkv) hs)
        q = qkv[:, :d].reshape(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (qkv[:, d + j * nkv * hs : d + (j + 1) * nkv * hs].reshape(B, T, nkv, hs).transpose(1, 2)
                for j in range(2))  # (B, nkv, T, hs)
        if arch.rope_theta:
            pos = torch.arange(start, start + T)
            q, k = _rope(ops, q, arch, pos), _rope(ops, k, arch, pos)
        S = start + T  # keys
        # grouped-query attention: the rep query heads of a KV head share its keys (no copies of k, v)
        qg = q.reshape(B, nkv, rep * T, hs)
        # 1/sqrt(hs) is folded into W_q; a softmax that starts with the scores' sign test truncates them in it
        pending = cfg.softmax_tests_sign_first
        if cache is None:
            scores = ops.matmul(qg, k.transpose(-2, -1), pending=pending)
        else:  # keys and values of the earlier positions, kept between steps (shares: each row opened once)
            if i == len(cache.k):
                cache.k.append(None)
                cache.v.append(None)
            cache.k[i] = ops.cache_rows(cache.k[i], k, cache.capacity)
            cache.v[i] = ops.cache_rows(cache.v[i], v, cache.capacity)
            scores = ops.matmul_rows(qg, cache.k[i], transpose=True, pending=pending)
        probs = _softmax(ops, scores.reshape(B, nh, T, S), mask, cfg).reshape(B, nkv, rep * T, S)
        ctx = ops.matmul(probs, v) if cache is None else ops.matmul_rows(probs, cache.v[i])
        ctx = ctx.reshape(B, nh, T, hs)
        ctx = ctx.transpose(1, 2).reshape(B * T, d)  # (B*T, d)
        return ops.linear(ctx, f"layers.{i}.attn.out", bias=arch.bias)


def _ffn(ops, h, i, arch, cfg):
    with ops.span("ffn"):
        # (B*T, ffn), or (B*T, 2 ffn) gate|up; an activation that starts with its sign test truncates up (its
        # gate half) in it, and the gate product truncates the up half in its own opening
        pending = cfg.gelu_tests_sign_first
        up = ops.linear(h, f"layers.{i}.ffn.up", bias=arch.bias, pending=pending)
        if arch.gated:  # SwiGLU: down(act(gate) * up), one product
            act = _activation(ops, up[:, :arch.ffn], cfg, arch, i)
            with ops.span("gate"):
                gated = ops.mul_pending(act, up[:, arch.ffn:])
            return ops.linear(gated, f"layers.{i}.ffn.down", bias=arch.bias)
        return ops.linear(_activation(ops, up, cfg, arch, i), f"layers.{i}.ffn.down")


def _tanh(ops, x, cfg):
    if isinstance(ops, FloatModel) and (cfg.pooler == "exact" or ops.ideal):
        return torch.tanh(x)
    return ops.sub(ops.mul_pow2(sigmoid(ops, ops.mul_pow2(x, 1)), 1), ops.const_like(x, 1.0))


@dataclass
class KVCache:
    """Each layer's rotated keys and values, (B, kv_heads, positions, head_dim) backend values (on the
    secure path ``protocols.MaskedRows``: shares, each row masked and opened once, so that neither party
    learns them and a step re-sends none), kept between decoding steps; ``length`` positions;
    ``capacity``: the positions expected in all (``greedy_decode``: prompt and new tokens), the size of
    the first mask block (0: the prompt's)."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    length: int = 0
    capacity: int = 0

    def nbytes(self) -> int:
        """This party's memory for the cache (8 B per ring element; masked rows: with the mask's share)."""
        return sum(t.nbytes() if isinstance(t, MaskedRows) else 8 * math.prod(getattr(t, "shape", ()))
                   for t in (*self.k, *self.v))


def decode_mask(batch: int, start: int, length: int) -> torch.Tensor:
    """(B, 1, T, start + T) causal mask of T new positions over start cached ones."""
    i = torch.arange(length)[:, None] + start
    j = torch.arange(start + length)[None, :]
    return (j <= i).to(torch.int64)[None, None].expand(batch, 1, length, start + length)


def key_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, 1 or T, T) 0/1 mask of the keys each query may attend to."""
    B, T = attention_mask.shape
    m = attention_mask[:, None, None, :].to(torch.int64)  # (B, 1, 1, T)
    if causal:
        m = m * torch.tril(torch.ones(T, T, dtype=torch.int64))[None, None]  # (B, 1, T, T)
    return m


def forward(ops, arch, cfg: ApproxConfig, *, batch: int, length: int, input_ids=None,
            attention_mask: torch.Tensor | None = None, secret_mask=None, on_layer=None, all_positions: bool = False,
            cache: KVCache | None = None):
    """Run the model; returns logits (B, labels) / (B, vocab) at the last position (``all_positions``:
    (B, T, vocab)) / hidden (B, T, d).

    ``cache`` (decoders): the T positions follow ``cache.length`` earlier ones whose keys and values
    the cache holds; the new ones are appended (no padding: every row has the same length).

    ``input_ids`` (B, T) are needed by the party that owns the text (the client; floats: always).
    ``attention_mask`` (B, T) is public (it reveals the lengths); with ``secret_mask`` (an AShare of
    the client's 0/1 key mask (B, 1, 1, T)) the padded length is all the server learns.
    ``on_layer`` (optional) is called after each layer (a progress bar).  On shares the ShareModel's
    ``DealerLookahead`` fetches the coming layers' dealer material ahead.
    """
    B, T, d = batch, length, arch.hidden
    start = 0 if cache is None else cache.length
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.int64)
    if cache is not None:
        if not arch.causal or secret_mask is not None or not bool(attention_mask.all()):
            raise ValueError("a KV cache needs a decoder and unpadded rows")
        mask = decode_mask(B, start, T)
    else:
        mask = secret_mask if secret_mask is not None else key_mask(attention_mask, arch.causal)
    if secret_mask is not None and arch.causal:
        raise ValueError("hiding the length is supported for BERT and RoBERTa only")
    if start + T > arch.max_positions:
        raise ValueError(f"{start + T} positions exceed the model's {arch.max_positions}")
    with ops.span("embeddings"):
        h = ops.embed(input_ids, n_tokens=B * T)  # (B*T, d)
        if not arch.rope_theta:
            pos = torch.arange(start, start + T).repeat(B) + arch.position_offset
            h = ops.add_param(h, "embeddings.position", pos)
        if not arch.pre_ln:
            h = ops.add_param(h, "embeddings.token_type", torch.zeros(B * T, dtype=torch.int64))
            h = _layernorm(ops, h, "embeddings.ln", cfg, arch.ln_eps)
    lookahead = ops.lookahead or DealerLookahead()
    lookahead.forward_begin(arch.layers)
    for i in range(arch.layers):
        lookahead.layer_begin()
        with ops.span("layer"):
            if arch.pre_ln:
                h = ops.add(h, _attention(ops, _layernorm(ops, h, f"layers.{i}.ln1", cfg, arch.ln_eps, arch), i,
                                          arch, B, T, mask, cfg, cache))
                h = ops.add(h, _ffn(ops, _layernorm(ops, h, f"layers.{i}.ln2", cfg, arch.ln_eps, arch), i, arch,
                                    cfg))
            else:
                h = _layernorm(ops, ops.add(h, _attention(ops, h, i, arch, B, T, mask, cfg)), f"layers.{i}.ln1", cfg,
                               arch.ln_eps)
                h = _layernorm(ops, ops.add(h, _ffn(ops, h, i, arch, cfg)), f"layers.{i}.ln2", cfg, arch.ln_eps)
        lookahead.layer_end(i)
        if on_layer is not None:
            on_layer()
    if cache is not None:
        cache.length += T
    lookahead.tail_begin()
    with ops.span("head"):
        if arch.head == "none":
            return h.reshape(B, T, d)
        if arch.head == "lm":
            if all_positions:
                h = _layernorm(ops, h, "final_ln", cfg, arch.ln_eps, arch)
                return ops.linear(h, "lm_head", bias=False).reshape(B, T, arch.vocab)
            last = attention_mask.sum(1) - 1  # public: the last real position of each row
            rows = h.reshape(B, T, d)[torch.arange(B), last]  # (B, d): normalised alone (the norm is per row)
            return ops.linear(_layernorm(ops, rows, "final_ln", cfg, arch.ln_eps, arch), "lm_head", bias=False)
        first = h.reshape(B, T, d)[:, 0]  # (B, d): [CLS] / <s>
        if arch.kind == "bert":
            pooled = _tanh(ops, ops.linear(first, "pooler"), cfg)
            return ops.linear(pooled, "classifier")
        return ops.linear(_tanh(ops, ops.linear(first, "head.dense"), cfg), "head.out")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def plaintext_forward(arch, params, input_ids, attention_mask=None, cfg: ApproxConfig | None = None,
                      dtype=torch.float64):
    """The plaintext-approximate model (the same math as the secure path, in floats)."""
    cfg = cfg or ApproxConfig()
    ops = FloatModel(prepare_params(arch, params, cfg), dtype)
    B, T = input_ids.shape
    return forward(ops, arch, cfg, batch=B, length=T, input_ids=input_ids, attention_mask=attention_mask)


def ring_forward(arch, params, input_ids, attention_mask=None, cfg: ApproxConfig | None = None):
    """The fixed-point simulation of the secure path (no network)."""
    cfg = cfg or ApproxConfig()
    ops = RingModel(prepare_params(arch, params, cfg))
    B, T = input_ids.shape
    return ops.reveal(forward(ops, arch, cfg, batch=B, length=T, input_ids=input_ids,
                              attention_mask=attention_mask))


def check_truncation(config, cfg: ApproxConfig) -> None:
    """Local (SecureML) truncation fails with probability |v|/2^64 per truncated element, by 2^(64-k):
    ``bench sites`` measures about 0.1 corrupted elements per MiniLM/128 inference with the constant or
    thermometer guess and Comet's rsqrt forms, 0.27 with today's defaults (SMU by segments: its last
    product truncates from 2^44), and 6e4 with Comet's flooded guess (whose Newton runs at scale 2^m).
    Refuse the latter; warn once for the rest (docs/correctness.md)."""
    if config.trunc != TruncMode.LOCAL:
        return
    if "comet" in cfg.guess:
        raise ConfigError("--trunc local with Comet's flooded guess: Newton runs at scale 2^m, so local shifts of "
                          "values near 2^56 would corrupt about 6e4 elements per inference; use --trunc exact")
    warn_insecure_once("trunc=local", "local truncation corrupts an element with probability |v|/2^64: about "
                       "1 MiniLM/128 inference in 4 returns a wrong answer; use --trunc exact (the default)")


#: What a private inference reveals to the client (``secure_forward``'s ``output``).
OUTPUTS = ("logits", "label", "topk")


def secure_forward(session: Session, arch, cfg: ApproxConfig, *, params=None, input_ids=None, shape=None,
                   attention_mask=None, hide_length: bool = False, model: ShareModel | None = None,
                   on_layer=None, output: str = "logits", k: int = 1):
    """One party's side of a private inference; the client gets the output (float), the server None.

    The server passes ``params`` (or a prepared ``model``), the client ``input_ids`` (B, T); both
    pass ``shape`` (B, T) and the public ``attention_mask`` (or ``hide_length``: the client shares its
    mask and the server sees only the padded length).

    ``output`` (both parties pass the same): ``logits`` reveals the model's output to the client;
    ``label`` and ``topk`` (the ``k`` best) keep the logits in shares and reveal only the 0/1 marks of
    ``sampling.top_marks`` (the secure argmax, k rounds): the client gets (B, k) int64 indices, best
    first (``label``: k = 1).  A head with logits only (classifier, LM).
    """
    check_truncation(session.config, cfg)
    model = model or ShareModel(session, arch, None if params is None else prepare_params(arch, params, cfg))
    B, T = shape
    secret = None
    if hide_length:
        m = None if attention_mask is None else key_mask(attention_mask, False)
        secret = session.share(m, owner=Role.CLIENT, shape=(B, 1, 1, T), encoded=True) if session.is_client \
            else session.share(None, owner=Role.CLIENT, shape=(B, 1, 1, T))
        attention_mask = None
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose from {OUTPUTS}")
    if output != "logits" and arch.head not in ("classifier", "lm"):
        raise ValueError(f"output {output!r} needs logits (a classifier or LM head), not head {arch.head!r}")
    out = forward(model, arch, cfg, batch=B, length=T, input_ids=input_ids, attention_mask=attention_mask,
                  secret_mask=secret, on_layer=on_layer)
    if output == "logits":
        return model.reveal(out)
    k = 1 if output == "label" else k
    with session.span("reveal_top"):
        marks = session.reveal(top_marks(model, out, k), Role.CLIENT, "reveal-top")  # (B, k, V) 0/1, client only
    return None if marks is None else marks_to_indices(marks.cpu(), k)


def greedy_decode(ops, arch, cfg: ApproxConfig, *, prompt_ids=None, prompt_length: int, max_new: int,
                  cache: KVCache | None = None, on_token=None, stop=None, temperature: float = 0.0, top_k=None,
                  noise=None):
    """Greedy decoding (or sampling) with a KV cache on any model backend: one prefill forward of the
    prompt, then one position per step over the cached keys and values.  Each step's next token is
    chosen by ``sampling.choose`` from the last position's logits: the argmax by the max tree of
    narrow comparisons and one sign test (on shares: only its 0/1 marks are revealed, to the client;
    ties reveal every maximum and the first is taken); with ``temperature`` t > 0 a sample of
    softmax(logits / t) by the Gumbel-max trick, the noise drawn by the client (``noise(step)``,
    default ``gumbel_noise`` from the CSPRNG) and added to its own share; with ``top_k`` only among
    the k largest logits (k is the client's; the server passes any true value).  The server computes
    the same for every t and k and learns neither, nor the noise.  Yields each token id (None on the
    server, which learns nothing but the number of steps); ``stop(token)`` (the client's) ends the loop
    early, ``on_token`` sees each id.  Returns (as StopIteration's value) the cache."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cache = KVCache() if cache is None else cache
    cache.capacity = cache.capacity or cache.length + prompt_length + max(max_new - 1, 0)
    ids, T = prompt_ids, prompt_length
    owns_text = not isinstance(ops, ShareModel) or ops.s.is_client
    lookahead = ops.lookahead or DealerLookahead()
    for step in range(max_new):
        lookahead.decoding = True
        try:
            logits = forward(ops, arch, cfg, batch=1, length=T, input_ids=ids, cache=cache)  # (1, vocab)
            g = noise(step) if noise is not None and temperature > 0 and owns_text else None
            marks = ops.reveal(choose(ops, logits, temperature=temperature, top_k=top_k, noise=g,
                                      owns_text=owns_text))
            lookahead.tail_end()
        finally:
            lookahead.decoding = False
        token = None if marks is None else int(torch.as_tensor(marks)[0].argmax())
        if on_token is not None:
            on_token(token)
        end = stop is not None and stop(token)  # before the yield: the peer hears it at once
        yield token
        if end:
            break
        ids, T = (None if token is None else torch.tensor([[token]])), 1
    return cache


def secure_generate(session: Session, arch, cfg: ApproxConfig, *, model: ShareModel, prompt_ids=None,
                    prompt_length: int, max_new: int, eos_id: int | None = None, fixed_length: bool = False,
                    temperature: float = 0.0, top_k=None, noise=None, cache: KVCache | None = None, until=None):
    """One party's side of private greedy generation (a generator of token ids; None on the server).

    The client passes its ``prompt_ids`` (1, T); both pass ``prompt_length`` and ``max_new``.  After
    each token the client tells the server whether to go on (the server learns the number of tokens
    generated, not which); with ``fixed_length`` both run ``max_new`` steps and no flag is sent (the
    client discards what follows an end-of-sequence itself), so the server learns only max_new.
    ``cache``: the KVCache to fill (its ``nbytes()`` is this party's memory for it afterwards).
    ``until(token)``: the client's own rule to end after this token (with the end of sequence; not
    with ``fixed_length``, whose point is that the length says nothing).
    """
    check_truncation(session.config, cfg)

    def stop(token):
        if fixed_length:
            return False
        if session.is_client:
            end = (eos_id is not None and token == eos_id) or (until is not None and bool(until(token)))
            session.peer.send_json({"stop": bool(end)}, "decode-step")
            return end
        q = session.peer.recv_json("decode-step")
        if not isinstance(q, dict) or not isinstance(q.get("stop"), bool):
            raise ValueError(f"malformed decode-step message: {q!r}")
        return q["stop"]

    with session.span("generate"):
        yield from greedy_decode(model, arch, cfg, prompt_ids=prompt_ids, prompt_length=prompt_length,
                                 max_new=max_new, stop=stop, temperature=temperature, top_k=top_k, noise=noise,
                                 cache=cache)


def first_divergence(got: list[int], want: list[int]) -> int | None:
    """The first position where two token lists differ (one ending early counts), or None."""
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    return min(len(got), len(want)) if first is None and len(got) != len(want) else first


def plaintext_greedy(arch, params, ids: torch.Tensor, n: int, eos: int | None):
    """Greedy continuation by the plaintext float64 model with a KV cache (cached = uncached: tests),
    with each step's top-2 margin."""
    cfg = ApproxConfig.exact()
    ops = FloatModel(prepare_params(arch, params, cfg))
    cache, out, margins = KVCache(), [], []
    cur = ids
    for _ in range(n):
        logits = forward(ops, arch, cfg, batch=1, length=cur.shape[1], input_ids=cur, cache=cache)[0]
        top = logits.topk(2)
        out.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if eos is not None and out[-1] == eos:
            break
        cur = torch.tensor([[out[-1]]])
    return out, margins
