"""Nonlinear functions, each written once against the backend interface (float, ring, shares).

Comet's replacements (../shared/COMET.md §3): SMU for GeLU, ReLU normalisation for softmax, and
LayerNorm, all products plus ``rsqrt``.  Baselines in the same engine: CrypTen's exp, reciprocal,
inverse square root and softmax; MPCFormer's Quad GeLU and 2Quad softmax; erf- and tanh-GeLU by
CrypTen's methods; exact ReLU, 2ReLU softmax and max by the secure comparison.

Domains, error bounds and costs are listed in ``FUNCTIONS`` (tests sweep each domain) and measured
by ``cometpi bench nonlinear`` (docs/nonlinear.md).
"""

from __future__ import annotations

import math

import torch

from .newton import RsqrtSpec, crypten_exp, rsqrt
from .splines import exp_neg

# ---------------------------------------------------------------------------------------------
# Built from rsqrt
# ---------------------------------------------------------------------------------------------


def sqrt(ops, x, spec: RsqrtSpec):
    """sqrt(x) = x rsqrt(x) for x in [spec.lo, spec.hi].  Cost: rsqrt + 1 product."""
    return ops.mul(x, rsqrt(ops, x, spec))


def reciprocal(ops, x, spec: RsqrtSpec):
    """1/x = rsqrt(x)^2 for x in [spec.lo, spec.hi] (x > 0).  Cost: rsqrt + 1 square."""
    return ops.square(rsqrt(ops, x, spec))


def smu(ops, x, mu, spec: RsqrtSpec, alpha: float = 0.0, add_mu2=None):
    """Smooth maximum unit ((1+a)x + sqrt(((1-a)x)^2 + mu^2))/2 (Biswas et al., CVPR 2022).

    ``mu`` is a number or a per-channel tensor (last dimension); z = ((1-a)x)^2 + mu^2 >= mu^2 is
    the rsqrt call site, so spec's domain must cover [min mu^2, max z].  ``add_mu2`` (instead of
    ``mu``) adds a private mu^2: the secure model's server adds its trained per-channel mu^2 locally.
    Every halving is folded into a product's exact truncation (no local shift: issue 15).
    Cost: 1 square (its truncation round also halves x: +16 B/element) + rsqrt + 1 product
    (+1 public product if alpha != 0).
    """
    with ops.span("smu"):
        if alpha == 0:  # x^2 and x/2 in one truncation round
            sq, lin_half = ops.square_and_halve(x)
        else:
            sq, lin_half = ops.square(ops.mul_const(x, 1 - alpha)), ops.mul_const(x, (1 + alpha) / 2)
        if add_mu2 is not None:
            z = add_mu2(sq)
        else:
            mu2 = mu * mu if isinstance(mu, torch.Tensor) else float(mu) ** 2
            z = ops.add_const(sq, mu2)
        root_half = ops.mul(z, rsqrt(ops, z, spec), 1)  # the halving folded into the exact truncation
        return ops.add(lin_half, root_half)


def smooth_relu(ops, x, spec: RsqrtSpec, mu: float = 0.1):
    """ReLU without a comparison: SMU with alpha = 0 and a small mu, (x + sqrt(x^2 + mu^2))/2, which is
    within mu/2 of ReLU everywhere.  Cost: as ``smu``."""
    return smu(ops, x, mu, spec)


#: Extra fractional bits of ReLU-softmax's 1/S (products stay below 2^62 for r < 2^10 and S >= eps).
INV_EXTRA_BITS = 8


#: ReLU-softmax's ReLU: ``narrow`` (Comet's ReLU, exact, by ``drelu_narrow`` at ``SCORE_BITS``),
#: ``smooth`` (SMU with a small mu: no comparison, within mu/2 of ReLU), ``full`` (the full-ring
#: comparison of the 2ReLU baseline).
RELUS = ("narrow", "smooth", "full")
#: Width of the narrow ReLU's sign test at f = 16 (SCORE_BITS + f - 16 in general): |s| < 4096 (attention scores
#: measured up to |s| ~ 114 at 512 adversarial tokens: bench/results/sites.md).
SCORE_BITS = 28


