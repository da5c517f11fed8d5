"""Comparisons on shares: boolean AND (packed Beaver triples), bit-to-arithmetic conversion, DReLU over
the full ring, ReLU, max and argmax, and the narrow comparison against many public thresholds, each with
its dealer material kind.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..core import AShare, Role, Session, TruncMode
from ..ring import DTYPE, RING_BITS, logical_rshift, lshift, msb, substream
from .arith import _OFFSET, mul, truncate
from .material import Cost, DealerError, _bits, _shape, elementwise_cost

_LOW_BITS = 62  # x' = x + 2^62 lies in [0, 2^63): its bit 62 is the sign test, the borrow needs 62


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(np.uint8)))


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n))


def _word_bits(w: torch.Tensor, nbits: int) -> torch.Tensor:
    """The low ``nbits`` bits of int64 words as a (..., nbits) uint8 tensor, least significant first."""
    return ((w.unsqueeze(-1) >> torch.arange(nbits)) & 1).to(torch.uint8)


#: Bytes (8 triples each) per dealer request of packed AND triples (the dealer refuses requests above
#: 2^28 elements).
_BAND_REQUEST = 1 << 26


def _and_triples(s: Session, nbytes: int):
    """Packed boolean triples for 8 nbytes ANDs, fetched in requests of at most ``_BAND_REQUEST``
    bytes (a narrow comparison over the attention scores of 512 tokens needs 5.8e8 in one round)."""
    parts = [s.provider.get("bandp", shape=[min(_BAND_REQUEST, nbytes - i)])
             for i in range(0, max(nbytes, 1), _BAND_REQUEST)]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))


def and_packed(s: Session, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bitwise AND of XOR-shared bits packed 8 per byte (uint8 tensors of one shape), with packed
    boolean Beaver triples.

    1. Open e = x ^ a and d = y ^ b (one message each way).
    2. [x & y] = [c] ^ (e & [b]) ^ (d & [a]) ^ (e & d) (the last by party 0).
    Cost: 1 round, 4 bits per AND (both directions).  Offline: 1 bit per AND dealer -> server.
    Ref: Beaver triples over GF(2), as in GMW / ABY.
    """
    a, b, c = _and_triples(s, x.numel())
    mine = torch.cat([x.reshape(-1) ^ a, y.reshape(-1) ^ b])
    s.peer.send(mine, "and-open")
    ed = mine ^ s.peer.recv("and-open", shape=tuple(mine.shape), dtype=torch.uint8)
    e, d = ed[: x.numel()], ed[x.numel():]
    z = c ^ (e & b) ^ (d & a)
    if s.role == Role.CLIENT:
        z = z ^ (e & d)
    return z.reshape(x.shape)


class _PackedAndTriple:
    """Boolean Beaver triples packed 8 per byte: bytes a, b, c with c = a & b bitwise, XOR-shared
    (``shape`` counts bytes).  The correction is c's server share, n bytes."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        n = math.prod(_shape(p["shape"], "bandp"))
        raw = torch.frombuffer(bytearray(prg.bytes(stream, (3 if role == Role.CLIENT else 2) * n)), dtype=torch.uint8)
        return list(raw.chunk(3 if role == Role.CLIENT else 2)) if n else [raw] * (3 if role == Role.CLIENT else 2)

    def cost(self, p) -> Cost:
        n = math.prod(_shape(p["shape"], "bandp"))
        return Cost(n, 6 * n)

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return ((a0 ^ a1) & (b0 ^ b1)) ^ c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], own[1], corr)


def _pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """(..., m) uint8 0/1 -> (..., ceil(m / 8)) packed bytes along the last axis."""
    return torch.from_numpy(np.packbits(bits.numpy(), axis=-1))


def _unpack_rows(packed: torch.Tensor, m: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=m))


def b2a(s: Session, bits: torch.Tensor) -> AShare:
    """Convert XOR-shared bits to arithmetic shares of 0/1 (integers, not fixed point).

    1. Dealer pair: a random bit beta, XOR-shared and arithmetically shared.
    2. Open z = bit ^ beta (packed).  3. [bit] = z + (1 - 2z)[beta] (z added by party 0).
    Cost: 1 round, 2 bits/element.  Offline: 8 B/element dealer -> server.
    """
    n = bits.numel()
    beta, v = s.provider.get("b2a", shape=[n])
    mine = _pack(bits.reshape(-1) ^ beta)
    s.peer.send(mine, "b2a-open")
    z = _unpack(mine, n) ^ _unpack(s.peer.recv("b2a-open", shape=tuple(mine.shape), dtype=torch.uint8), n)
    z = z.to(DTYPE)
    out = (1 - 2 * z) * v + (z if s.role == Role.CLIENT else 0)
    return AShare(s, out.reshape(bits.shape))


class _BitToArith:
    """A random bit beta, XOR-shared (uint8) and arithmetically shared (int64)."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "b2a")
        (bit,) = _bits(prg, stream, s)
        return [bit, prg.ring(substream(stream, 1), s)[0]] if role == Role.CLIENT else [bit]

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "b2a")), 2, 1, 1)

    def correct(self, own0, own1, p):
        (b0, v0), (b1,) = own0, own1
        return (b0 ^ b1).to(torch.int64) - v0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


