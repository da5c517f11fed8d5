"""The original nonlinearities on shares: GeLU (erf and tanh), SiLU and exp by degree-2 splines.

Each activation is written as ReLU plus an even correction, f(x) = ReLU(x) + g(|x|):

* GeLU (erf):  g(u) = -u Phi(-u)                       (BERT, RoBERTa, MiniLM)
* GeLU (tanh): g(u) = -u sigmoid(-2 sqrt(2/pi)(u + 0.044715 u^3))   (GPT-2's gelu_new)
* SiLU:        g(u) = -u sigmoid(-u)                   (Llama's SwiGLU gate)

and softmax's exp(s - max) is e(u) = exp(-u) of u = max - s >= 0 (no sign test).  Each g falls
below half the tolerance beyond a public cut U (4.5 for GeLU, 13.7 for SiLU, 11.1 for exp) and is 0
there; below it, g is a quadratic on each of 13 to 17 segments between public knots on the 2^-8 grid:

    g(u) ~ c0(u) + u (c1(u) + u c2(u)),   c_k(u) = c_k[j] for u in [knot_j, knot_j+1),

where each c_k(u) is a public linear combination of the thermometer bits [u >= knot_j] (one
``compare_many`` serves all three).  On shares (``activation``): ``drelu_narrow`` of x, one product b x
(ReLU(x), and |x| = 2 b x - x), |x| truncated to 8 fractional bits (the knots' grid), the knot
comparisons at width 20, and Horner's two products.  For exp (``exp_neg``) the sign test and b x are
not needed.  Sigma (Gupta et al., PETS 2024) evaluates the same corrections by lookup tables on a
truncated |x|; splines trade its 2^k-entry tables for a dozen comparisons and two products.

Accuracy: each table's largest error against the exact function on a dense grid (``max_error``,
3.0e-5 = 2 ulp at f = 16, before the fixed-point rounding of the evaluation: a few ulp more;
``tests/test_splines.py``).  Each segment's quadratic is fitted (Lawson's iteratively reweighted least
squares, a near-minimax fit) on the segment widened by one grid step on each side, so a truncation
that lands one grid step low (the exact truncation may drop a borrow) picks a neighbour that is
still within the tolerance.  The tables came from ``fit_table`` (run ``python -m
cometpi.approx.splines`` to print them again); they are stored so both parties use the same public
constants on every machine.

Domain: |x| < 2^(V_BITS - 16) = 4096 (the sign test's width at f = 16; ``RingOps`` raises
``HeadroomError`` beyond), u < 2^13 for exp.  Needs 8 <= f <= 18.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .segments import KNOT_FRAC_BITS, V_BITS, _increments, sign_relu_abs


@dataclass(frozen=True)
class SplineTable:
    """g ~ c0 + c1 u + c2 u^2 with (c0, c1, c2) = coeffs[j] on [knots[j], knots[j + 1]); 0 beyond the last knot."""

    knots: tuple[float, ...]
    coeffs: tuple[tuple[float, float, float], ...]
    max_error: float

    def __post_init__(self):
        if len(self.coeffs) != len(self.knots) - 1 or self.knots[0] != 0.0:
            raise ValueError("a spline table needs knots[0] = 0 and one coefficient triple per segment")


TABLES = {
    'gelu': SplineTable(
        knots=(0.0, 0.28515625, 0.4921875, 0.68359375, 0.8671875, 1.0546875, 1.25390625, 1.4765625, 1.75390625,
               2.359375, 2.73828125, 3.16015625, 3.73046875, 4.5078125),
        coeffs=((-2.880464542e-05, -0.4985206901, 0.3890262885),
                (-0.004009316834, -0.4711011304, 0.3413188032),
                (-0.01962179568, -0.4079680982, 0.2773353424),
                (-0.05270615639, -0.3112374131, 0.206549713),
                (-0.1061521767, -0.1880693157, 0.1355389153),
                (-0.1803810396, -0.04734521524, 0.06880761588),
                (-0.2707183921, 0.09677867995, 0.01129834626),
                (-0.3651506716, 0.2247897707, -0.03210382969),
                (-0.4237422364, 0.2930103075, -0.05195195869),
                (-0.3282805748, 0.2122361004, -0.03485666805),
                (-0.1981928156, 0.1171986623, -0.01749244058),
                (-0.07875150413, 0.04149480517, -0.005491822822),
                (-0.01426341308, 0.006478548125, -0.0007365476093)),
        max_error=3e-05),
    'gelu_tanh': SplineTable(
        knots=(0.0, 0.28515625, 0.4921875, 0.68359375, 0.8671875, 1.0546875, 1.25390625, 1.4765625, 1.75390625,
               2.375, 2.75390625, 3.171875, 3.73828125, 4.30859375),
        coeffs=((-2.89357121e-05, -0.4985138668, 0.3889798779),
                (-0.004023471127, -0.4709949972, 0.341094708),
                (-0.01965965975, -0.4077613353, 0.2770044033),
                (-0.05270719336, -0.3111324378, 0.2062889447),
                (-0.1059419067, -0.1884455927, 0.1355523074),
                (-0.1797027606, -0.04860512835, 0.06923830489),
                (-0.2694350485, 0.09455087428, 0.0121162646),
                (-0.3637799769, 0.2224235815, -0.03123227683),
                (-0.4252612804, 0.293813691, -0.0519492124),
                (-0.3290721691, 0.2129645749, -0.03495178344),
                (-0.1963434532, 0.1165492347, -0.01743612699),
                (-0.07359831116, 0.03904237176, -0.005195804683),
                (-0.0137544882, 0.006446085154, -0.0007562542371)),
        max_error=3e-05),
    'silu': SplineTable(
        knots=(0.0, 0.38671875, 0.66796875, 0.9296875, 1.18359375, 1.4453125, 1.72265625, 2.02734375, 2.375, 2.8125,
               3.5703125, 4.35546875, 5.1015625, 5.93359375, 6.94140625, 8.2890625, 10.42578125, 13.73046875),
        coeffs=((-2.995511017e-05, -0.4988607492, 0.2443444115),
                (-0.004189327751, -0.4777231687, 0.2171893949),
                (-0.02025279394, -0.4298594592, 0.1814369631),
                (-0.05394910404, -0.357433307, 0.1424689722),
                (-0.1082009504, -0.2658471431, 0.1037849949),
                (-0.1836348376, -0.1614875749, 0.06766945147),
                (-0.2769448398, -0.05314490171, 0.03620474913),
                (-0.3805706253, 0.04915326969, 0.01094650507),
                (-0.4827935231, 0.1353010316, -0.007212244846),
                (-0.5626913602, 0.1922926044, -0.0173817976),
                (-0.547860835, 0.1850723821, -0.01652299712),
                (-0.4527123852, 0.1414151272, -0.0115123251),
                (-0.334506275, 0.09506118172, -0.00696588537),
                (-0.2153131477, 0.05485182945, -0.003573214937),
                (-0.1120787892, 0.0250627301, -0.001423088396),
                (-0.03859530209, 0.007275224349, -0.0003458503998),
                (-0.006268798501, 0.0009450916162, -3.571929793e-05)),
        max_error=3e-05),
    'exp': SplineTable(
        knots=(0.0, 0.1796875, 0.3671875, 0.56640625, 0.78125, 1.01171875, 1.265625, 1.54296875, 1.84765625, 2.1875,
               2.57421875, 3.01953125, 3.54296875, 4.1796875, 4.9921875, 6.11328125, 7.92578125, 11.109375),
        coeffs=((0.9999706346, -0.9970713547, 0.4565463408),
                (0.9974962453, -0.9698949962, 0.3807585161),
                (0.988472885, -0.9208605793, 0.3138543157),
                (0.9696465912, -0.854474576, 0.2552064198),
                (0.9386125125, -0.7750352085, 0.2043030067),
                (0.8936586831, -0.6862352026, 0.1604082628),
                (0.8338485985, -0.5917068211, 0.1230303785),
                (0.7600824382, -0.4960569282, 0.09200487882),
                (0.6737867062, -0.4026187262, 0.06669838752),
                (0.5768547404, -0.3139775404, 0.04642350598),
                (0.4725749598, -0.2329186623, 0.03066383316),
                (0.3657883451, -0.1621373761, 0.01892929831),
                (0.261897824, -0.1034405897, 0.01063443561),
                (0.1670205985, -0.05798564667, 0.005187105958),
                (0.08804589643, -0.02628440868, 0.002003612863),
                (0.031831923, -0.007826572667, 0.00048696279),
                (0.005318445063, -0.001003812679, 4.750613606e-05)),
        max_error=3e-05),
}

#: Extra fractional bits of Horner's coefficients c1 and c2 (their small tail values keep their
#: precision; each product's truncation drops the difference).
COEFF_EXTRA_BITS = (0, 8, 12)
#: Width of exp's knot comparisons: u < 2^13 at 8 fractional bits (u = max - s with |s| < 4096).
EXP_U_BITS = 13

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
#: The exact corrections (float64 references; the tables were fitted to them).
REFERENCES = {
    "gelu": lambda u: -u * torch.special.ndtr(-u),
    "gelu_tanh": lambda u: -u * torch.sigmoid(-2 * SQRT_2_OVER_PI * (u + 0.044715 * u**3)),
    "silu": lambda u: -u * torch.sigmoid(-u),
    "exp": lambda u: torch.exp(-u),
}
#: HF activation names -> table.
ACTIVATION_TABLES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}


def table_for(activation: str) -> SplineTable:
    try:
        return TABLES[ACTIVATION_TABLES[activation]]
    except KeyError:
        raise ValueError(f"no spline for activation {activation!r}; known: {sorted(ACTIVATION_TABLES)}") from None


def spline_ref(table: SplineTable, u: torch.Tensor) -> torch.Tensor:
    """The table's g(u) in float64 (what the backends compute, without fixed-point rounding)."""
    u = u.to(torch.float64)
    j = torch.bucketize(u, torch.tensor(table.knots[1:], dtype=torch.float64), right=True)
    c = torch.tensor((*table.coeffs, (0.0, 0.0, 0.0)), dtype=torch.float64)[j]
    return c[..., 0] + u * (c[..., 1] + u * c[..., 2])