def relu_softmax(ops, s, mask, spec: RsqrtSpec, *, mu: float = 0.1, eps: float = 1e-2, relu: str = "smooth",
                 relu_spec: RsqrtSpec | None = None):
    """ReLU normalisation along the last dim: r_i / (sum_j r_j + eps), r = ReLU(s) * mask.

    ``relu`` (see ``RELUS``): ``narrow`` is the exact ReLU s [s >= 0] by the narrow comparison
    with its select (``drelu_select``: 18.25 B, 4 rounds), valid for
    |s| < 2^(SCORE_BITS - 16) = 4096 (the simulation raises ``HeadroomError`` beyond); ``smooth`` is
    SMU(alpha=0, mu) (no comparison; ``relu_spec`` is its rsqrt domain, z = s^2 + mu^2, default
    ``spec`` with lo lowered to mu^2/2); ``full`` the full-ring comparison (the 2ReLU baseline).
    ``mask`` (public 0/1, broadcastable) zeroes padded keys; eps guards rows whose scores are all
    negative.  1/S = rsqrt(S)^2 with S in [eps, spec.hi].
    Cost: relu + rsqrt on the row sums + 1 square + 1 product.
    """
    if relu not in RELUS:
        raise ValueError(f"unknown ReLU {relu!r} for ReLU-softmax; choose from {RELUS}")
    with ops.span("relu_softmax"):
        if relu == "narrow":
            monitor = ops.monitor
            if monitor is not None:  # the sign test's range (bench sites)
                monitor.value("softmax_score", ops.output(s), 2.0 ** (SCORE_BITS - 16))
            r = ops.sign_mask(s, SCORE_BITS + ops.frac_bits - 16)[2]
        elif relu == "full":
            r = ops.relu(s)
        else:
            if relu_spec is None:
                relu_spec = spec.with_(lo=min(spec.lo, mu * mu / 2), site="softmax_relu" if spec.site else "")
            r = smooth_relu(ops, s, relu_spec, mu)
        if mask is not None:
            r = ops.mask(r, mask)
        return _normalise(ops, r, spec, eps)


def _normalise(ops, r, spec: RsqrtSpec, eps: float, kept=None, mask=None):
    """r / (sum of the last dim + eps) with 1/S = rsqrt(S)^2 on spec's domain; ``kept`` (r's handle from
    its last truncation, ``ops.mul_kept``): the product by 1/S opens 1/S only, and ``mask`` (public 0/1,
    already applied to r) is applied after it.
    Cost: rsqrt on the row sums + 1 square + 1 product."""
    total = ops.add_const(ops.sum(r, -1, keepdim=True), eps) if eps else ops.sum(r, -1, keepdim=True)
    # 1/S carried with 8 extra fractional bits (a row sum of 8,000 at 512 tokens makes 1/S only 8 ulp
    # at f = 16, a 6% quantisation); the final product's truncation drops them again
    inv = ops.square(rsqrt(ops, total, spec), -INV_EXTRA_BITS)
    if kept is None:
        return ops.mul(r, inv, INV_EXTRA_BITS)
    out = ops.mul_kept(inv, kept, INV_EXTRA_BITS)
    return out if mask is None else ops.mask(out, mask)


#: Masked keys' scores before the max: far below every real score (|s| < 2048), so that exp(s - max) is 0
#: there, max - s stays below 2^12 (the max's comparison width, SCORE_BITS: 4 chunks of 7 bits, 128 B of
#: one-time tables per compared value where 2^13 needed 4 of 8 and 256 B) and below 2^13 (exp's).
MASKED_SCORE = -2048.0


