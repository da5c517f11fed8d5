"""A model's parameters on each backend: the exact rewrites folded into them (the attention scale,
RMSNorm's gamma, SMU's mu), the three model backends (floats, the ring simulation, shares) with
access to them, and the server-private weights masked once per session."""

from __future__ import annotations

import math

import torch

from . import protocols as P
from .approx import FloatOps, RingOps, ShareOps
from .approx.backends import checked_matmul, checked_product
from .approx.config import PER_CHANNEL, ApproxConfig
from .approx.functions import rms_fold
from .approx.segments import fold_mu
from .core import ConfigError, Role, Session, TruncMode
from .lookahead import DealerLookahead
from .ring import FixedPoint


def folds_norm_weights(arch) -> bool:
    """Whether RMSNorm's gamma is folded into the linear layer each norm feeds (pre-norm RMSNorm models:
    Llama, SmolLM2): gamma x_hat W = x_hat (diag(gamma) W), so no private vector product (2 rounds) runs
    on shares; rmsnorm's public per-row factor (``rms_fold``) goes there too (1 round).  Public (both
    parties derive it from the architecture): the folded weights are not masked."""
    return arch.pre_ln and arch.norm == "rms"


def prepare_params(arch, params: dict, cfg: ApproxConfig) -> dict:
    """Fold the attention scale 1/sqrt(hs) into the query weights and bias (a local, exact rewrite:
    the secure path then needs no public product for it); for pre-norm RMSNorm models fold each norm's
    gamma into the weights of the linear layer it feeds (``folds_norm_weights``; the gammas become
    the 1 / rms_fold(d) that the exact float norm then needs); for SMU's segments form, fold mu into the
    FFN weights (``approx.segments.fold_mu``: the per-channel mu stays the server's, inside its
    weights); for the rsqrt form, square trained SMU mu's (the server adds mu^2).  Differentiable:
    fine-tuning runs through it."""
    out = dict(params)
    d, hs = arch.hidden, arch.hidden // arch.heads
    scale = 1.0 / math.sqrt(hs)
    if folds_norm_weights(arch):
        for norm, lin in [(f"layers.{i}.ln{j}", f"layers.{i}.{'attn.qkv' if j == 1 else 'ffn.up'}")
                          for i in range(arch.layers) for j in (1, 2)] + [("final_ln", "lm_head")]:
            gamma = out[norm + ".weight"] * rms_fold(d)  # and rmsnorm's public factor (rmsnorm(scaled=False))
            out[lin + ".weight"] = gamma[:, None] * out[lin + ".weight"]
            out[norm + ".weight"] = torch.full_like(gamma, 1 / rms_fold(d))  # the exact norm (floats) undoes it
    for i in range(arch.layers):
        w = out[f"layers.{i}.attn.qkv.weight"].clone()
        w[:, :d] *= scale  # rotary positions commute with the scale
        out[f"layers.{i}.attn.qkv.weight"] = w
        if arch.bias:
            b = out[f"layers.{i}.attn.qkv.bias"].clone()
            b[:d] *= scale
            out[f"layers.{i}.attn.qkv.bias"] = b
        mu = out.get(f"layers.{i}.ffn.smu_mu")
        if cfg.folds_mu:
            if cfg.smu_mu != PER_CHANNEL:
                mu = float(cfg.smu_mu)
            elif mu is None:
                raise ConfigError("the approximations ask for a trained per-channel SMU mu, but the model has none")
            up, down = f"layers.{i}.ffn.up", f"layers.{i}.ffn.down"
            if arch.gated:  # SwiGLU: mu enters through the gate only
                gate = out[up + ".weight"][:, :arch.ffn]
                g, _, out[down + ".weight"] = fold_mu(gate, torch.zeros(arch.ffn, dtype=gate.dtype),
                                                      out[down + ".weight"], mu)
                out[up + ".weight"] = torch.cat([g, out[up + ".weight"][:, arch.ffn:]], -1)
            else:
                out[up + ".weight"], out[up + ".bias"], out[down + ".weight"] = fold_mu(
                    out[up + ".weight"], out[up + ".bias"], out[down + ".weight"], mu)
        elif mu is not None:
            out[f"layers.{i}.ffn.smu_mu2"] = mu * mu
    return out


# --------------------------------------------------------------------------------------------------
# Model backends: the approx backends plus access to the model's parameters
# --------------------------------------------------------------------------------------------------


