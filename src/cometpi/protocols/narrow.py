"""The narrow comparison: [x >= t] for |x| < 2^k against many public thresholds from one opening modulo
2^(k+1) and one-time truth tables of the mask's chunks, the sign test with its select (``drelu_select``), and
a product's truncation that is the sign test's opening (``trunc_select``), each with its dealer material kind.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..core import AShare, Role, Session, TruncMode
from ..ring import DTYPE, RING_BITS, logical_rshift, lshift, msb, substream
from .arith import _OFFSET, truncate
from .boolean import _combine_chunks, _pack, _pack_rows, _unpack, _unpack_rows, b2a, tree_ands
from .material import Cost, DealerError, _bits, _shape

#: Bytes of the narrow comparison's one-time truth tables per compared element, by default (a caller
#: comparing few values, as the rsqrt guess's one per row, may allow more: ``ROW_TABLE_BYTES``).
TABLE_BYTES = 256
ROW_TABLE_BYTES = 4096
#: Chunk widths (bits) the dealer makes truth tables for: 2^m entries of lt and of eq per chunk.
MIN_CHUNK, MAX_CHUNK = 3, 12


def table_bytes(m: int) -> int:
    """Bytes of one chunk's truth tables at width m: 2^m bits of lt, then 2^m of eq."""
    return 1 << (m - 2)