def drelu(x: AShare) -> AShare:
    """[x >= 0] as an arithmetic share of 0/1, for |x| < 2^62 (ring integers).

    1. Dealer: r (arithmetic shares) and XOR shares of r's bits.  Open c = x + 2^62 + r.
    2. x' = x + 2^62 in [0, 2^63) and bit 62 of x' = c_62 ^ r_62 ^ [c mod 2^62 < r mod 2^62].
    3. The borrow [c_low < r_low] (public c, bit-shared r) by a comparison tree over 64 padded bit
       positions: leaves lt = !c_i & r_i, eq = !(c_i ^ r_i); a level combines (hi, lo) pairs as
       lt = lt_hi ^ (eq_hi & lt_lo), eq = eq_hi & eq_lo with two ANDs (one for the lowest pair of a
       level, whose eq is never needed): 6 rounds, 120 ANDs per element.
    4. b2a of bit 62 of x' (which is [x >= 0]).
    Cost: 8 rounds, 16 B + 480 bits + 2 bits = 76.25 B/element (bits packed per row of the tree,
    each row rounding up to whole bytes).  Offline: 8 B (r bits) + 120 bits (AND triples) + 8 B (b2a) per
    element, dealer -> server.
    Ref: comparison via a masked opening and a bitwise less-than circuit (e.g. Damgard et al.,
    TCC 2006; ABY's Yao-free GMW comparator), with a dealer instead of OT.
    """
    s = x.session
    with s.span("drelu"):
        shape, n = x.shape, math.prod(x.shape)
        r, w = s.provider.get("cmp", shape=[n])
        mine = x.data.reshape(-1) + r + (_OFFSET if s.role == Role.CLIENT else 0)
        c = mine + s.peer.exchange([mine], "cmp-open")[0]
        cb = _word_bits(c, 64)  # public bits of c
        rb = _word_bits(w, 63)  # my XOR share of r's low 63 bits
        is0 = s.role == Role.CLIENT
        low_c, low_r = cb[:, :_LOW_BITS], rb[:, :_LOW_BITS]
        lt = (1 - low_c) * low_r
        eq = low_r ^ (low_c if is0 else 0) ^ (1 if is0 else 0)
        pad = 64 - _LOW_BITS  # padded positions: lt = 0, eq = 1 (party 0 holds the 1)
        lt = torch.cat([lt, torch.zeros(n, pad, dtype=torch.uint8)], 1)
        eq = torch.cat([eq, torch.full((n, pad), 1 if is0 else 0, dtype=torch.uint8)], 1)
        # 64 positions: 6 levels, 120 ANDs (bits packed along the elements)
        borrow = _unpack_rows(_combine_chunks(s, _pack_rows(lt.T.contiguous()), _pack_rows(eq.T.contiguous())), n)
        bit = borrow ^ rb[:, _LOW_BITS] ^ (cb[:, _LOW_BITS] if is0 else 0)
        return b2a(s, bit).reshape(*shape)