class _LocalParams:
    """Parameter access shared by the two backends that hold every parameter themselves (``self.p``)."""

    def add_param(self, x, name, index=None):
        t = self.p[name]
        return x + (t if index is None else t[index])

    def embed(self, ids, n_tokens=None):
        return self.p["embeddings.word"][ids.reshape(-1)]

    def cache_rows(self, old, new, capacity=None):
        """A KV cache's keys or values (B, h, S, d) with ``new`` positions appended."""
        return new if old is None else torch.cat([old, new], 2)

    def matmul_rows(self, a, rows, transpose=False, pending=False):
        """a @ rows (``transpose``: a @ rows^T) for cached keys or values ``rows``."""
        return self.matmul(a, rows.transpose(-2, -1) if transpose else rows, pending)


class FloatModel(_LocalParams, FloatOps):
    """Floats with the parameters in the clear (plaintext reference; ``ideal`` for fine-tuning)."""

    lookahead = None

    def __init__(self, params: dict, dtype=torch.float64, ideal: bool = False):
        super().__init__(dtype, ideal)
        self.p = {k: v.to(dtype) for k, v in params.items()}

    def linear(self, x, name, bias=True, pending=False):
        """x W + b (``pending``: the secure backend may hand over its product before truncation)."""
        y = x @ self.p[name + ".weight"]
        return y + self.p[name + ".bias"] if bias else y

    def scale_param(self, x, name):
        return x * self.p[name]

    def matmul(self, a, b, pending=False):
        return a @ b

    def mul_const_sum(self, pairs):
        return sum(a * torch.as_tensor(c, dtype=a.dtype) for a, c in pairs)

    def reveal(self, x):
        return x


class RingModel(_LocalParams, RingOps):
    """The fixed-point simulation with parameters encoded (no network)."""

    lookahead = None

    def __init__(self, params: dict, fp: FixedPoint | None = None, count_local_odds: bool = False):
        super().__init__(fp, count_local_odds)
        self.p = {k: self.fp.encode(v) for k, v in params.items()}

    def linear(self, x, name, bias=True, pending=False):
        y = self.shift(checked_matmul(x, self.p[name + ".weight"]), self.fp.frac_bits)
        return y + self.p[name + ".bias"] if bias else y

    def scale_param(self, x, name):
        return self.shift(checked_product(x, self.p[name]), self.fp.frac_bits)

    def matmul(self, a, b, pending=False):
        return self.shift(checked_matmul(a, b), self.fp.frac_bits)

    def mul_const_sum(self, pairs):
        """sum of a * c for public real tensors c, with one truncation."""
        return self.shift(sum(checked_product(a, self.fp.encode(c)) for a, c in pairs), self.fp.frac_bits)

    def reveal(self, x):
        return self.fp.decode(x)


class ShareModel(ShareOps):
    """The secure path: private weights masked once per session, biases added by the server."""

    lookahead = None  # set per session (the dealer material of coming layers)

    def __init__(self, session: Session, arch, params: dict | None, *, encoded: dict | None = None):
        """``encoded``: the server's ``encode_params(params, session.fp)`` made once for many sessions
        (read only; encoding SmolLM2's weights takes seconds)."""
        super().__init__(session)
        self.arch = arch
        self.server = session.role == Role.SERVER
        if self.server and params is None:
            raise ValueError("the server must hold the parameters")
        self.enc = (encoded if encoded is not None else encode_params(params, self.fp)) if self.server else {}
        self.w = prepare_private(session, arch, self.enc if self.server else None, encoded=True)
        # the dealer material of coming layers, guessed and fetched ahead (Config.lookahead)
        self.lookahead = DealerLookahead(session.provider if session.config.lookahead else None)

    def linear(self, x, name, bias=True, pending=False):
        """x W + b with the server's W and b; ``pending``: a ``protocols.Pending`` product (the bias added
        before the truncation, as b 2^f) whose truncation the next step opens with its own."""
        if not pending or TruncMode(self.s.config.trunc) == TruncMode.LOCAL:
            y = P.matmul_private(x, self.w[name + ".weight"])
            return self.add_param(y, name + ".bias") if bias else y
        z = P.matmul_private(x, self.w[name + ".weight"], truncate_result=False)
        if bias and self.server:
            z = z._wrap(z.data + (self.enc[name + ".bias"] << self.fp.frac_bits).to(z.data.device))
        return P.Pending(z, self.fp.frac_bits)

    def scale_param(self, x, name):
        return P.matmul_private(x, self.w[name])

    def add_param(self, x, name, index=None):
        if not self.server:
            return x
        t = self.enc[name]
        return x._wrap(x.data + (t if index is None else t[index]).to(x.data.device))

    def embed(self, ids, n_tokens=None):
        return P.embedding_lookup(None if ids is None else ids.reshape(-1), self.w["embeddings.word"],
                                  n_tokens=n_tokens)

    def matmul(self, a, b, pending=False):
        if pending and TruncMode(self.s.config.trunc) != TruncMode.LOCAL:
            return P.Pending(P.matmul(a, b, truncate_result=False), self.fp.frac_bits)
        return P.matmul(a, b)

    def cache_rows(self, old, new, capacity=None):
        """The cached keys or values with ``new`` positions appended: ``protocols.MaskedRows``, each row
        masked and opened once (``capacity``: rows of its first mask block)."""
        rows = old if old is not None else P.MaskedRows(self.s, capacity or new.shape[2])
        return rows.append(new)

    def matmul_rows(self, a, rows, transpose=False, pending=False):
        """a @ rows (``transpose``: a @ rows^T): only a's masked difference and the new rows' travel."""
        if pending and TruncMode(self.s.config.trunc) != TruncMode.LOCAL:
            return P.Pending(P.matmul_rows(a, rows, transpose=transpose, truncate_result=False), self.fp.frac_bits)
        return P.matmul_rows(a, rows, transpose=transpose)

    def mul_const_sum(self, pairs):
        """sum of a * c for public real tensors c: local products, one truncation (1 round, 16 B/element)."""
        acc = None
        for a, c in pairs:
            t = a.mul_int(torch.broadcast_to(self.fp.encode(c), a.shape).contiguous())
            acc = t if acc is None else acc + t
        return P.truncate(acc, self.fp.frac_bits)

    def reveal(self, x):
        return self.s.reveal_float(x, Role.CLIENT)