def coeff_extra_bits(f: int) -> tuple[int, int, int]:
    """``COEFF_EXTRA_BITS`` within the one-truncation polynomial's headroom (3f + e2 <= 60: |g| < 4)."""
    return tuple(min(e, 60 - 3 * f) for e in COEFF_EXTRA_BITS)


def eval_spline(ops, u, table: SplineTable, k: int, keep: bool = False):
    """g(u) for u >= 0 (a backend value at f fractional bits) with |u| < 2^(k - 8) and |g| < 4: u truncated
    to the knots' grid by a truncation whose opening also serves the polynomial (``truncate_poly``),
    ``thermometer`` against the knots at width k, then c0 + c1 u + c2 u^2 summed exactly and truncated once
    (``poly_kept``).
    Cost: 1 truncation (1 round, 16 B) + compare_many of len(knots) - 1 thresholds at width k + 1 round of
    two masked coefficients (32 B) + 1 truncation (1 round, 16 B): at k = 20, 7 rounds, 72 B + 1.25 B per
    knot (against Horner's two products with truncations: 9 rounds, 120 B + 1.25 B per knot).  ``keep``:
    (g, a handle for one later product of g by a row's statistic, ``ops.mul_kept``)."""
    f = ops.frac_bits
    if not KNOT_FRAC_BITS <= f <= 18:
        raise ValueError(f"splines need 8 <= f <= 18 fractional bits, got {f}")
    drop = f - KNOT_FRAC_BITS
    coarse, kept = ops.truncate_poly(u, drop)
    extra = coeff_extra_bits(f)
    cols = list(zip(*table.coeffs, strict=True))  # (c0s, c1s, c2s)
    weights = [[w * 2**e for w in _increments((*col, 0.0), f + e)] for col, e in zip(cols, extra, strict=True)]
    c0, c1, c2 = ops.thermometer(coarse, [t * 2.0**-drop for t in table.knots[1:]], k, weights)
    c0, c1, c2 = (ops.add_const(c, round(col[0] * 2 ** (f + e)) * 2.0**-f)
                  for c, col, e in zip((c0, c1, c2), cols, extra, strict=True))
    return ops.poly_kept(kept, c0, c1, c2, extra, keep=keep)


