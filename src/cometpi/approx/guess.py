"""Initial guesses for Newton's inverse square root, and the iteration counts they imply.

Comet's *double approximation* (from the first author's public prototype; ../shared/COMET.md §4):
after flooding, party j holds a real share s_j with s_0 + s_1 = x.  Each party computes locally
g_j = 2^(-1/4) |s_j|^(-1/4), either exactly (``pow``) or with the fast-inverse-square-root bit
trick on the float32 pattern of |s_j| (I -> K - I/4); then y0 = g_0 g_1 = (|s_0||s_1|)^(-1/4)/sqrt(2)
approximates 1/sqrt(|s_0| + |s_1|) by replacing the arithmetic mean of |s_0|, |s_1| with their
geometric mean.  With a flood R ~ U[F, 2F) held by the client, |s_0| + |s_1| = 2R - x, so
y0 ~ 1/sqrt(2R - x): an undershoot for 0 <= x < F whose information about x vanishes as F grows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# K for v -> 2^(-1/4) v^(-1/4): I_y = (1 - p) L (B - sigma) + p I_v with p = -1/4, L = 2^23,
# B = 127, sigma = 0.0450466 (the classic fit), minus 0.25 L for the factor 2^(-1/4).
_L = 1 << 23
_QUARTER_MAGIC = int(round(1.25 * _L * (127 - 0.0450466) - 0.25 * _L))
_C = 2.0**-0.25


def local_quarter_factor(v: torch.Tensor, bit_trick: bool = True) -> torch.Tensor:
    """2^(-1/4) |v|^(-1/4) for a party's real share v (float64), exactly or by the bit trick."""
    a = v.abs().clamp_min(2.0**-30)
    if not bit_trick:
        return _C * a.pow(-0.25)
    bits = a.to(torch.float32).numpy().view(np.int32)
    out = (np.int32(_QUARTER_MAGIC) - (bits >> 2)).view(np.float32)
    return torch.from_numpy(out.astype(np.float64))


def bit_trick_error() -> tuple[float, float]:
    """(min, max) of bit-trick factor / exact factor over a full period of the float32 pattern."""
    v = torch.from_numpy(np.geomspace(1.0, 16.0, 200_001))
    r = local_quarter_factor(v, True) / local_quarter_factor(v, False)
    return float(r.min()), float(r.max())


def newton_t(t0: np.ndarray, iters: int) -> np.ndarray:
    """t = y sqrt(x) after ``iters`` Newton steps t <- t (3 - t^2) / 2 (exact arithmetic)."""
    t = np.asarray(t0, dtype=np.float64)
    for _ in range(iters):
        t = t * (3 - t * t) / 2
    return t


def iterations_for(t0_min: float, t0_max: float, target: float, limit: int = 200) -> int:
    """Fewest Newton steps taking every t0 in [t0_min, t0_max] to |1 - t| <= target."""
    if not 0 < t0_min <= t0_max < math.sqrt(3):
        raise ValueError(f"Newton diverges or stalls: initial t = y0 sqrt(x) spans [{t0_min:.3g}, "
                         f"{t0_max:.3g}], it must lie in (0, sqrt(3))")
    for k in range(limit + 1):
        t = newton_t(np.array([t0_min, t0_max]), k)
        if np.all(np.abs(1 - t) <= target):
            return k
    raise ValueError(f"no convergence to {target:g} within {limit} Newton steps (t0 from {t0_min:.3g})")
