"""Inverse square root by Newton's method with a pluggable initial guess (../shared/COMET.md §4).

The guess strategies (``Guess``):

* ``comet``: flood-reshare x so the client holds R ~ U[F, 2F) with F = x_max 2^sigma, compute each
  party's factor 2^(-1/4)|s_j|^(-1/4) locally (bit trick or pow), multiply the two private factors.
  sigma is the statistical security of the flood: the server's share x - R is within statistical
  distance |x - x'|/F <= 2^-sigma of the one for any other x' in the domain.
* ``constant``: the public guess 1/sqrt(2 x_max): no round, no leak.
* ``crypten``: CrypTen's y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024 (exp by the limit, 8 squarings).
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
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from .guess import bit_trick_error, iterations_for

_WARNED: set[str] = set()


def warn_insecure_once(name: str, message: str) -> None:
    """Warn once per process about an insecure option (its name carries 'insecure')."""
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"{name}: {message}", UserWarning, stacklevel=3)


class Guess(enum.StrEnum):
    COMET = "comet"
    CONSTANT = "constant"
    CRYPTEN = "crypten"
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

    def __post_init__(self):
        object.__setattr__(self, "guess", Guess(self.guess))
        object.__setattr__(self, "form", NewtonForm(self.form))
        if not 0 < self.lo < self.hi:
            raise ValueError(f"rsqrt domain must satisfy 0 < lo < hi, got [{self.lo}, {self.hi}]")

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

    def t0_bounds(self) -> tuple[float, float]:
        """The smallest and largest t0 = y0 sqrt(x) over the domain (and the flood's range)."""
        lo, hi = self.lo, self.hi
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

    def n_iterations(self) -> int:
        if self.iterations is not None:
            return self.iterations
        return iterations_for(*self.t0_bounds(), self.target)

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

    def describe(self) -> dict:
        return {"guess": self.guess.value, "domain": [self.lo, self.hi], "sigma": self.security_bits(),
                "flood": self.flood_size(), "iterations": self.n_iterations(), "form": self.form.value,
                "target": self.target, "bit_trick": self.bit_trick}


def initial_guess(ops, x, spec: RsqrtSpec, scale: int = 0):
    """y0 * 2^scale for 1/sqrt(x) on any backend (only flooded guesses use a scale)."""
    if spec.guess == Guess.CONSTANT:
        return ops.const_like(x, 1 / math.sqrt(2 * spec.hi))
    if spec.guess == Guess.CRYPTEN:
        from .functions import crypten_exp

        e = crypten_exp(ops, ops.neg(ops.add_const(ops.scale_pow2(x, 1), 0.2)))
        return ops.add_const(ops.sub(ops.mul_const(e, 2.2), ops.scale_pow2(x, 10)), 0.2)
    if spec.insecure:
        warn_insecure_once(spec.guess.value, f"flood F = {spec.flood_size():g} gives sigma = "
                           f"{spec.security_bits():.1f} bits: the guess leaks the magnitude of x")
    k = spec.prescale_bits(getattr(ops, "frac_bits", 16))
    if k:
        x = ops.truncate(x, k)
    return ops.flood_guess(x, spec.flood_size() / 2**k, spec.bit_trick, scale - k // 2)


def newton_step(ops, x, y, form: NewtonForm, scale: int = 0):
    """One step y <- y (3 - x y^2)/2 on Y = y 2^m (m = ``scale``).

    three_mul: a = x Y 2^-m, t^2 = a Y 2^-m, Y' = Y (1.5 - t^2/2).  While t << 1, a underflows to 0
    and the step is Y' = 1.5 Y, which is what Newton does there anyway.
    two_round: (x Y 2^-m, Y^2 2^-m) in one round, b = their product = t^2 Y, Y' = (3Y - b)/2.
    """
    if form == NewtonForm.THREE_MUL:
        t2 = ops.mul(ops.mul(x, y, scale), y, scale)
        return ops.mul(y, ops.add_const(ops.neg(ops.scale_pow2(t2, 1)), 1.5))
    xy, yy = ops.mul_many([(x, y), (y, y)], scale)
    b = ops.mul(xy, yy)
    return ops.sub(ops.add(y, ops.scale_pow2(y, 1)), ops.scale_pow2(b, 1))


def rsqrt(ops, x, spec: RsqrtSpec):
    """1/sqrt(x) for x in [spec.lo, spec.hi]: guess, then ``spec.n_iterations()`` Newton steps.

    Error: relative error <= spec.target over the domain in exact arithmetic, plus the fixed-point
    rounding of a few ulp (measured by ``bench nonlinear``, asserted by the tests).
    Cost (shares, exact truncation): guess + n steps of 3 products (6 rounds, 144 B/element each);
    guesses: comet 3 rounds, 40 B/element; constant 0; crypten 8 squarings (16 rounds, 256 B/element).
    """
    if getattr(ops, "ideal", False):  # FloatOps(ideal=True): the exact function (fine-tuning)
        return torch.rsqrt(x)
    with ops.span("rsqrt"):
        m = spec.guess_scale(getattr(ops, "frac_bits", 16))
        y = initial_guess(ops, x, spec, m)
        for _ in range(spec.n_iterations()):
            y = newton_step(ops, x, y, spec.form, m)
        return ops.scale_pow2(y, m) if m else y
