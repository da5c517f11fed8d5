"""SMU by one narrow comparison, a thermometer of public knots and one product (no rsqrt).

SMU(x; mu) = (x + sqrt(x^2 + mu^2))/2 = mu SMU1(x/mu), with SMU1(v) = ReLU(v) + g(|v|) and
g(u) = (sqrt(u^2 + 1) - u)/2, which falls from 1/2 at 0 like 1/(4u).  The secure model folds the
server's per-channel mu into its own weights (the FFN's up-projection divided by mu, the
down-projection multiplied by it: ``nn.prepare_params``), so only SMU1, a public function, runs on
shares.  g is replaced by its best line on each of 24 segments between public knots (max error
5.0e-4, i.e. 5.0e-4 mu after the fold), and a constant above the last knot, 2048:

    SMU1(v) ~ A(|v|) + (b + B(|v|)) |v|,   b = [v >= 0],

where A and B are public linear combinations of the thermometer bits [|v| >= knot_j].  On shares:
``drelu_select`` of v (the sign b and b v in the sign test's rounds; |v| = 2 b v - v), |v| truncated to
8 fractional bits (the knots lie on that grid; ``truncate_keep``: that opening also masks |v| for the last
product), ``compare_many`` against the 24 knots at width 20, and one product.  The
float backend computes the same segments (fine-tuning trains exactly what runs privately).

Precision of the fold: the down-projection's weights mu W are encoded on the 2^-f grid like every
weight, and multiply SMU1 = SMU / mu, so that product's rounding error is 1/mu times larger than
W's on SMU (2.75x at the default mu = 0.363, 10x at the smallest trained mu, 0.1); the up-projection's
W / mu gains the same factor in relative precision.  The private-against-simulation agreement of the
accuracy benchmark includes it.

The knots came from a greedy cover of [0, 2048] by chords within 1e-3 of g, rounded down to the
2^-8 grid; each segment's line is its chord lowered by half the chord's largest gap (the minimax
line of a convex function).  ``tests/test_segments.py`` checks the knots' grid, each line's error and slope.
"""

from __future__ import annotations

import torch

#: Knots of the segments of g (the 2^-8 grid; 0 is the first, no comparison is needed for it).
KNOTS = (0.0, 0.125, 0.25390625, 0.38671875, 0.53125, 0.69140625, 0.87109375, 1.078125, 1.32421875,
         1.62109375, 1.9921875, 2.47265625, 3.11328125, 4.00390625, 5.30078125, 7.30859375, 10.67578125,
         16.99609375, 31.1328125, 63.265625, 127.53125, 256.0625, 513.125, 1027.25, 2048.0)
#: g ~ ALPHA[j] + BETA[j] u on [KNOTS[j], KNOTS[j+1]); the last pair holds above the last knot.
ALPHA = (0.4995150262, 0.4917875582, 0.4767330627, 0.4550803908, 0.4273681376, 0.3948803651, 0.3590421206,
         0.32099111, 0.2820450684, 0.2433811963, 0.2057241169, 0.1699174271, 0.1366827104, 0.1065157823,
         0.07978782508, 0.05673233624, 0.03751110903, 0.02221388488, 0.0116204111, 0.005738745537, 0.00285169681,
         0.001421453375, 0.0007096309439, 0.0003550793518, 6.103515261e-05)
BETA = (-0.4688711259, -0.4071086451, -0.3477531356, -0.2917990437, -0.2396501191, -0.1926568439, -0.1515136996,
        -0.1162240983, -0.08680844013, -0.06295881706, -0.04405911048, -0.0295779782, -0.01890333398,
        -0.01136887637, -0.006326710008, -0.003172186088, -0.001371734915, -0.0004717156393, -0.0001268702072,
        -3.098192047e-05, -7.655362403e-06, -1.902689661e-06, -4.742856263e-07, -1.188320874e-07, 0.0)
#: The largest |segment line - g| (the minimax error of the chords' cover at 1e-3).
MAX_ERROR = 5.0e-4

#: Width of the sign test of v = x / mu at f = 16 (V_BITS + f - 16 in general): |v| < 4096 (the largest measured
#: is 452: |x| <= 45 on real and adversarial inputs, mu >= 0.1; bench/results/sites.md).
V_BITS = 28
#: Fractional bits of |v| in the knot comparisons (the knots' grid).
KNOT_FRAC_BITS = 8
#: Extra fractional bits of the slope b + B (its smallest steps are 1e-7; |v| up to 2^12 multiplies
#: them): the product's truncation drops them again.
SLOPE_EXTRA_BITS = 12


def g(u):
    """The exact correction (sqrt(u^2 + 1) - u)/2 (float reference)."""
    return (torch.sqrt(u * u + 1) - u) / 2