def softmax_exp(ops, s, mask, spec: RsqrtSpec):
    """The original softmax exp(s - max) / sum, with the max by a tree of narrow comparisons
    (``maximum`` at width SCORE_BITS), exp(-u) of u = max - s >= 0 by a degree-2 spline
    (``approx.splines.exp_neg``: error 3e-5; 0 beyond u = 11.1, as Sigma's clipped exp) and 1/S by
    rsqrt on S in [1, T] (the row's max contributes exp(0) = 1).  ``mask`` (public or shared 0/1)
    sets masked keys to MASKED_SCORE before the max.  Domain |s| < 2048 (attention scores measured up to
    |s| ~ 114 at 512 adversarial tokens, ``bench sites``); beyond, where a row's values differ by 4096 or
    more, ``RingOps`` raises ``HeadroomError`` and the secure max may be wrong (never a leak).
    Cost per score: the max (``protocols.maximum`` at k = 28: binary levels of 4 rounds while many values
    remain, then 8-fold levels of 7; BERT-base's 12 x 128 x 128 scores: 23 rounds, 20.5 B per score; a
    decoding step's rows of 64: 14 rounds, 61 B) + exp
    (7 rounds, 93.25 B) + the row's reciprocal + 1 product by it (2 rounds, 32 B); +32 B and 1 round for a
    shared mask."""
    f = ops.frac_bits
    with ops.span("softmax_exp"):
        monitor = ops.monitor
        if monitor is not None:
            monitor.value("softmax_score", ops.output(s), 2.0 ** (SCORE_BITS - 16))
        if mask is not None:  # s where the key is kept, MASKED_SCORE where it is not
            s = ops.add_const(ops.mask(ops.add_const(s, -MASKED_SCORE), mask), MASKED_SCORE)
        m = ops.maximum(s, -1, k=SCORE_BITS + f - 16)
        e, kept = exp_neg(ops, ops.sub(m, s), keep=True)  # its truncation's opening serves the product by 1/S
        public = mask is not None and not _is_shared(mask)
        if public:  # exactly 0 on masked keys (local)
            e = ops.mask(e, mask)
        return _normalise(ops, e, spec, 0.0, kept=kept, mask=mask if public else None)


def _is_shared(v) -> bool:
    return hasattr(v, "session")


#: Extra fractional bits of RMSNorm's rsqrt: LLM residual streams hold massive activations
#: (SmolLM2: |x| up to 2.5e4, mean squares up to 1.1e6, docs/ranges.md), where 1/sqrt(ms) ~ 1e-3
#: would be only 63 ulp at f = 16.
RMS_OUT_BITS = 12
#: Extra fractional bits of RMSNorm's mean square (even): small rows (SmolLM2's smallest mean square is
#: 6e-3, 393 ulp at f = 16) keep their precision; the squares' truncation drops f - 8 bits instead of f.
MS_EXTRA_BITS = 8


def rms_fold(d: int) -> float:
    """The public factor sqrt(d / 2^ceil(log2 d)) that ``rmsnorm(..., scaled=False)`` leaves out (a model
    folds it into the next layer's weights with the norm's gamma)."""
    return math.sqrt(d / 2.0 ** max(0, math.ceil(math.log2(d))))


