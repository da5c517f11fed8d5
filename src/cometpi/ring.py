"""The ring Z_2^64: int64 tensors, fixed-point encoding, exact ring matmul and CSPRNG expansion.

Ring elements are ``torch.int64`` tensors on any device; addition and multiplication wrap modulo
2^64 (two's complement), which is exactly arithmetic in Z_2^64.  Nothing here knows about parties.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import sys
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import kernels

RING_BITS = 64
DTYPE = torch.int64
#: Plaintext fixed-point values must satisfy |v| < 2^HEADROOM_BITS after encoding, so that the
#: wrap-corrected truncation (which shifts values by 2^62) and sums of two such values never wrap.
HEADROOM_BITS = 62
_LIMB_BITS = 16
_N_LIMBS = RING_BITS // _LIMB_BITS


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding with ``frac_bits`` fractional bits: v -> round(v * 2^f) in Z_2^64."""

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be in [0, 30], got {self.frac_bits}")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def ulp(self) -> float:
        """The fixed-point step 2^-f; test tolerances are stated in multiples of it."""
        return 2.0**-self.frac_bits

    def max_abs(self) -> float:
        """The largest magnitude that ``encode`` accepts."""
        return 2.0 ** (HEADROOM_BITS - self.frac_bits)

    def encode(self, x) -> torch.Tensor:
        """Encode reals (tensor, array or number) as ring elements; raise if outside the headroom."""
        t = torch.as_tensor(x, dtype=torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("cannot encode NaN or infinite values")
        if t.numel() and float(t.abs().max()) >= self.max_abs():
            raise OverflowError(
                f"value {float(t.abs().max()):.3g} exceeds the fixed-point headroom "
                f"{self.max_abs():.3g} (f={self.frac_bits}, ring 2^64)"
            )
        return torch.round(t * self.scale).to(DTYPE)

    def decode(self, r: torch.Tensor) -> torch.Tensor:
        """Decode ring elements (read as signed) to float64 reals."""
        return r.to(torch.float64) / self.scale

    def encode_const(self, c, max_extra: int = 16) -> tuple[torch.Tensor, int]:
        """Encode a public multiplier with k extra fractional bits when it is small, so that it keeps
        about f significant bits (1/768 at f=16 would otherwise lose 0.4%).  Returns (enc, f + k):
        the product must then be truncated by f + k."""
        t = torch.as_tensor(c, dtype=torch.float64)
        top = float(t.abs().max()) if t.numel() else 0.0
        k = 0 if top == 0 or top >= 1 else min(max_extra, math.ceil(-math.log2(top)))
        bits = self.frac_bits + k
        if top * 2.0**bits >= 2.0**HEADROOM_BITS or not math.isfinite(top):
            raise OverflowError(f"constant {top:.3g} exceeds the fixed-point headroom at f={self.frac_bits}")
        return torch.round(t * 2.0**bits).to(DTYPE), bits

    def check_product_headroom(self, max_a: float, max_b: float) -> None:
        """Raise if a product of values bounded by max_a and max_b, before truncation, could wrap."""
        need = 2 * self.frac_bits + math.log2(max(max_a, 1e-300)) + math.log2(max(max_b, 1e-300))
        if need >= HEADROOM_BITS:
            raise OverflowError(
                f"product of |a|<={max_a:g} and |b|<={max_b:g} needs {need:.1f} bits before truncation "
                f"at f={self.frac_bits}; the ring leaves {HEADROOM_BITS}"
            )


def to_unsigned_float(r: torch.Tensor) -> torch.Tensor:
    """Ring elements read as unsigned integers in [0, 2^64), as float64 (for statistics)."""
    f = r.to(torch.float64)
    return torch.where(r < 0, f + 2.0**64, f)


def lshift(r: torch.Tensor, bits: int) -> torch.Tensor:
    """Left shift in Z_2^64 (multiplication by 2^bits with wrap-around)."""
    return r * (1 << bits) if bits < 63 else (r << bits)


def logical_rshift(r: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned (logical) right shift of ring elements."""
    if bits == 0:
        return r.clone()
    return (r >> bits) & ((1 << (RING_BITS - bits)) - 1)


def msb(r: torch.Tensor) -> torch.Tensor:
    """The top bit of each ring element (1 where the signed value is negative), as int64."""
    return (r < 0).to(DTYPE)


# --------------------------------------------------------------------------------------------------
# Exact ring matmul
# --------------------------------------------------------------------------------------------------


def _balanced_limbs(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Split ring elements into n balanced 16-bit limbs l_i in [-2^15, 2^15) held in float64.

    x = sum_i l_i 2^(16 i)  (mod 2^64).  Values with |x| < 2^(16n - 1) need only n limbs exactly.
    """
    limbs = []
    half = 1 << (_LIMB_BITS - 1)
    for _ in range(n):
        limb = ((x + half) & 0xFFFF) - half
        limbs.append(limb.to(torch.float64))
        x = (x - limb) >> _LIMB_BITS  # exact: x - limb is divisible by 2^16
    return limbs


def limbs_needed(max_abs_int: int) -> int:
    """How many balanced 16-bit limbs represent every integer of magnitude <= max_abs_int."""
    bits = int(max_abs_int).bit_length() + 1  # sign
    return max(1, min(_N_LIMBS, math.ceil(bits / _LIMB_BITS)))


def limb_stack(b: torch.Tensor, n: int) -> torch.Tensor:
    """b's n balanced 16-bit limbs side by side on the last axis, (..., k, n m), in float32 (exact:
    |limb| <= 2^15): a constant operand's limbs computed once (``ring_matmul(b_stack=...)``)."""
    return torch.cat(_balanced_limbs(b, n), dim=-1).to(torch.float32)


def ring_matmul(a: torch.Tensor, b: torch.Tensor, *, b_limbs: int = _N_LIMBS, method: str = "auto",
                diagonals: int = _N_LIMBS, b_stack: torch.Tensor | None = None):
    """Exact a @ b in Z_2^64 (batched like ``torch.matmul``).

    ``method="auto"`` (the default): the faster of the two, measured on this machine for this shape class
    (``kernels.choose``: the first product of a class runs both and checks they agree bit for bit;
    ``COMETPI_RING_MATMUL=int64|limbs`` fixes it); the limb split off the CPU (CUDA has no int64 matmul).
    Which wins depends on the CPU by 5-90x: torch's int64 matmul has no BLAS, and runs fast only where
    the compiler vectorised it (AVX-512).

    ``method="limbs"`` splits both operands into balanced 16-bit limbs held in float64 and uses BLAS:
    each limb product is bounded by k*2^30 and each of the four diagonals sums at most four of them,
    so results are exact while k < 2^21.  ``b_limbs`` < 4 is valid when every entry of b satisfies
    |b| < 2^(16*b_limbs - 1) (small fixed-point weights), and skips the products that would be zero.
    ``diagonals`` < 4 computes the product modulo 2^(16*diagonals) only (e.g. 2 for a 32-bit ring), in the
    signed range (``wrap_bits``), as the int64 method does.
    ``method="int64"`` is torch's native integer matmul (no BLAS; CPU only; it wraps modulo 2^64, which is
    the ring); ``diagonals`` < 4 then reduces the product modulo 2^(16 diagonals).
    ``b_stack``: b's ``limb_stack`` with min(b_limbs, diagonals) limbs, computed once for a constant b
    (a private weight): its limbs are then not split again on every call.  A callable is called (once per
    product that takes the limb split) only when the limb split runs.
    """
    if method == "auto":
        def probe(m, dims=None):  # a kept stack is built only once the limbs have won
            if dims is None:
                return ring_matmul(a, b, b_limbs=b_limbs, method=m, diagonals=diagonals,
                                   b_stack=None if callable(b_stack) else b_stack)
            r, k, c = dims
            return ring_matmul(a[..., :r, :k], b[..., :k, :c], b_limbs=b_limbs, method=m, diagonals=diagonals)

        method, out = kernels.choose(a, b, b_limbs, diagonals, probe)
        if out is not None:
            return out
    if callable(b_stack):
        b_stack = b_stack() if method == "limbs" else None
    if method == "int64":
        out = torch.matmul(a, b)
        return out if diagonals >= _N_LIMBS else wrap_bits(out, _LIMB_BITS * diagonals)
    if method != "limbs":
        raise ValueError(f"unknown ring matmul method {method!r}")
    k = a.shape[-1]
    if k >= 1 << 21:
        raise ValueError(f"inner dimension {k} too large for exact limb matmul (limit 2^21)")
    la = _balanced_limbs(a, diagonals)
    nb = min(b_limbs, diagonals)
    m = b.shape[-1]
    if b_stack is None:
        lb = _balanced_limbs(b, nb)
    elif b_stack.shape[-1] != nb * m:
        raise ValueError(f"b_stack holds {b_stack.shape[-1] // m} limbs, {nb} needed")
    diag: list[torch.Tensor | None] = [None] * diagonals
    for i, ai in enumerate(la):
        js = range(min(diagonals - i, nb))
        if not js:
            continue
        rhs = (torch.cat([lb[j] for j in js], dim=-1) if b_stack is None
               else b_stack[..., : len(js) * m].to(torch.float64))
        prod = torch.matmul(ai, rhs)
        for j in js:
            part = prod[..., j * m : (j + 1) * m]
            d = i + j
            diag[d] = part if diag[d] is None else diag[d] + part
    out = None
    for d, s in enumerate(diag):
        if s is None:
            continue
        term = lshift(s.to(DTYPE), _LIMB_BITS * d)
        out = term if out is None else out + term
    return out if diagonals >= _N_LIMBS else wrap_bits(out, _LIMB_BITS * diagonals)


def wrap_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce ring elements modulo 2^bits into the signed range [-2^(bits-1), 2^(bits-1))."""
    if bits >= RING_BITS:
        return x
    half = 1 << (bits - 1)
    return ((x + half) & ((1 << bits) - 1)) - half


def ring_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slow exact reference for 2-D ring matmul using Python integers (tests only)."""
    mod = 1 << RING_BITS
    al, bl = a.tolist(), b.tolist()
    n, k, m = len(al), len(bl), len(bl[0]) if bl else 0
    out = [[0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            s = sum(al[i][t] * bl[t][j] for t in range(k)) % mod
            out[i][j] = s - mod if s >= 1 << (RING_BITS - 1) else s
    return torch.tensor(out, dtype=DTYPE)


# --------------------------------------------------------------------------------------------------
# CSPRNG
# --------------------------------------------------------------------------------------------------

SEED_BYTES = 16


def new_seed() -> bytes:
    """A fresh 128-bit seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


class AesCtrPrg:
    """Expands a 128-bit seed into pseudorandom ring tensors with AES-128 in counter mode.

    A *stream* selects an independent keystream, so two parties holding the same seed derive the same
    tensors for the same stream, in any order.  A stream is either an integer (the 64-bit index forms
    the top half of the counter block: the parties' shared-seed streams) or a *label* (bytes, e.g.
    ``request_label``): AES-CTR from counter 0 under the key BLAKE2b(label; key = seed), a PRF, so
    distinct labels give independent keystreams.  This is the only source of randomness in the
    protocols.

    ``keep`` (None here) is where the dealer keeps weight masks between requests (``dealer.KeptMasks``):
    ``keep(label, make)`` returns what ``make()`` would.
    """

    keep = None

    def __init__(self, seed: bytes):
        if len(seed) != SEED_BYTES:
            raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._seed = seed
        self._algo = algorithms.AES(seed)

    def _encryptor(self, stream: int | bytes):
        if isinstance(stream, bytes):
            key = hashlib.blake2b(stream, key=self._seed, digest_size=16, person=b"cometpi-stream").digest()
            return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        iv = (stream % (1 << 64)).to_bytes(8, "big") + bytes(8)
        return Cipher(self._algo, modes.CTR(iv)).encryptor()

    def bytes(self, stream: int | bytes, nbytes: int) -> bytes:
        return self._encryptor(stream).update(bytes(nbytes))  # CTR: finalize() adds nothing

    def ring(self, stream: int | bytes, *shapes, device=None) -> list[torch.Tensor]:
        """Uniform ring tensors of the given shapes, all drawn from keystream ``stream``."""
        sizes = [math.prod(s) for s in shapes]
        total = sum(sizes)
        # the keystream straight into the tensor's memory (AES-CTR encrypts zeros; update_into wants
        # room for one more block): one pass instead of three copies of a 1 GB weight mask
        raw = torch.empty(total + 2, dtype=torch.int64)
        self._encryptor(stream).update_into(bytes(8 * total), raw.numpy().view(np.uint8))
        if sys.byteorder != "little":  # pragma: no cover - the keystream is read as little-endian int64
            raw = raw.numpy().byteswap(inplace=False).view(np.int64)
            raw = torch.from_numpy(raw)
        out, off = [], 0
        for shape, n in zip(shapes, sizes, strict=True):
            out.append(raw[off : off + n].reshape(shape).to(device))
            off += n
        return out


def request_label(index: int, kind: str, params: dict) -> bytes:
    """The keystream label of dealer request ``index`` of ``kind`` with ``params``: every party's
    material for a request is drawn from its own seed under this label, so it is bound to exactly that
    (index, kind, canonical parameters).  A request that differs in anything (a forged kind, other
    parameters, another index) meets keystreams its parties never use elsewhere.  Parameters are
    canonical JSON (sorted keys, no spaces), which ends with ``}``: a ``substream`` suffix can never
    make one label equal to another."""
    try:
        canon = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"request parameters must be plain JSON values: {e}") from None
    if not isinstance(params, dict) or not isinstance(kind, str) or not 0 <= index < 1 << 64:
        raise ValueError(f"malformed request ({index!r}, {kind!r}, {params!r:.100})")
    return b"cometpi/request/v1\x00" + index.to_bytes(8, "big") + kind.encode() + b"\x00" + canon.encode()


def substream(label: bytes, j: int) -> bytes:
    """The ``j``-th further keystream of a request (for material drawn in separate streams)."""
    return label + b"#" + str(j).encode()


def random_ring(*shapes, device=None) -> list[torch.Tensor]:
    """Fresh uniform ring tensors from a one-time OS-seeded AES-CTR stream."""
    return AesCtrPrg(new_seed()).ring(0, *shapes, device=device)


def uniform01(shape, device=None) -> torch.Tensor:
    """Uniform float64 samples in [0, 1) from the CSPRNG (53 random bits each)."""
    (r,) = random_ring(tuple(shape), device=device)
    return logical_rshift(r, 11).to(torch.float64) * 2.0**-53