def segments_ref(v: torch.Tensor) -> torch.Tensor:
    """SMU1 by the segments, in float64 (the reference the backends are tested against)."""
    u = v.abs()
    j = torch.bucketize(u, torch.tensor(KNOTS[1:], dtype=u.dtype), right=True)
    return torch.relu(v) + torch.tensor(ALPHA, dtype=u.dtype)[j] + torch.tensor(BETA, dtype=u.dtype)[j] * u


def _increments(values, frac_bits: int) -> list[float]:
    """Thermometer weights w_j = (enc(values[j + 1]) - enc(values[j])) / 2^f, enc(v) = round(v 2^f): with
    the bits of the first j knots set, values[0] + sum of their w is exactly enc(values[j]) / 2^f, one
    encoding per segment."""
    enc = [round(v * 2.0**frac_bits) for v in values]
    return [(b - a) * 2.0**-frac_bits for a, b in zip(enc[:-1], enc[1:], strict=True)]


def sign_relu_abs(ops, v, site: str, frac_bits: int):
    """(b, ReLU(v), |v|) with b = [v >= 0] and b v by ``drelu_select`` at width V_BITS + f - 16 (|v| < 4096),
    and |v| = 2 b v - v; ``site`` names the range in a DomainMonitor.
    Cost: 4 rounds, 18.25 B/element."""
    monitor = ops.monitor
    if monitor is not None:  # the sign test's range (bench sites)
        monitor.value(site, ops.output(v), 2.0 ** (V_BITS - 16))
    v, b, bv = ops.sign_mask(v, V_BITS + frac_bits - 16)  # v: truncated here if it came as a pending product
    return b, bv, ops.sub(ops.mul_pow2(bv, 1), v)


def smu1_segments(ops, v, frac_bits: int | None = None):
    """SMU1(v) = ReLU(v) + g(|v|) by the segments, for |v| < 2^(V_BITS - 16) = 4096 (the sign test's
    range at every f; the simulation raises ``HeadroomError`` beyond it, the secure path would wrap).
    Needs 8 <= f <= 18 (the knots' grid; the last product's 2^(2f + 12) scale below the truncation's 2^62).

    Cost: drelu_select at k = 28 (4 rounds, 18.25 B: the sign and b v) + 1 truncation (1 round, 16 B; it
    keeps its opening of |v|) + compare_many of 24 knots at k = 20 (4 rounds, 8 B + 24 x 1.25 B) + 1 product
    with |v| (``mul_kept``: 2 rounds, 32 B): 11 rounds, 104.25 B/element.
    """
    f = ops.frac_bits if frac_bits is None else frac_bits
    if not KNOT_FRAC_BITS <= f <= 18:
        raise ValueError(f"SMU by segments needs 8 <= f <= 18 fractional bits, got {f}")
    drop = f - KNOT_FRAC_BITS
    e = SLOPE_EXTRA_BITS
    with ops.span("smu"):
        b, bv, av = sign_relu_abs(ops, v, "smu_ratio", f)
        coarse, kept = ops.truncate_keep(av, drop)  # |v| at 8 fractional bits; its opening serves the last product
        fs = f + e
        a, slope = ops.thermometer(coarse, [k * 2.0**-drop for k in KNOTS[1:]], KNOT_FRAC_BITS + V_BITS - 16,
                                   [_increments(ALPHA, f), [w * 2**e for w in _increments(BETA, fs)]])
        a = ops.add_const(a, round(ALPHA[0] * 2**f) * 2.0**-f)
        slope = ops.add(slope, ops.weighted_bits(b[..., None], [2.0**e]))
        slope = ops.add_const(slope, round(BETA[0] * 2**fs) * 2.0**-f)
        return ops.add(a, ops.mul_kept(slope, kept, e))


def fold_mu(w_up: torch.Tensor, b_up: torch.Tensor, w_down: torch.Tensor, mu) -> tuple:
    """The FFN's weights with SMU's mu folded in: up / mu (columns), down * mu (rows), so that
    down(SMU(up(h); mu)) = (down mu)(SMU1(up(h) / mu)).  ``mu`` is a number or a per-channel tensor;
    differentiable (fine-tuning trains mu through it)."""
    if not isinstance(mu, torch.Tensor):
        mu = torch.tensor(float(mu), dtype=w_up.dtype)
    if bool((mu <= 0).any()):
        raise ValueError("SMU's mu must be positive to be folded into the weights")
    return w_up / mu, b_up / mu, w_down * mu.reshape(-1, 1) if mu.dim() else w_down * mu


__all__ = ["KNOTS", "ALPHA", "BETA", "MAX_ERROR", "V_BITS", "g", "segments_ref", "sign_relu_abs", "smu1_segments",
           "fold_mu"]