class _Compare:
    """r (arithmetic shares) and XOR shares w0 ^ w1 = r of its bits, as int64 words."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "cmp")
        return prg.ring(stream, s, s) if role == Role.CLIENT else prg.ring(stream, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "cmp")), 2, 1, 1)

    def correct(self, own0, own1, p):
        (r0, w0), (r1,) = own0, own1
        return (r0 + r1) ^ w0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


def relu(x: AShare) -> AShare:
    """max(x, 0) = x * [x >= 0] (the 0/1 factor is an integer: no truncation).

    Cost: drelu + 1 round, 32 B/element.
    """
    with x.session.span("relu"):
        return mul(x, drelu(x), truncate_result=False)


#: Most values an all-pairs level compares at once (all rows together): beyond, binary levels (its bytes per value
#: are about 14x a binary level's, 260 B against 18.25 B at k = 29, for 4 rounds less over three levels).
ALL_PAIRS_MAX_VALUES = 1 << 14


def max_arity(n: int, values: int | None = None) -> int:
    """How many values ``maximum`` compares at once per group at a level of rows of n (``values`` in all rows,
    default n): 8 for short rows with few values in all (an 8-fold level in 8 rounds where three binary levels
    take 12, for about 14x the bytes per value), 2 otherwise: a vocabulary of 49,152 halves to 3,072 in 4
    binary levels, then 4 levels of 8 (with the argmax's sign test 52 rounds and 2.3 MB online,
    ``sampling.choice_rounds``); BERT-base's 12 x 128 rows of 128 scores halve to 8 in 4 binary levels, then
    one of 8 (24 rounds, 33 B per score, against 20 rounds and 292 B with levels of 8 throughout)."""
    return 8 if n <= 4096 and (n if values is None else values) <= ALL_PAIRS_MAX_VALUES else 2


def max_rounds(n: int, cmp_rounds: int, arity: int | None = None, rows: int = 1) -> int:
    """Online rounds of ``maximum`` with a narrow k over a row of n whose sign test takes ``cmp_rounds``:
    a binary level is its ``drelu_select``, an a-fold level the sign tests, a product tree and the products."""
    r = 0
    while n > 1:
        a = min(max_arity(n, n * rows) if arity is None else arity, n)
        r += cmp_rounds + (1 + math.ceil(math.log2(a - 1)) if a > 2 else 0)
        n = -(-n // a)
    return r


@functools.cache
def _pair_table(a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs i < j of a group of a (``triu_indices``) and, per candidate i, where its a - 1 factors lie
    in [c_pairs | 1 - c_pairs]: c_ij for j > i, 1 - c_ji for j < i."""
    iu, ju = torch.triu_indices(a, a, 1)
    pair = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(iu, ju, strict=True))}
    idx = torch.tensor([[pair[(i, j)] if i < j else len(pair) + pair[(j, i)] for j in range(a) if j != i]
                        for i in range(a)])
    return iu, ju, idx


def _one_minus(bit: AShare) -> AShare:
    """1 - b for an integer 0/1 share (the constant unscaled: party 0 adds 1)."""
    return bit._wrap(-bit.data + (1 if bit.session.role == Role.CLIENT else 0))


def _and_all(bits: AShare) -> AShare:
    """The product of integer 0/1 shares along the last axis, by a balanced tree of products without
    truncation: ceil(log2 n) rounds, n - 1 products of 32 B."""
    while bits.shape[-1] > 1:
        n = bits.shape[-1]
        h = n // 2
        prod = mul(bits[..., :h], bits[..., h : 2 * h], truncate_result=False)
        bits = prod if n % 2 == 0 else prod._wrap(torch.cat([prod.data, bits.data[..., 2 * h :]], -1))
    return bits._wrap(bits.data[..., 0])


