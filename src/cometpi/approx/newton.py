"""Inverse square root by Newton's method with a pluggable initial guess (../shared/COMET.md §4).

The guess strategies (``Guess``):

* ``comet``: flood-reshare x so the client holds R ~ U[F, 2F) with F = x_max 2^sigma, compute each
  party's factor 2^(-1/4)|s_j|^(-1/4) locally (bit trick or pow), multiply the two private factors.
  sigma is the statistical security of the flood: the server's share x - R is within statistical
  distance |x - x'|/F <= 2^-sigma of the one for any other x' in the domain.
* ``constant``: the public guess 1/sqrt(2 x_max): no round, no leak.
* ``crypten``: CrypTen's y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024 (exp by the limit, 8 squarings).
* ``thermometer``: a secure *informative* guess: the octave of x from one narrow comparison opening
  against every power of two 2^i of the domain (``protocols.compare_many``: one small-ring opening,
  one-time truth tables, a short AND tree per threshold), then y0 = 2^(-(e + 1/2)/2) as a public
  linear combination of the thermometer bits.  With ``per_octave`` = 4 thresholds per octave (the
  default) t0 lies in [2^(-1/16), 2^(1/16)] and 2 Newton steps reach 1e-3 (one per octave: [2^(-1/4),
  2^(1/4)], 3 steps); the thresholds cost bytes, not rounds.  Nothing is opened but uniform values: no
  leakage, no sigma.
* ``insecure_comet_small_flood``: Comet's guess with the prototype's small flood (F = 50 by default),
  which converges in a few steps because the guess then depends on x: it leaks x's magnitude.
  Reproduction only; it warns once and reports its (tiny or negative) sigma.

The Newton iteration count is derived from the declared domain and the target relative error unless
given: the worst initial t0 = y0 sqrt(x) over the domain (and over the flood) is pushed through the
scalar map t <- t (3 - t^2)/2 until |1 - t| <= target.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..insecure import _WARNED, warn_insecure_once  # noqa: F401 - re-exported (nn, tests)
from ..protocols.compare import TABLE_BYTES
from .guess import bit_trick_error, iterations_for
from .segments import _increments


def crypten_exp(ops, x, n: int = 8):
    """CrypTen's exp: (1 + x/2^n)^(2^n).  Accurate for x in about [-8, 2] (error grows with |x|); here for
    the crypten guess, and re-exported by ``functions`` for the baselines.
    Cost: 1 truncation + n squarings (exact truncation: 2n + 1 rounds, 32n + 16 B/element)."""
    with ops.span("exp"):
        y = ops.add_const(ops.truncate(x, n), 1.0)
        for _ in range(n):
            y = ops.square(y)
        return y


class Guess(enum.StrEnum):
    COMET = "comet"
    CONSTANT = "constant"
    CRYPTEN = "crypten"
    THERMOMETER = "thermometer"
    INSECURE_COMET_SMALL_FLOOD = "insecure_comet_small_flood"


class NewtonForm(enum.StrEnum):
    """``three_mul``: a = x y; b = a y; y' = y (3 - b)/2 (3 rounds, accurate).
    ``two_round``: (x y, y^2) in one round, then b = (x y) y^2; y' = (3y - b)/2 (2 rounds; loses
    accuracy for large x at small f, since y^2 ~ 1/x underflows)."""

    THREE_MUL = "three_mul"
    TWO_ROUND = "two_round"


@dataclass(frozen=True)
class RsqrtSpec:
    """How to compute 1/sqrt(x) for x in the declared domain [lo, hi]."""

    lo: float
    hi: float
    guess: Guess = Guess.COMET
    sigma: float = 40.0
    flood: float | None = None  # F for the insecure mode (default 50)
    iterations: int | None = None
    target: float = 1e-3
    form: NewtonForm = NewtonForm.THREE_MUL
    bit_trick: bool = True
    site: str = ""  # the call site's name (``approx.sites``), for range reports
    unit: float = 1.0  # the call site's own values are x / unit (LayerNorm runs rsqrt on scaled variances)
    out_bits: int = 0  # extra fractional bits kept in the result (y 2^out_bits): small 1/sqrt(x) keep precision
    #: the thermometer's thresholds per octave: 4 puts t0 within 2^(+-1/16) (2 Newton steps to 1e-3 instead of
    #: 3 from one per octave), at 4x the thresholds of one comparison opening (the same rounds)
    per_octave: int = 4
    #: bytes of the thermometer comparison's one-time tables per element (``protocols.compare.chunk_bits``):
    #: call sites with one value per row allow ``ROW_TABLE_BYTES`` (fewer rounds for few values)
    table_bytes: int = TABLE_BYTES

    def __post_init__(self):
        object.__setattr__(self, "guess", Guess(self.guess))
        object.__setattr__(self, "form", NewtonForm(self.form))
        if not 0 < self.lo < self.hi:
            raise ValueError(f"rsqrt domain must satisfy 0 < lo < hi, got [{self.lo}, {self.hi}]")
        if not 1 <= self.per_octave <= 64:
            raise ValueError(f"per_octave must be 1..64 thermometer thresholds per octave, got {self.per_octave}")

    def with_(self, **kw) -> RsqrtSpec:
        return replace(self, **kw)

    @property
    def insecure(self) -> bool:
        return self.guess == Guess.INSECURE_COMET_SMALL_FLOOD

    def flood_size(self) -> float | None:
        if self.guess == Guess.COMET:
            return self.hi * 2.0**self.sigma
        if self.insecure:
            return self.flood if self.flood is not None else 50.0
        return None

    def security_bits(self) -> float | None:
        """sigma of the flood (None: the guess floods nothing and leaks nothing)."""
        F = self.flood_size()
        return None if F is None else math.log2(F / self.hi)

    def octaves(self) -> tuple[int, int]:
        """(e_min, e_max) of the thermometer guess: thresholds 2^(i/per_octave) between 2^e_min and
        2^(e_max + 1), so the guess is informative on [2^e_min, 2^(e_max + 1)), which covers [lo, hi]
        with a margin."""
        return math.floor(math.log2(self.lo)), math.ceil(math.log2(self.hi))

    def _buckets(self, frac_bits: int) -> list[float]:
        """The thermometer's bucket edges: 2^e_min, the thresholds 2^(e_min + j/per_octave) on the
        fixed-point grid (so the simulation compares against exactly what the shares do; duplicates
        that the grid merges dropped), 2^(e_max + 1)."""
        e_min, e_max = self.octaves()
        s, grid = self.per_octave, 2.0**frac_bits
        inner = sorted({round(2.0 ** (e_min + j / s) * grid) / grid for j in range(1, (e_max + 1 - e_min) * s)})
        return [2.0**e_min, *[t for t in inner if 2.0**e_min < t < 2.0 ** (e_max + 1)], 2.0 ** (e_max + 1)]

    def thermometer(self, frac_bits: int = 16) -> tuple[list[float], list[float], float, int]:
        """(thresholds, weights, base, k): y0 = base + sum_i [x >= thresholds_i] weights_i, and the
        comparisons' width k (|x - t| < 2^k for 0 <= x < 2^(e_max + 1)).  On the bucket [E_j, E_j+1)
        y0 = (E_j E_j+1)^(-1/4), the geometric middle: t0 within (E_j+1 / E_j)^(+-1/4)."""
        edges = self._buckets(frac_bits)
        w = [(a * b) ** -0.25 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        weights = [w[j + 1] - w[j] for j in range(len(w) - 1)]
        return edges[1:-1], weights, w[0], self.octaves()[1] + 1 + frac_bits

    def t0_bounds(self, frac_bits: int = 16) -> tuple[float, float]:
        """The smallest and largest t0 = y0 sqrt(x) over the domain (and the flood's range)."""
        lo, hi = self.lo, self.hi
        if self.guess == Guess.THERMOMETER:
            edges = self._buckets(frac_bits)
            t = [(y, max(a, lo), min(b, hi)) for a, b in zip(edges[:-1], edges[1:], strict=True)
                 for y in [(a * b) ** -0.25] if a < hi and b > lo]
            return min(y * math.sqrt(a) for y, a, _ in t), max(y * math.sqrt(b) for y, _, b in t)
        if self.guess == Guess.CONSTANT:
            return math.sqrt(lo / (2 * hi)), math.sqrt(0.5)
        if self.guess == Guess.CRYPTEN:
            x = np.geomspace(lo, hi, 100_001)
            t = (2.2 * np.exp(-(x / 2 + 0.2)) + 0.2 - x / 1024) * np.sqrt(x)
            return float(t.min()), float(t.max())
        F = self.flood_size()
        if hi >= F:
            raise ValueError(f"the domain's top {hi:g} reaches the flood F = {F:g}: the guess can diverge")
        m, M = bit_trick_error() if self.bit_trick else (1.0, 1.0)

        def t(r, x):  # y0 = (r (r - x))^(-1/4) / sqrt(2)
            return math.sqrt(x) * (r * (r - x)) ** -0.25 / math.sqrt(2)

        return t(2 * F, lo) * m * m, t(F, hi) * M * M

    def n_iterations(self, frac_bits: int = 16) -> int:
        if self.iterations is not None:
            return self.iterations
        return iterations_for(*self.t0_bounds(frac_bits), self.target)

    def guess_scale(self, frac_bits: int) -> int:
        """m such that Newton runs on Y = y 2^m: a flooded guess y0 ~ 1/sqrt(3F) would underflow the
        fixed-point grid at sigma ~ 40 (2^-23 at f = 16), so it is carried with m extra bits while
        every product stays below 2^61 before truncation.  Raises if the guess still underflows."""
        F = self.flood_size()
        if F is None:
            return 0
        lo, hi = self.lo, self.hi
        want = max(0, math.ceil(-4 + 0.5 * math.log2(3 * F)))  # Y0 around 2^-4

        def fits(m):  # largest product before truncation, with Y <= 1.5 2^m / sqrt(x) elementwise
            worst = [1.5 * math.sqrt(hi) * 2**m, 2.25 * 2**m]  # x Y, then (x Y 2^-m) Y
            if self.form == NewtonForm.TWO_ROUND:
                worst += [2.25 / lo * 4**m]  # Y Y
            return math.log2(max(worst)) + 2 * frac_bits < 61

        m = want
        while m > 0 and not fits(m):
            m -= 1
        t_min, _ = self.t0_bounds()
        if t_min / math.sqrt(lo) * 2.0 ** (m + frac_bits) < 4:  # smallest Y0, in ulp
            raise ValueError(f"the {self.guess.value} guess (sigma = {self.security_bits():.1f}) underflows the "
                             f"fixed-point grid at f = {frac_bits} over [{lo:g}, {hi:g}]: use more fractional "
                             f"bits, a narrower domain or a smaller flood")
        return m

    def newton_scale(self, frac_bits: int) -> int:
        """The scale m of Newton's iterate Y = y 2^m: the guess's, or ``out_bits`` if larger."""
        return max(self.guess_scale(frac_bits), self.out_bits)

    def prescale_bits(self, frac_bits: int) -> int:
        """k (even) such that the flood for x / 2^k, F / 2^k, fits the ring: 2F 2^(f-k) < 2^62.
        Scaling x down before flooding keeps sigma (distances shrink with F) and the guess is
        rescaled by 2^(-k/2); it costs one truncation of x."""
        F = self.flood_size()
        if F is None:
            return 0
        k = max(0, math.ceil(math.log2(F) + frac_bits - 60))
        if k > 40:
            raise OverflowError(f"flood F = {F:.3g} (sigma = {self.security_bits():.1f}) is too large for the ring")
        return k + (k % 2)

    def headroom_max(self, frac_bits: int = 16) -> float:
        """The largest x whose Newton products stay below the exact truncation's 2^62 headroom.

        Newton runs on Y = y 2^m with t = y sqrt(x) <= max(1, t0_max), so the largest product
        before truncation is x Y ~ t sqrt(x) 2^(m + 2f): x < (2^(62 - m - 2f) / t_max)^2.  Beyond
        it the secure result is garbage (``RingOps`` raises ``HeadroomError`` there); between ``hi``
        and this bound Newton only converges less (the result undershoots, it never wraps).
        """
        m = self.newton_scale(frac_bits)
        t_max = max(1.0, self.t0_bounds()[1])
        by_newton = (2.0 ** (62 - m - 2 * frac_bits) / t_max) ** 2
        cap = 2.0 ** (62 - frac_bits - 1)
        F = self.flood_size()
        if self.guess == Guess.THERMOMETER:  # the comparisons' width
            cap = min(cap, 2.0 ** (self.octaves()[1] + 1))
        return min(by_newton, cap, F if F is not None else cap)

    def describe(self) -> dict:
        return {"guess": self.guess.value, "domain": [self.lo, self.hi], "sigma": self.security_bits(),
                "flood": self.flood_size(), "iterations": self.n_iterations(), "form": self.form.value,
                "target": self.target, "bit_trick": self.bit_trick}


class DomainMonitor:
    """Set as ``ops.monitor`` on a plaintext backend (``FloatOps``/``RingOps``): records, per rsqrt
    call site, the range of inputs and how many fall outside the declared domain, so a simulation
    can say where the private path would drift (or wrap) instead of hiding it."""

    def __init__(self):
        self.sites: dict[str, dict] = {}
        self.values: dict[str, dict] = {}

    def __call__(self, spec: RsqrtSpec, x) -> None:
        v = torch.as_tensor(x).detach().to(torch.float64).reshape(-1) / spec.unit
        if not v.numel():
            return
        lo, hi = spec.lo / spec.unit, spec.hi / spec.unit
        r = self.sites.setdefault(spec.site or f"[{lo:g}, {hi:g}]", {
            "domain": [lo, hi], "headroom_max": spec.headroom_max() / spec.unit, "n": 0, "below": 0, "above": 0,
            "min": math.inf, "max": -math.inf, "guess_scale": spec.guess_scale(16), "sum_inv_sqrt": 0.0})
        r["n"] += v.numel()
        # Y = y 2^(m+f) ring units: a local shift of it would fail with probability Y / 2^64
        r["sum_inv_sqrt"] += float((v * spec.unit).clamp_min(1e-300).rsqrt().sum())
        r["below"] += int((v < lo).sum())
        r["above"] += int((v > hi).sum())
        r["min"], r["max"] = min(r["min"], float(v.min())), max(r["max"], float(v.max()))

    def value(self, name: str, v, bound: float) -> None:
        """Record max |v| of a headroom-limited intermediate (not an rsqrt input) against its bound."""
        v = torch.as_tensor(v).detach()
        top = float(v.abs().max()) if v.numel() else 0.0
        r = self.values.setdefault(name, {"bound": bound, "max": 0.0, "above": 0})
        r["max"] = max(r["max"], top)
        r["above"] += int(top >= bound)

    def local_shift_failures(self, frac_bits: int = 16) -> float:
        """Expected number of wrong elements had Newton's 2^-m rescale been a local shift (the defect
        of issue 15): sum over rsqrt outputs of y 2^(m+f) / 2^64."""
        return sum(r["sum_inv_sqrt"] * 2.0 ** (r["guess_scale"] + frac_bits - 64) for r in self.sites.values())

    def outside(self) -> dict[str, dict]:
        """The sites where some input left the domain."""
        return {k: r for k, r in self.sites.items() if r["below"] or r["above"]}


def initial_guess(ops, x, spec: RsqrtSpec, scale: int = 0):
    """y0 * 2^scale for 1/sqrt(x) on any backend (only flooded guesses use a scale)."""
    if spec.guess == Guess.CONSTANT:
        return ops.const_like(x, 2.0**scale / math.sqrt(2 * spec.hi))
    if spec.guess == Guess.THERMOMETER:
        f = ops.frac_bits
        thresholds, weights, base, k = spec.thermometer(f)
        # the buckets' guesses on the grid and their increments, so that every partial sum is exactly one
        # bucket's encoded guess (encoding each increment alone would add up to 1/2 ulp per threshold)
        levels = [base * 2.0**scale, *((base + float(w)) * 2.0**scale for w in np.cumsum(weights))]
        steps = _increments(levels, f)
        with ops.span("thermometer_guess"):
            bits = ops.compare_thresholds(x, thresholds, k, spec.table_bytes)
            return ops.add_const(ops.weighted_bits(bits, steps), round(levels[0] * 2**f) * 2.0**-f)
    if spec.guess == Guess.CRYPTEN:
        e = crypten_exp(ops, ops.neg(ops.add_const(ops.scale_pow2(x, 1), 0.2)))
        return ops.add_const(ops.sub(ops.mul_const(e, 2.2), ops.scale_pow2(x, 10)), 0.2)
    if spec.insecure:
        warn_insecure_once(spec.guess.value, f"flood F = {spec.flood_size():g} gives sigma = "
                           f"{spec.security_bits():.1f} bits: the guess leaks the magnitude of x")
    k = spec.prescale_bits(ops.frac_bits)
    if k:
        x = ops.truncate(x, k)
    return ops.flood_guess(x, spec.flood_size() / 2**k, spec.bit_trick, scale - k // 2)


def newton_step(ops, x, y, form: NewtonForm, scale: int = 0, out_shift: int = 0):
    """One step y <- y (3 - x y^2)/2 on Y = y 2^m (m = ``scale``); the result is divided by
    2^out_shift inside its last product's truncation (the final step of ``rsqrt`` drops the scale
    there, for free).

    three_mul: a = x Y 2^-m, h = t^2/2 = a Y 2^-(m+1), Y' = Y (1.5 - h).  While t << 1, a underflows
    to 0 and the step is Y' = 1.5 Y, which is what Newton does there anyway.
    two_round: (x Y 2^-m, Y^2 2^-m) in one round, b = their product = t^2 Y (not truncated), and
    Y' = (3 Y 2^f - b) / 2^(f+1) in one exact truncation.
    Every division is folded into a product's (exact) truncation: no local shift, whose failure
    probability |v|/2^64 per element is not negligible for Y ~ 2^40 (issue 15).
    """
    if form == NewtonForm.THREE_MUL:
        h = ops.mul(ops.mul(x, y, scale), y, scale + 1)
        return ops.mul(y, ops.add_const(ops.neg(h), 1.5), out_shift)
    f = ops.frac_bits
    xy, yy = ops.mul_many([(x, y), (y, y)], scale)
    b_raw = ops.mul(xy, yy, -f)  # t^2 Y 2^f, untruncated
    three_y = ops.add(y, ops.mul_pow2(y, 1))
    return ops.truncate(ops.sub(ops.mul_pow2(three_y, f), b_raw), f + 1 + out_shift)


def rsqrt(ops, x, spec: RsqrtSpec):
    """1/sqrt(x) for x in [spec.lo, spec.hi]: guess, then ``spec.n_iterations()`` Newton steps.

    Error: relative error <= spec.target over the domain in exact arithmetic, plus the fixed-point
    rounding of a few ulp (measured by ``bench nonlinear``, asserted by the tests).
    Outside the domain (docs/ranges.md): below ``lo`` or above ``hi`` Newton starts further from
    the root and may not reach the target in the derived iteration count (the result undershoots
    1/sqrt(x), it never diverges below the flood F); products stay within the ring's headroom for
    x < ``spec.headroom_max(f)``, beyond which ``RingOps`` raises ``HeadroomError``.
    With ``spec.out_bits`` = E the result is y 2^E (E more fractional bits; Newton runs at scale >= E).
    Cost (shares, exact truncation): guess + n steps of 3 products (6 rounds, 144 B/element each);
    guesses: comet 3 rounds, 40 B/element; constant 0; crypten 8 squarings (16 rounds, 256 B/element)
    plus 2 truncations (2 rounds, 32 B/element); thermometer one ``compare_many`` with
    per_octave (e_max + 1 - e_min) - 1 thresholds (``protocols.compare_rounds(k, spec.table_bytes)`` rounds:
    4 for LayerNorm's per-row variance, k = 25 + f, 3 chunks of 12 bits at ``ROW_TABLE_BYTES``).
    """
    if ops.ideal:  # FloatOps(ideal=True): the exact function (fine-tuning)
        return torch.rsqrt(x)
    with ops.span("rsqrt"):
        monitor = ops.monitor
        if monitor is not None:
            monitor(spec, ops.output(x))
        m = spec.newton_scale(ops.frac_bits)
        y = initial_guess(ops, x, spec, m)
        n = spec.n_iterations(ops.frac_bits)
        out = m - spec.out_bits
        for i in range(n):
            y = newton_step(ops, x, y, spec.form, m, out if i == n - 1 else 0)
        return ops.truncate(y, out) if out and not n else y