def private_weight_names(arch) -> list[tuple[str, int]]:
    """The server-private weights masked at session start, in order, with their ring size."""
    names = [("embeddings.word", 32)]
    if not arch.pre_ln:
        names.append(("embeddings.ln.weight", 64))
    norms = not folds_norm_weights(arch)  # folded gammas are inside the next layer's weights
    for i in range(arch.layers):
        names += [(f"layers.{i}.attn.qkv.weight", 64), (f"layers.{i}.attn.out.weight", 64),
                  *[(f"layers.{i}.ln1.weight", 64)] * norms, (f"layers.{i}.ffn.up.weight", 64),
                  (f"layers.{i}.ffn.down.weight", 64), *[(f"layers.{i}.ln2.weight", 64)] * norms]
    if arch.pre_ln and norms:
        names.append(("final_ln.weight", 64))
    if arch.head == "classifier":
        names += [("pooler.weight", 64), ("classifier.weight", 64)] if arch.kind == "bert" else [
            ("head.dense.weight", 64), ("head.out.weight", 64)]
    if arch.head == "lm":
        names.append(("lm_head.weight", 64))
    return names


def param_shapes(arch) -> dict[str, tuple]:
    d, ff = arch.hidden, arch.ffn
    shapes = {"embeddings.word": (arch.vocab, d), "embeddings.ln.weight": (d,), "final_ln.weight": (d,),
              "pooler.weight": (d, d), "classifier.weight": (d, arch.num_labels), "head.dense.weight": (d, d),
              "head.out.weight": (d, arch.num_labels), "lm_head.weight": (d, arch.vocab)}
    for i in range(arch.layers):
        shapes.update({f"layers.{i}.attn.qkv.weight": (d, arch.qkv_width), f"layers.{i}.attn.out.weight": (d, d),
                       f"layers.{i}.ln1.weight": (d,), f"layers.{i}.ffn.up.weight": (d, 2 * ff if arch.gated else ff),
                       f"layers.{i}.ffn.down.weight": (ff, d), f"layers.{i}.ln2.weight": (d,)})
    return shapes


def encode_params(params: dict, fp) -> dict:
    """Every parameter as ring elements (the server's, once per model and fixed-point precision)."""
    return {k: fp.encode(v) for k, v in params.items()}


def prepare_private(session: Session, arch, params: dict | None, *, encoded: bool = False) -> dict:
    """Mask every private weight for this session (offline; both parties, same order).  The server
    passes ``params`` (real, or ring elements with ``encoded``)."""
    shapes = param_shapes(arch)
    out = {}
    with session.span("prepare_model"):
        for name, bits in private_weight_names(arch):
            w = None if params is None else params[name]
            out[name] = P.prepare_weight(session, w, shape=shapes[name], bits=bits, encoded=encoded)
    return out