def activation(ops, x, name: str):
    """An original activation (``ACTIVATION_TABLES``: gelu, gelu_new, gelu_pytorch_tanh, silu) as
    ReLU(x) + g(|x|), for |x| < 4096.
    Cost: drelu_select at k = 28 (4 rounds, 18.25 B) + ``eval_spline`` at k = 20: 11 rounds, 90.25 B
    + 1.25 B per knot (GeLU 106.5 B, SiLU 111.5 B)."""
    table = table_for(name)
    f = ops.frac_bits
    with ops.span("spline_act"):
        _, relu, u = sign_relu_abs(ops, x, "activation_input", f)
        return ops.add(relu, eval_spline(ops, u, table, KNOT_FRAC_BITS + V_BITS - 16))


def exp_neg(ops, u, keep: bool = False):
    """exp(-u) for 0 <= u < 2^13 (softmax's exp(s - max)); 0 for u >= 11.1.
    Cost: ``eval_spline`` of 17 knots at k = 21 (the comparison 4 rounds, 8 B + 17 x 1.25 B):
    7 rounds, 93.25 B/element."""
    with ops.span("exp"):
        return eval_spline(ops, u, TABLES["exp"], KNOT_FRAC_BITS + EXP_U_BITS, keep=keep)


GRID = 2.0**-KNOT_FRAC_BITS