def maximum(x: AShare, dim: int = -1, k: int | None = None, arity: int | None = None) -> AShare:
    """Max along ``dim``; keeps the dimension (size 1).  The sign test is ``drelu`` over the full ring, or
    with ``k`` ``drelu_narrow`` at width k (valid while the values of a row differ by less than 2^k).

    ``arity`` 2: a tree of max(a, b) = b + (a - b)[a - b >= 0].  ``arity`` a > 2 (default ``max_arity`` of the
    level's row length and values):
    each level splits the row into groups of a (the last padded with copies of its last value) and
    compares all a (a - 1)/2 pairs of a group at once; value i wins where it is >= every later value and >
    every earlier one (c_ij = [x_i >= x_j] for i < j, 1 - c_ji for i > j: exactly one winner, the first
    maximum), by a product tree of its a - 1 factors; the max is the sum of winner x value products.

    Cost per level: arity 2: full ring, the sign test + 1 product without truncation (1 round, 32 B per
    pair): 9 rounds, 108.25 B per pair; at k = 29 ``drelu_select`` (the select in the sign test's rounds):
    4 rounds, 18.25 B per pair.  Arity a: the sign tests of a(a-1)/2 pairs (``drelu_narrow``: at k = 29
    4 rounds, 10.25 B) + ceil(log2(a - 1)) + 1 rounds of a (a - 1) products (32 B each) per group: at
    k = 29, a = 8: 8 rounds (against 12 for the three binary levels it replaces), a = 4: 7 rounds (8).
    """
    s = x.session
    with s.span("max"):
        x = x._wrap(x.data.movedim(dim, -1))
        while x.shape[-1] > 1:
            n = x.shape[-1]
            a = min(max_arity(n, x.data.numel()) if arity is None else arity, n)
            if a <= 2:
                h = n // 2
                lo, hi = x[..., :h], x[..., h : 2 * h]
                diff = lo - hi
                m = hi + (relu(diff) if k is None else drelu_select(diff, k)[1])
                x = m if n % 2 == 0 else x._wrap(torch.cat([m.data, x.data[..., 2 * h :]], -1))
                continue
            g = -(-n // a)
            data = x.data
            if g * a > n:  # copies of the last value: ties go to the first, the max is unchanged
                data = torch.cat([data, data[..., -1:].expand(*data.shape[:-1], g * a - n)], -1)
            v = x._wrap(data.reshape(*data.shape[:-1], g, a))
            iu, ju, idx = _pair_table(a)
            diff = v[..., iu] - v[..., ju]  # (..., g, pairs): x_i - x_j for i < j
            c = drelu(diff) if k is None else drelu_narrow(diff, k)
            both = c._wrap(torch.cat([c.data, _one_minus(c).data], -1))  # [x_i >= x_j], then [x_j > x_i]
            wins = _and_all(both[..., idx])  # (..., g, a) integer 0/1, one 1 per group
            x = mul(v, wins, truncate_result=False).sum(-1)
        return x._wrap(x.data.movedim(-1, dim))


def argmax_onehot(x: AShare, dim: int = -1) -> AShare:
    """One-hot (0/1 integers) of the maximum along ``dim``; ties give several ones.

    Cost: ``maximum`` + one drelu over all elements.
    """
    with x.session.span("argmax"):
        return drelu(x - maximum(x, dim))


def _combine_chunks(s: Session, lt: torch.Tensor, eq: torch.Tensor) -> torch.Tensor:
    """[a < b] from per-chunk (lt, eq) XOR shares, packed: (C, nbytes) uint8, chunk 0 the least
    significant.  Pairs (lo, hi) combine as lt = lt_hi ^ (eq_hi & lt_lo), eq = eq_hi & eq_lo; an odd
    top chunk passes through.  Only lt is asked of the root, and a node's lo child then needs only its
    lt: the lowest node of every level never computes eq (its row of ``eq`` is not read), so a level
    of h pairs takes 2h - 1 ANDs (``tree_ands``).  ceil(log2 C) rounds, one message each
    (``and_packed`` on whole packed rows).  Returns the packed (nbytes,) result."""
    while lt.shape[0] > 1:
        c = lt.shape[0]
        h = c // 2
        lo_lt, hi_lt, lo_eq, hi_eq = lt[0:2 * h:2], lt[1:2 * h:2], eq[0:2 * h:2], eq[1:2 * h:2]
        both = and_packed(s, torch.cat([hi_eq, hi_eq[1:]]), torch.cat([lo_lt, lo_eq[1:]]))
        new_lt, new_eq = hi_lt ^ both[:h], torch.cat([both[:1], both[h:]])  # row 0 of new_eq: never read
        if c % 2:
            new_lt = torch.cat([new_lt, lt[-1:]])
            new_eq = torch.cat([new_eq, eq[-1:]])
        lt, eq = new_lt, new_eq
    return lt[0]


def tree_ands(chunks: int) -> int:
    """ANDs of ``_combine_chunks`` over C chunks: 2h - 1 per level of h pairs (C - 1 + one per level
    with more than two nodes); 0, 1, 2, 4, 5 for C = 1..5, 9 for 7, 120 for 64."""
    ands, c = 0, chunks
    while c > 1:
        ands += 2 * (c // 2) - 1
        c = c // 2 + c % 2
    return ands


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


def compare_many(x: AShare, k: int, thresholds, budget: int = TABLE_BYTES) -> AShare:
    """[x >= t] for each public ring integer t (a 1-D list or tensor of them), as arithmetic 0/1
    shares of shape (*x.shape, len(thresholds)); valid while every |x - t| < 2^k.

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
        return b2a(s, bit).reshape(*shape, t)


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

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "cmpn")
        (r,) = prg.ring(stream, s)
        if role == Role.SERVER:
            return [r]
        n, tb = math.prod(s), self._table_bytes(p)
        raw = torch.frombuffer(bytearray(prg.bytes(substream(stream, 1), n * tb + (n + 7) // 8)), dtype=torch.uint8)
        return [r, raw[: n * tb].reshape(n, tb), raw[n * tb:]]

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
        n, tb = math.prod(s), self._table_bytes(p)
        raw = torch.frombuffer(bytearray(prg.bytes(substream(stream, 1), n * tb + (n + 7) // 8)), dtype=torch.uint8)
        v, w = prg.ring(substream(stream, 3), s, s)
        return [sh, raw[: n * tb].reshape(n, tb), raw[n * tb:], beta, v, w]

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
        tb = self._table_bytes(p)
        raw = torch.frombuffer(bytearray(prg.bytes(substream(stream, 1), n * tb + (n + 7) // 8)), dtype=torch.uint8)
        ints = prg.ring(substream(stream, 3), [n], [n], [n], [n], [n])
        return [r, raw[: n * tb].reshape(n, tb), raw[n * tb:], beta, *ints]

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


KINDS = {"bandp": _PackedAndTriple(), "b2a": _BitToArith(), "cmp": _Compare(), "cmpn": _NarrowCompare(),
         "cmpsel": _NarrowSelect(), "trsel": _TruncSelect()}
