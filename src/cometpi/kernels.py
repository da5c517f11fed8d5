"""Kernels chosen by measurement: which exact ring matmul is fastest on this machine, for this shape.

``ring.ring_matmul`` has two exact methods for a CPU tensor: torch's int64 matmul (it wraps modulo 2^64,
which is the ring; no BLAS) and the limb split (16-bit limbs in float64 through BLAS, see
``ring.ring_matmul``).  Which is faster depends on the machine, by far: int64 ran 29.6 GMAC/s on an
earlier AVX-512 machine and 0.34 GMAC/s on one without AVX-512, where the limb split ran 1.6-2.9 GMAC/s
(earlier measurements, not in bench/results; the probe's own timings are in every bench model row).  And
it depends on the shape and on how many limbs the right operand needs (a small weight needs one or two).

So the first product of each *shape class* in a process runs both methods on its own operands (a large
one on a corner of it, ``probe_dims``: splitting a vocabulary-sized operand into limbs took seconds),
checks that they agree bit for bit (a product that differs raises: an exactness bug must never pass
silently), and keeps the faster for every later product of that class.  The limb probe splits the right
operand itself (a private weight's kept limb stack is built only once the limbs have won), which favours
int64 slightly.  A class is the operands' dimensions, each
rounded up to a power of two, with the limbs of the right operand and the diagonals (the output's
width).  The choice costs one extra product per class and process (a corner of it, for a large one).

``COMETPI_RING_MATMUL=int64|limbs`` (or ``set_policy``) fixes the method instead; ``report()`` says what
was chosen, for the benchmarks' ``kernel`` field.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter

import torch

POLICIES = ("auto", "int64", "limbs")
ENV = "COMETPI_RING_MATMUL"
_lock = threading.Lock()
_chosen: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_policy: str | None = None
#: Products smaller than this many multiply-adds are not worth measuring: int64 (no limb splitting).
MIN_MACS = 1 << 16
#: A product above this many multiply-adds is measured on a corner of about this size (``probe_dims``).
PROBE_MACS = 1 << 24
#: ... and a right operand above this many elements (the limb probe splits all of it: a 576 x 49,152 head
#: took 2.4 s to split, for a one-row product).
PROBE_B_ELEMENTS = 1 << 20
#: The limb split is exact for inner dimensions below this (``ring.ring_matmul``); int64 always is.
LIMB_MAX_INNER = 1 << 21
_REPEAT_BELOW = 0.05  # seconds: a probe faster than this is repeated (three times in all) and the best kept


class KernelMismatch(RuntimeError):
    """Two exact ring-matmul methods disagreed: a bug, never a rounding difference."""


def policy() -> str:
    """``auto`` (measure), or the method fixed by ``set_policy`` / ``COMETPI_RING_MATMUL``."""
    p = _policy or os.environ.get(ENV, "auto") or "auto"
    if p not in POLICIES:
        raise ValueError(f"{ENV}={p!r}: expected one of {', '.join(POLICIES)}")
    return p


def set_policy(p: str | None) -> None:
    """Fix the ring-matmul method for this process (``None``: back to ``COMETPI_RING_MATMUL`` or auto)."""
    global _policy
    if p is not None and p not in POLICIES:
        raise ValueError(f"unknown ring-matmul policy {p!r}: expected one of {', '.join(POLICIES)}")
    _policy = p
    with _lock:
        _chosen.clear()
        _timings.clear()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_class(a: torch.Tensor, b: torch.Tensor, b_limbs: int, diagonals: int) -> tuple:
    batch = a.shape[:-2].numel() if a.dim() > 2 else 1
    n = a.shape[-2] if a.dim() > 1 else 1
    return (_pow2(batch), _pow2(n), _pow2(a.shape[-1]), _pow2(b.shape[-1]), b.dim() > 2, min(b_limbs, diagonals),
            diagonals)


def probe_dims(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, inner, cols) of the corner a[..., :rows, :inner] @ b[..., :inner, :cols] that a product above
    ``PROBE_MACS`` (or with b above ``PROBE_B_ELEMENTS``) is measured on: the largest dimension halved
    until it fits, no side below 64; None for a smaller one."""
    n, k, m = (a.shape[-2] if a.dim() > 1 else 1), a.shape[-1], b.shape[-1]
    batch = a.shape[:-2].numel() if a.dim() > 2 else 1
    if batch * n * k * m <= PROBE_MACS and k * m <= PROBE_B_ELEMENTS:
        return None
    dims = [n, k, m]
    while batch * math.prod(dims) > PROBE_MACS and max(dims) > 64:
        i = dims.index(max(dims))
        dims[i] = (dims[i] + 1) // 2
    while dims[1] * dims[2] > PROBE_B_ELEMENTS and max(dims[1:]) > 64:  # the limb split splits all of b
        i = 1 if dims[1] >= dims[2] else 2
        dims[i] = (dims[i] + 1) // 2
    return dims[0], dims[1], dims[2]


def _best(fn, repeat: bool) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    best = time.perf_counter() - t0
    if repeat and best < _REPEAT_BELOW:
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best, out


def choose(a: torch.Tensor, b: torch.Tensor, b_limbs: int, diagonals: int, run) -> tuple[str, torch.Tensor | None]:
    """The method for this product; ``run(method, dims=None)`` computes it (with ``dims``, only the corner
    of ``probe_dims``).  Returns (method, the product when the choice was measured on it whole just now,
    else None)."""
    p = policy()
    if p != "auto":
        return p, None
    if a.device.type != "cpu":
        return "limbs", None  # CUDA has no int64 matmul
    macs = a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
    if macs < MIN_MACS or a.shape[-1] >= LIMB_MAX_INNER:  # tiny, or beyond the limb split's exact range
        return "int64", None
    key = shape_class(a, b, b_limbs, diagonals)
    m = _chosen.get(key)
    if m is not None:
        return m, None
    probe = run
    dims = probe_dims(a, b)
    if dims is not None:  # a large product: measured on a corner of it, not twice in full
        probe = lambda m: run(m, dims=dims)  # noqa: E731
    t_int, out_int = _best(lambda: probe("int64"), True)
    t_limb, out_limb = _best(lambda: probe("limbs"), True)
    if not torch.equal(out_int, out_limb):
        raise KernelMismatch(f"ring matmul {tuple(a.shape)} @ {tuple(b.shape)} (b_limbs {b_limbs}, diagonals "
                             f"{diagonals}): int64 and limb-split products differ")
    m = "int64" if t_int <= t_limb else "limbs"
    with _lock:
        _chosen[key] = m
        _timings[key] = {"int64": t_int, "limbs": t_limb, "macs": macs}
    return m, (out_int if probe is run else None)


def report() -> dict:
    """What this process chose: the policy, the count of shape classes per method, and each class's
    measured seconds (``a_shape_class @ b ...``)."""
    with _lock:
        counts = Counter(_chosen.values())
        classes = {"x".join(map(str, k[:4])) + f"/limbs{k[5]}/diag{k[6]}": {"kernel": m, **_timings.get(k, {})}
                   for k, m in _chosen.items()}
    p = policy()
    kernel = p if p != "auto" else ("+".join(sorted(counts)) or "none yet")
    return {"policy": p, "kernel": kernel, "classes_by_kernel": dict(counts), "classes": classes}


def kernel_label() -> str:
    """The ``kernel`` field of a benchmark row: ``int64``, ``limbs``, ``int64+limbs`` (both chosen, by
    shape), fixed by policy, or ``none yet``."""
    return report()["kernel"]