def _fit_segment(fn, a: float, b: float, degree: int):
    x = torch.linspace(max(0.0, a - GRID), b + GRID, 400, dtype=torch.float64)
    y = fn(x)
    v = torch.stack([x**i for i in range(degree + 1)], 1)
    w = torch.ones_like(x)
    for _ in range(40):  # Lawson's algorithm: weights grow where the error is largest
        sw = w.sqrt()
        c = torch.linalg.lstsq(v * sw[:, None], y * sw).solution
        err = (v @ c - y).abs()
        w = w * err / (w * err).sum()
    c = torch.tensor([float(f"{t:.10g}") for t in c], dtype=torch.float64)
    return c, float((v @ c - y).abs().max())


def fit_table(name: str, degree: int = 2, tol: float = 3e-5) -> SplineTable:
    """A greedy cover of [0, U] by the longest segments on the grid whose fit stays within ``tol``; U is
    where |g| stays below tol / 2 for good."""
    fn = REFERENCES[name]
    grid = torch.arange(0, 64, GRID, dtype=torch.float64)
    cut = float(grid[(fn(grid).abs() >= tol / 2).nonzero().max()]) + GRID
    knots, coeffs, a, worst = [0.0], [], 0.0, 0.0
    while a < cut:
        lo, hi = 1, int(round((cut - a) / GRID))
        while lo < hi:  # the most grid steps whose fit is within tol
            mid = (lo + hi + 1) // 2
            if _fit_segment(fn, a, a + mid * GRID, degree)[1] <= tol:
                lo = mid
            else:
                hi = mid - 1
        c, err = _fit_segment(fn, a, a + lo * GRID, degree)
        worst, a = max(worst, err), a + lo * GRID
        knots.append(a)
        coeffs.append(tuple(float(t) for t in c))
    assert worst <= tol
    return SplineTable(tuple(knots), tuple(coeffs), tol)


if __name__ == "__main__":
    for _name in REFERENCES:
        print(_name, fit_table(_name))

__all__ = ["SplineTable", "TABLES", "REFERENCES", "ACTIVATION_TABLES", "table_for", "spline_ref", "eval_spline",
           "activation", "exp_neg", "fit_table", "coeff_extra_bits"]