def rmsnorm(ops, x, spec: RsqrtSpec, eps: float = 1e-6, scaled: bool = True):
    """x rsqrt(mean(x^2) + eps) over the last dim (Llama's RMSNorm; the server's gamma is applied
    privately by the model).  The sum of squares keeps ``MS_EXTRA_BITS`` more fractional bits and is
    divided by 2^ceil(log2 d) (an exact truncation of one value per row; a public product by 1/d
    would need 26 bits of headroom that LLM rows do not leave), so rsqrt runs on
    S = mean(x^2) (d / 2^c) 2^8; its result carries ``RMS_OUT_BITS``, is multiplied per row by the
    public sqrt(d / 2^c), and y = x r / 2^(12 - 4) in the last product's truncation.  x is squared
    without the 2^var_bits scaling of ``layernorm`` (LLM rows need the headroom): |x| < 2^(31 - f)
    = 32768 at f = 16 (the exact truncation's 2^62; ``RingOps`` raises ``HeadroomError`` beyond).
    ``scaled=False`` leaves out the public per-row factor ``rms_fold(d)`` (the result is y / rms_fold(d)):
    a model that folds it into the next weights saves that truncation's round.
    Cost: 1 square + 2 truncations of one value per row (1 with ``scaled=False``) + rsqrt + 1 product."""
    f = ops.frac_bits
    e2 = MS_EXTRA_BITS
    with ops.span("rmsnorm"):
        d = _shape(x)[-1]
        c = max(0, math.ceil(math.log2(d)))
        monitor = ops.monitor
        if monitor is not None:
            monitor.value("rmsnorm_input", ops.output(x), 2.0 ** (31 - f))
        sq, kept = ops.square_keep(x, -e2)  # its opening serves the last product too
        total = ops.truncate(ops.sum(sq, -1, keepdim=True), c)  # mean(x^2) (d / 2^c) 2^e2
        k = d / 2.0**c * 2.0**e2
        r = rsqrt(ops, ops.add_const(total, eps * k), spec.with_(lo=spec.lo * k, hi=spec.hi * k, unit=spec.unit * k,
                                                                out_bits=RMS_OUT_BITS))
        if scaled:
            r = ops.mul_const(r, rms_fold(d))
        ideal = ops.ideal  # there rsqrt is exact, without the 2^RMS_OUT_BITS
        return ops.mul_kept(r, kept, (0 if ideal else RMS_OUT_BITS) - e2 // 2)


def layernorm(ops, x, spec: RsqrtSpec, gamma=None, beta=None, eps: float = 1e-12, var_bits: int = 4):
    """(x - mean) rsqrt(var + eps) gamma + beta over the last dim, for var + eps in spec's domain.

    The centred values are scaled by 2^var_bits (exactly) before squaring, so the variance keeps
    2 var_bits more significant bits (a variance of 1e-3 is only 66 ulp at f = 16):
    (c 2^s) rsqrt(var 4^s) = c rsqrt(var), and rsqrt runs on [4^s lo, 4^s hi].
    ``gamma``/``beta`` here are public (the secure model applies the server's own privately).
    Cost: 2 public products (means) + 1 square + rsqrt + 1 product (+1 for gamma).
    """
    with ops.span("layernorm"):
        d = _shape(x)[-1]
        mean = ops.mul_const(ops.sum(x, -1, keepdim=True), 1.0 / d)
        c = ops.mul_pow2(ops.sub(x, mean), var_bits)
        monitor = ops.monitor
        if monitor is not None:  # squaring c needs |c| 2^f < 2^31 (the exact truncation's 2^62)
            monitor.value("layernorm_centred", ops.output(ops.sub(x, mean)),
                          2.0 ** (31 - var_bits - ops.frac_bits))
        sq, kept = ops.square_keep(c)  # its opening serves the product by the rsqrt too
        var = ops.mul_const(ops.sum(sq, -1, keepdim=True), 1.0 / d)
        k = 4.0**var_bits
        y = ops.mul_kept(rsqrt(ops, ops.add_const(var, eps * k), spec.with_(lo=spec.lo * k, hi=spec.hi * k,
                                                                              unit=spec.unit * k)), kept)
        if gamma is not None:
            y = ops.mul_const(y, gamma)
        if beta is not None:
            y = ops.add_const(y, beta)
        return y


def _shape(v):
    return tuple(v.shape)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def crypten_reciprocal(ops, x, iterations: int = 10):
    """CrypTen's reciprocal for x > 0: Newton y <- y(2 - x y) from y0 = 3 exp(0.5 - x) + 0.003.
    Domain about [0.1, 100] (the guess must stay below 2/x).  Cost: exp + 2 products per step."""
    with ops.span("reciprocal"):
        y = ops.add_const(ops.mul_const(crypten_exp(ops, ops.add_const(ops.neg(x), 0.5)), 3.0), 0.003)
        for _ in range(iterations):
            y = ops.mul(y, ops.add_const(ops.neg(ops.mul(x, y)), 2.0))
        return y


def crypten_inv_sqrt(ops, x, iterations: int = 3):
    """CrypTen's inv_sqrt: y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024, then 3 Newton steps.
    Accurate only on a narrow domain (measured in docs/nonlinear.md).  Cost: exp + 3 products/step."""
    spec = RsqrtSpec(1.0, 2.0, guess="crypten", iterations=iterations)
    return rsqrt(ops, x, spec)


def crypten_softmax(ops, s, mask=None):
    """CrypTen's softmax: exp(s - max) / sum, max by the secure comparison, 1/sum by
    ``crypten_reciprocal``.  Masked keys are set to exp = 0.  Cost: max + exp + reciprocal + product."""
    with ops.span("softmax"):
        e = crypten_exp(ops, ops.sub(s, ops.maximum(s, -1)))
        if mask is not None:
            e = ops.mask(e, mask)
        return ops.mul(e, crypten_reciprocal(ops, ops.sum(e, -1, keepdim=True)))


def quad_gelu(ops, x):
    """MPCFormer's Quad GeLU: 0.125 x^2 + 0.25 x + 0.5 (a trained-in replacement, not an
    approximation of GeLU), computed as 0.125 (x + 1)^2 + 0.375: the 1/8 is folded into the square's
    exact truncation.  Cost: 1 square."""
    with ops.span("quad_gelu"):
        return ops.add_const(ops.square(ops.add_const(x, 1.0), 3), 0.375)


def quad2_softmax(ops, s, mask=None, c: float = 5.0, recip_iterations: int = 10):
    """MPCFormer's 2Quad softmax: (s + c)^2 / sum (s + c)^2 (1/sum by CrypTen's reciprocal, on sums
    scaled by 1/64 to keep it in its domain).  Cost: 1 square + 1 truncation of the row sums +
    reciprocal + 1 product (its truncation also divides by 64)."""
    with ops.span("quad2_softmax"):
        q = ops.square(ops.add_const(s, c))
        if mask is not None:
            q = ops.mask(q, mask)
        total = ops.truncate(ops.sum(q, -1, keepdim=True), 6)
        inv = 1.0 / total if ops.ideal else crypten_reciprocal(ops, total, recip_iterations)
        return ops.mul(q, inv, 6)


def gelu_erf(ops, x, terms: int = 8):
    """GeLU = x (1 + erf(x/sqrt 2))/2 with CrypTen's erf (Taylor series, ``terms`` terms).
    Domain |x| <= 2 (abs error <= 1e-3; 0.025 at |x| = 2.5, 0.6 at |x| = 3: the series diverges).
    Cost: about 2 products per term."""
    with ops.span("gelu_erf"):
        u = ops.mul_const(x, 1 / math.sqrt(2))
        u2 = ops.square(u)
        term, acc = u, u
        for k in range(1, terms):
            term = ops.mul(term, u2)  # u^(2k+1)
            acc = ops.add(acc, ops.mul_const(term, (-1) ** k / (math.factorial(k) * (2 * k + 1))))
        erf = ops.mul_const(acc, 2 / math.sqrt(math.pi))
        return ops.mul(x, ops.add_const(erf, 1.0), 1)


def crypten_sigmoid(ops, v, recip_iterations: int = 10):
    """CrypTen's sigmoid: with d = [v >= 0] (secure comparison), s = 1/(1 + exp(-|v|)) by
    ``crypten_reciprocal`` on (1, 2], then d ? s : 1 - s.  Domain |v| <= 256 (the limit exp).
    Cost: drelu + 2 selects + exp + reciprocal."""
    with ops.span("sigmoid"):
        d = ops.drelu(v)
        pos = ops.select(d, v, ops.neg(v))
        s = crypten_reciprocal(ops, ops.add_const(crypten_exp(ops, ops.neg(pos)), 1.0), recip_iterations)
        return ops.select(d, s, ops.add_const(ops.neg(s), 1.0))


def sigmoid(ops, v, recip_iterations: int = 4):
    """1/(1 + exp(-|v|)) mirrored by the sign of v, as CrypTen's sigmoid, but the reciprocal of
    w = 1 + exp(-|v|), which lies in (1, 2], is Newton y <- y (2 - w y) from the public y0 = 2/3:
    |1 - w y0| <= 1/3 squares each step, so 4 steps reach 2e-8 (CrypTen's general reciprocal needs
    an exp for its guess and 10 steps).  Domain |v| <= 256 (the limit exp).
    Cost: drelu + 2 selects + exp + 4 steps of 2 products (16 rounds, 384 B/element)."""
    with ops.span("sigmoid"):
        d = ops.drelu(v)
        pos = ops.select(d, v, ops.neg(v))
        w = ops.add_const(crypten_exp(ops, ops.neg(pos)), 1.0)
        y = ops.const_like(w, 2.0 / 3.0)
        for _ in range(recip_iterations):
            y = ops.mul(y, ops.add_const(ops.neg(ops.mul(w, y)), 2.0))
        return ops.select(d, y, ops.add_const(ops.neg(y), 1.0))


def gelu_tanh(ops, x):
    """GPT-2's gelu_new 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) = x sigmoid(2 sqrt(2/pi)(...)),
    with CrypTen's sigmoid.  Domain |x| <= 12 (abs error <= 2e-3; the limit exp needs |u| <= 256).
    Cost: 2 products + sigmoid + 1 product."""
    with ops.span("gelu_tanh"):
        x3 = ops.mul(ops.square(x), x)
        u = ops.mul_const(ops.add(x, ops.mul_const(x3, 0.044715)), 2 * math.sqrt(2 / math.pi))
        return ops.mul(x, crypten_sigmoid(ops, u))


def relu2_softmax(ops, s, mask, spec: RsqrtSpec, eps: float = 1e-2):
    """2ReLU softmax with an exact ReLU by the secure comparison (the baseline for Comet's)."""
    return relu_softmax(ops, s, mask, spec, eps=eps, relu="full")