def cmp_chunks(k: int, m: int) -> int:
    return -(-k // m)


@functools.cache
def chunk_bits(k: int, budget: int = TABLE_BYTES) -> int:
    """The chunk width of ``compare_many`` at width k: the fewest chunks (the fewest rounds and ANDs) whose
    tables fit ``budget`` bytes per element.  At the default budget: k = 20 -> 3 chunks of 7 bits (96 B
    of tables per element), k = 24 -> 3 of 8 (192 B), k = 28 -> 4 of 7 (128 B), k = 29 -> 4 of 8 (256 B),
    k = 12 -> 2 of 6 (32 B); at ``ROW_TABLE_BYTES``, k = 33 -> 3 of 11 (1.5 KB)."""
    for c in range(1, k + 1):
        m = max(MIN_CHUNK, -(-k // c))
        if m <= MAX_CHUNK and cmp_chunks(k, m) * table_bytes(m) <= budget:
            return m
    return MIN_CHUNK


def compare_rounds(k: int, budget: int = TABLE_BYTES) -> int:
    """Online rounds of ``compare_many`` at width k: 2 + ceil(log2 C)."""
    return 2 + math.ceil(math.log2(cmp_chunks(k, chunk_bits(k, budget))))


def compare_bytes(k: int, thresholds: int, budget: int = TABLE_BYTES) -> float:
    """Online bytes per element of ``compare_many`` (both directions, before the packed rows round up
    to whole bytes): 2 x 4 B opening (2 x 8 B above 32 bits) + per threshold 4 bits per AND and 2 bits of b2a."""
    ands = tree_ands(cmp_chunks(k, chunk_bits(k, budget)))
    return (8 if k + 1 <= 32 else 16) + thresholds * (4 * ands + 2) / 8


def _bit_at(rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Bit ``pos`` (b, t) of each row of bytes (b, B), least significant bit first, as uint8 0/1."""
    return (np.take_along_axis(rows, pos >> 3, 1) >> (pos & 7).astype(np.uint8)) & np.uint8(1)


def _narrow_bits(s: Session, c: torch.Tensor, k: int, m: int, tables, r_top, thr: torch.Tensor) -> torch.Tensor:
    """XOR shares (n, t) uint8 of bit k of c - t - r mod 2^(k+1) for the opened c (n,) and each threshold
    t (reduced mod 2^(k+1)), from the dealer's truth tables of r's m-bit chunks and r's bit k: the local
    lookups, then the AND tree (``compare_many``'s steps 2 and 3, before b2a)."""
    n, t = c.numel(), thr.numel()
    mask = (1 << (k + 1)) - 1
    chunks, half = cmp_chunks(k, m), 1 << m
    lt = np.empty((chunks, n, t), dtype=np.uint8)
    eq = np.zeros((chunks, n, t), dtype=np.uint8)
    top = np.empty((n, t), dtype=np.uint8)
    dt = np.int32 if k + 1 <= 31 else np.int64  # the lookups in int32 (half the memory traffic) where values fit
    cn, tn, tab = c.numpy().astype(dt), thr.numpy().astype(dt), tables.numpy()
    block = max(1, (1 << 20) // t)  # the local lookups in blocks of elements (temporaries stay small)
    for a in range(0, n, block):
        sl = slice(a, min(n, a + block))
        ct = (cn[sl, None] - tn[None, :]) & dt(mask)  # (b, t): x' + r mod 2^n for each threshold
        top[sl] = ct >> k
        low = ct & dt((1 << k) - 1)
        for j in range(chunks):  # row j of the table: bit v is lt[v], bit 2^m + v is eq[v]
            row = tab[sl, j]
            v = (low >> (m * j)) & dt(half - 1)
            lt[j, sl] = _bit_at(row, v)
            if j:  # chunk 0's eq is never read (``_combine_chunks``)
                eq[j, sl] = _bit_at(row, v + dt(half))
    lt, eq, top = torch.from_numpy(lt), torch.from_numpy(eq), torch.from_numpy(top)
    packed = _combine_chunks(s, _pack_rows(lt.reshape(chunks, n * t)), _pack_rows(eq.reshape(chunks, n * t)))
    del lt, eq
    bit = _unpack_rows(packed, n * t).reshape(n, t) ^ _unpack_rows(r_top, n)[:, None]
    return bit ^ top if s.role == Role.CLIENT else bit


def compare_many(x: AShare, k: int, thresholds, budget: int = TABLE_BYTES, bits: bool = False):
    """[x >= t] for each public ring integer t (a 1-D list or tensor of them), as arithmetic 0/1
    shares of shape (*x.shape, len(thresholds)); valid while every |x - t| < 2^k.  ``bits``: XOR shares
    (uint8 tensor) instead, before the b2a (one round and 2 bits per threshold less).

    1. x' = x - t + 2^k lies in [0, 2^(k+1)) for every t.  Dealer (``cmpn``): r uniform mod 2^n,
       n = k + 1, XOR shares of r's bit k and one-time truth tables of r's m-bit chunks (m from
       ``chunk_bits``: the fewest chunks whose tables fit ``budget`` bytes per element).  Each
       party sends its share of x + 2^k + r reduced mod 2^n: c is uniform mod 2^n, so nothing leaks
       however small x is (the full-ring trap of Curl/SHAFT is avoided by reducing first).
    2. For each t, c_t = c - t mod 2^n = x' + r mod 2^n, and bit k of x' is
       c_t[k] ^ r[k] ^ [c_t mod 2^k < r mod 2^k].  The borrow's per-chunk (lt, eq) bits are table
       lookups at the public chunks of c_t (local: one bit of the chunk's table row); one r serves every
       threshold.
    3. Chunks combine in an AND tree on bits packed 8 per byte (``_combine_chunks``: only lt at the
       root, so the lowest node of each level skips its eq), then b2a.
    Outside the domain (some |x - t| >= 2^k) the opened value wraps modulo 2^n and the bit is that of
    x - t + 2^k reduced mod 2^(k+1): wrong, never a leak; ``RingOps`` raises ``HeadroomError`` there.
    Cost (``compare_rounds``, ``compare_bytes``): 2 + ceil(log2 C) rounds (C chunks); online per element
    2 x 4 B for the opening (n <= 32; 2 x 8 B above), plus per threshold 4 bits per AND (``tree_ands``:
    2 for C = 3, 4 for C = 4) and 2 bits of b2a (each packed row of a tree level rounds up to whole bytes).
    At k = 20: 4 rounds, 8 B + 1.25 B per threshold; at k = 28: 4 rounds, 8 B + 2.25 B per threshold.
    Offline: C 2^(m+1) bits of tables + 1 bit + 1 bit per AND + 8 B per threshold (b2a), dealer -> server.
    Ref: small-ring opening with a known-range input (../shared/FAST-PROTOCOLS.md); one-time truth
    tables (Ishai et al., TCC 2013); comparison tree as in ``drelu``.
    """
    s = x.session
    if not 1 <= k <= 61:
        raise ValueError(f"comparison width k must be in 1..61, got {k}")
    thr = torch.as_tensor(thresholds, dtype=DTYPE).reshape(-1)
    n_bits = k + 1
    mask = (1 << n_bits) - 1
    with s.span("compare"):
        shape, n, t = x.shape, math.prod(x.shape), thr.numel()
        m = chunk_bits(k, budget)
        r, tables, r_top = s.provider.get("cmpn", shape=[n], k=k, m=m)
        mine = (x.data.reshape(-1) + r + ((1 << k) if s.role == Role.CLIENT else 0)) & mask
        wire = mine.to(torch.int32) if n_bits <= 32 else mine
        c = (mine + s.peer.exchange_wire(wire, "cmp-open").to(DTYPE)) & mask
        bit = _narrow_bits(s, c, k, m, tables, r_top, thr & mask)
        return bit.reshape(*shape, t) if bits else b2a(s, bit).reshape(*shape, t)


@functools.cache
def _table_of_tables(m: int) -> np.ndarray:
    """(2^m, 2^(m-2)) bytes: row c holds the truth tables of chunk value c, lt[v] = [v < c] for v < 2^m
    then eq[v] = [v == c], bits least significant first."""
    v, c = np.arange(1 << m)[None, :], np.arange(1 << m)[:, None]
    return np.packbits(np.concatenate([v < c, v == c], 1), axis=1, bitorder="little")


def _truth_tables(chunk: torch.Tensor, m: int) -> torch.Tensor:
    """The one-time truth tables of chunk values (any shape, in [0, 2^m)) as (..., 2^(m-2)) bytes
    (``_table_of_tables``)."""
    return torch.from_numpy(_table_of_tables(m)[chunk.numpy()])


class _NarrowCompare:
    """For comparisons of |x| < 2^k opened modulo 2^n, n = k + 1: r mod 2^n (additive shares, no
    correction), XOR shares of r's bit k (packed 8 per byte), and for each m-bit chunk of r's low k
    bits the one-time truth tables lt[v] = [v < chunk] and eq[v] = [v == chunk] for all v < 2^m,
    XOR-shared as 2^(m-2) bytes per chunk (``_truth_tables``).
    Correction to the server: C 2^(m+1) + 1 bits per element (C = ceil(k/m) chunks): the tables, then
    the packed bits of r's bit k, as bytes."""

    receiver = Role.SERVER

    @staticmethod
    def _km(p) -> tuple[int, int]:
        k, m = int(p.get("k", 0)), int(p.get("m", 0))
        if not 1 <= k <= 61:
            raise DealerError(f"narrow comparison width k must be in 1..61, got {k}")
        if not MIN_CHUNK <= m <= MAX_CHUNK:
            raise DealerError(f"narrow comparison chunk width m must be in {MIN_CHUNK}..{MAX_CHUNK}, got {m}")
        return k, m

    @classmethod
    def _table_bytes(cls, p) -> int:
        k, m = cls._km(p)
        return cmp_chunks(k, m) * table_bytes(m)

    def _client_tables(self, prg, stream, p, n: int) -> list[torch.Tensor]:
        """The client's XOR shares of the tables, (n, table bytes), and of bit k, packed: keystream 1 of
        the request (every narrow kind draws them alike)."""
        tb = self._table_bytes(p)
        raw = torch.frombuffer(bytearray(prg.bytes(substream(stream, 1), n * tb + (n + 7) // 8)), dtype=torch.uint8)
        return [raw[: n * tb].reshape(n, tb), raw[n * tb:]]

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "cmpn")
        (r,) = prg.ring(stream, s)
        if role == Role.SERVER:
            return [r]
        return [r, *self._client_tables(prg, stream, p, math.prod(s))]

    def cost(self, p) -> Cost:
        n, tb = math.prod(_shape(p["shape"], "cmpn")), self._table_bytes(p)
        corr = n * tb + (n + 7) // 8
        return Cost(corr, 16 * n + 6 * corr)

    def correct(self, own0, own1, p):
        (r0, tables0, top0), (r1,) = own0, own1
        k, m = self._km(p)
        r = ((r0 + r1) & ((1 << (k + 1)) - 1)).reshape(-1)
        low = r & ((1 << k) - 1)
        chunk = torch.stack([(low >> (m * ch)) & ((1 << m) - 1) for ch in range(cmp_chunks(k, m))], 1)
        truth = _truth_tables(chunk, m).reshape(r.numel(), -1)
        top = torch.from_numpy(np.packbits(((r >> k) & 1).to(torch.uint8).numpy())) ^ top0
        return torch.cat([(truth ^ tables0).reshape(-1), top])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return own[0], own[1].reshape(own[0].numel(), cmp_chunks(*self._km(p)), -1), own[2]
        n, tb = own[0].numel(), self._table_bytes(p)
        return own[0], corr[: n * tb].reshape(n, cmp_chunks(*self._km(p)), -1), corr[n * tb:]


def drelu_select(x: AShare, k: int) -> tuple[AShare, AShare]:
    """([x >= 0], x [x >= 0]) for |x| < 2^k (ring integers): the narrow sign test whose opening is x's
    full masked value, so that its b2a opening also selects x (ReLU, or |x| = 2 x b - x, in the sign
    test's rounds, where ``drelu_narrow`` then a product take one round and 32 B more).

    1. Dealer (``cmpsel``): s uniform in the ring; the narrow comparison's tables and bit k for
       r = s mod 2^(k+1); a bit beta, XOR-shared and arithmetically shared; and [beta s].
    2. Open D = x + s (8 B each way: uniform); c = D + 2^k mod 2^(k+1) = x + 2^k + r mod 2^(k+1) is
       the narrow comparison's opening, and its tree gives XOR shares of b = [x >= 0].
    3. Open z = b ^ beta (packed): [b] = z + (1 - 2z)[beta], and since x = D - s,
       [b x] = D [b] - z [s] - (1 - 2z)[beta s] (local: D and z are public).
    Outside |x| < 2^k the bit is that of the wrapped value (as ``compare_many``) and the select returns
    x or 0 accordingly: wrong, never a leak.
    Cost: ``compare_rounds(k)`` rounds (4 at k = 28); per element 2 x 8 B opening + the tree's ANDs
    (4 bits each) + 2 bits: at k = 28, 16 B + 4 ANDs + 2 bits = 18.25 B.  Offline, dealer -> server: the
    tables and bit k as ``cmpn``, 16 B (beta's and beta s's shares) and 1 bit per AND.
    Ref: a multiplexer from one masked opening and a dealer's beta s (as the "bit injection" of
    ABY2.0, Patra et al., USENIX Security 2021), on the narrow comparison.
    """
    s = x.session
    if not 1 <= k <= 61:
        raise ValueError(f"comparison width k must be in 1..61, got {k}")
    with s.span("drelu"):
        shape, n = x.shape, math.prod(x.shape)
        m = chunk_bits(k)
        sh, tables, r_top, beta, v, w = s.provider.get("cmpsel", shape=[n], k=k, m=m)
        mine = x.data.reshape(-1) + sh
        d = mine + s.peer.exchange([mine], "cmpsel-open")[0]
        c = (d + (1 << k)) & ((1 << (k + 1)) - 1)
        bit = _narrow_bits(s, c, k, m, tables, r_top, torch.zeros(1, dtype=DTYPE))[:, 0]
        mine_z = _pack(bit ^ beta)
        s.peer.send(mine_z, "b2a-open")
        z = _unpack(mine_z, n) ^ _unpack(s.peer.recv("b2a-open", shape=tuple(mine_z.shape), dtype=torch.uint8), n)
        z = z.to(DTYPE)
        one_minus = 1 - 2 * z
        b = one_minus * v + (z if s.role == Role.CLIENT else 0)
        bx = d * b - z * sh - one_minus * w
        return AShare(s, b.reshape(shape)), AShare(s, bx.reshape(shape))


class _NarrowSelect(_NarrowCompare):
    """``drelu_select``'s material: s (additive ring shares, no correction), the narrow comparison's tables
    and bit k for r = s mod 2^(k+1) (as ``cmpn``), a bit beta (XOR shares, no correction) with arithmetic
    shares of beta and of beta s.  Correction to the server: beta's and beta s's shares (16 B per
    element), then the tables and bit k's packed shares, as bytes."""

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "cmpsel")
        (sh,) = prg.ring(stream, s)
        (beta,) = _bits(prg, substream(stream, 2), [math.prod(s)])
        if role == Role.SERVER:
            return [sh, beta]
        v, w = prg.ring(substream(stream, 3), s, s)
        return [sh, *self._client_tables(prg, stream, p, math.prod(s)), beta, v, w]

    def cost(self, p) -> Cost:
        n, tb = math.prod(_shape(p["shape"], "cmpsel")), self._table_bytes(p)
        corr = 16 * n + n * tb + (n + 7) // 8
        return Cost(corr, 48 * n + 6 * corr)

    def correct(self, own0, own1, p):
        (s0, tables0, top0, beta0, v0, w0), (s1, beta1) = own0, own1
        sh = (s0 + s1).reshape(-1)
        beta = (beta0 ^ beta1).to(DTYPE)
        tables = super().correct((sh, tables0, top0), (torch.zeros_like(sh),), p)
        ints = torch.cat([beta - v0.reshape(-1), beta * sh - w0.reshape(-1)])
        return torch.cat([ints.view(torch.uint8), tables])

    def finish(self, role, own, corr, p):
        k, m = self._km(p)
        if role == Role.CLIENT:
            sh, tables, top, beta, v, w = own
            return sh.reshape(-1), tables.reshape(sh.numel(), cmp_chunks(k, m), -1), top, beta, v.reshape(-1), \
                w.reshape(-1)
        sh, beta = own
        n, tb = sh.numel(), self._table_bytes(p)
        ints = corr[: 16 * n].contiguous().view(DTYPE)
        rest = corr[16 * n:]
        return (sh.reshape(-1), rest[: n * tb].reshape(n, cmp_chunks(k, m), -1), rest[n * tb:], beta, ints[:n],
                ints[n:])


def trunc_select(z: AShare, bits: int, k: int) -> tuple[AShare, AShare, AShare]:
    """(y, [y >= 0], y [y >= 0]) for y = z / 2^bits (the exact truncation) with |y| < 2^k: the truncation's
    opening is the sign test's, so a product's output (a linear layer's, before its activation) is
    truncated, compared and selected in ``drelu_select``'s rounds.

    1. Dealer (``trsel``): the truncation's r, [r >>> f], [msb r]; the narrow comparison's tables and
       bit k for r' = (r >>> f) mod 2^(k+1); a bit beta (XOR and arithmetic shares) with
       [beta (r >>> f)] and [beta msb r].
    2. Open c = z + 2^62 + r (uniform).  The truncation's shares are y = P - rho with P = (c >>> f) -
       2^(62-f) public and rho = [r >>> f] - (1 - msb c) 2^(64-f) [msb r]; modulo 2^(k+1) (k + 1 <= 64 - f)
       rho is r', so P + 2^k mod 2^(k+1) = y + 2^k + r' is the narrow comparison's opening: its tree
       gives XOR shares of b = [y >= 0].
    3. Open zb = b ^ beta: [b] = zb + (1 - 2 zb)[beta], and b y = [b] P - b rho, where b X for the
       dealer's X is zb [X] + (1 - 2 zb)[beta X] (local).
    In local truncation mode: ``trunc_local``, then ``drelu_select``.  Outside |y| < 2^k the bit is that of
    the wrapped value (as ``compare_many``): wrong, never a leak.
    Cost: ``compare_rounds(k)`` rounds (4 at k = 28), per element 2 x 8 B (the truncation's opening) + the
    tree's ANDs + 2 bits: at k = 28, 18.25 B, against 16 B and 1 round more for the truncation and
    ``drelu_select`` apart.  Offline, dealer -> server: 40 B (five ring shares), the tables and bit k,
    1 bit per AND.
    """
    s = z.session
    if TruncMode(s.config.trunc) == TruncMode.LOCAL:
        y = truncate(z, bits)
        return (y, *drelu_select(y, k))
    if not 1 <= k <= 61 or k + 1 > RING_BITS - bits:
        raise ValueError(f"trunc_select needs 1 <= k and k + 1 <= 64 - bits, got k = {k}, bits = {bits}")
    with s.span("drelu"):
        shape, n = z.shape, math.prod(z.shape)
        m = chunk_bits(k)
        r, r_shift, r_msb, tables, r_top, beta, v, w_shift, w_msb = s.provider.get("trsel", shape=[n], f=bits,
                                                                                      k=k, m=m)
        client = s.role == Role.CLIENT
        mine = z.data.reshape(-1) + r + (_OFFSET if client else 0)
        c = mine + s.peer.exchange([mine], "trunc-open")[0]
        hi = 1 - msb(c)  # public: (1 - msb c) multiplies [msb r] 2^(64-f) in the truncation
        rho = r_shift - lshift(hi * r_msb, RING_BITS - bits)
        pub = logical_rshift(c, bits) - (_OFFSET >> bits)
        y = (pub if client else 0) - rho
        bit = _narrow_bits(s, (pub + (1 << k)) & ((1 << (k + 1)) - 1), k, m, tables, r_top,
                           torch.zeros(1, dtype=DTYPE))[:, 0]
        mine_z = _pack(bit ^ beta)
        s.peer.send(mine_z, "b2a-open")
        zb = _unpack(mine_z, n) ^ _unpack(s.peer.recv("b2a-open", shape=tuple(mine_z.shape), dtype=torch.uint8), n)
        zb = zb.to(DTYPE)
        om = 1 - 2 * zb
        b = om * v + (zb if client else 0)
        b_rho = zb * r_shift + om * w_shift - lshift(hi * (zb * r_msb + om * w_msb), RING_BITS - bits)
        by = b * pub - b_rho
        return tuple(AShare(s, t.reshape(shape)) for t in (y, b, by))


class _TruncSelect(_NarrowCompare):
    """``trunc_select``'s material: r (ring shares, no correction), [r >>> f] and [msb r] (as ``trunc``), the
    narrow comparison's tables and bit k for r' = (r >>> f) mod 2^(k+1), a bit beta (XOR shares, no
    correction) with arithmetic shares of beta, beta (r >>> f) and beta msb r.  Correction to the server:
    five ring shares (40 B per element), then the tables and bit k's packed shares, as bytes."""

    def _f(self, p) -> int:
        f = int(p.get("f", -1))
        k, _ = self._km(p)
        if not 1 <= f or k + 1 > RING_BITS - f:
            raise DealerError(f"trsel: need 1 <= f and k + 1 <= 64 - f, got f = {f}, k = {k}")
        return f

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "trsel")
        self._f(p)
        n = math.prod(s)
        (r,) = prg.ring(stream, [n])
        (beta,) = _bits(prg, substream(stream, 2), [n])
        if role == Role.SERVER:
            return [r, beta]
        ints = prg.ring(substream(stream, 3), [n], [n], [n], [n], [n])
        return [r, *self._client_tables(prg, stream, p, n), beta, *ints]

    def cost(self, p) -> Cost:
        n, tb = math.prod(_shape(p["shape"], "trsel")), self._table_bytes(p)
        self._f(p)
        corr = 40 * n + n * tb + (n + 7) // 8
        return Cost(corr, 96 * n + 6 * corr)

    def correct(self, own0, own1, p):
        (r0, tables0, top0, beta0, s0, m0, v0, ws0, wm0), (r1, beta1) = own0, own1
        f = self._f(p)
        rr = r0 + r1
        rs, rm = logical_rshift(rr, f), msb(rr)
        beta = (beta0 ^ beta1).to(DTYPE)
        tables = _NarrowCompare.correct(self, (rs, tables0, top0), (torch.zeros_like(rs),), p)
        ints = torch.cat([rs - s0, rm - m0, beta - v0, beta * rs - ws0, beta * rm - wm0])
        return torch.cat([ints.view(torch.uint8), tables])

    def finish(self, role, own, corr, p):
        k, m = self._km(p)
        if role == Role.CLIENT:
            r, tables, top, beta, s0, m0, v, ws, wm = own
            return r, s0, m0, tables.reshape(r.numel(), cmp_chunks(k, m), -1), top, beta, v, ws, wm
        r, beta = own
        n, tb = r.numel(), self._table_bytes(p)
        ints = corr[: 40 * n].contiguous().view(DTYPE).reshape(5, n)
        rest = corr[40 * n:]
        return (r, ints[0], ints[1], rest[: n * tb].reshape(n, cmp_chunks(k, m), -1), rest[n * tb:], beta, ints[2],
                ints[3], ints[4])


def drelu_narrow(x: AShare, k: int) -> AShare:
    """[x >= 0] for |x| < 2^k (ring integers) by ``compare_many`` with the single threshold 0.

    Cost: as ``compare_many`` with one threshold; at k = 24 (3 chunks of 8 bits): 4 rounds, 8 B + 2 ANDs
    (8 bits) + 2 bits = 9.25 B/element (against ``drelu``'s 76.25 B and 8 rounds over the full ring);
    at k = 28 and 29 (4 chunks): 4 rounds, 8 B + 4 ANDs (16 bits) + 2 bits = 10.25 B/element.
    """
    with x.session.span("drelu"):
        return compare_many(x, k, [0])[..., 0]


KINDS = {"cmpn": _NarrowCompare(), "cmpsel": _NarrowSelect(), "trsel": _TruncSelect()}
