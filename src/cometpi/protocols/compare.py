"""Comparisons on shares: DReLU over the full ring, ReLU, max and argmax, with the full-ring comparison's
dealer material kind; the boolean pieces (``boolean``: AND, the comparison tree, b2a) and the narrow
comparison (``narrow``: many thresholds, the sign test with its select, a truncation's sign test) are
re-exported from here.
"""

from __future__ import annotations

import functools
import math

import torch

from ..core import AShare, Role
from . import boolean, narrow
from .arith import _OFFSET, mul
from .boolean import (  # noqa: F401 - re-exported
    _BAND_REQUEST,
    _and_triples,
    _combine_chunks,
    _pack,
    _pack_rows,
    _unpack,
    _unpack_rows,
    _word_bits,
    and_packed,
    b2a,
    tree_ands,
)
from .material import Cost, _shape, elementwise_cost
from .narrow import (  # noqa: F401 - re-exported
    MAX_CHUNK,
    MIN_CHUNK,
    ROW_TABLE_BYTES,
    TABLE_BYTES,
    _narrow_bits,
    _NarrowCompare,
    _NarrowSelect,
    _TruncSelect,
    _truth_tables,
    chunk_bits,
    cmp_chunks,
    compare_bytes,
    compare_many,
    compare_rounds,
    drelu_narrow,
    drelu_select,
    table_bytes,
    trunc_select,
)

_LOW_BITS = 62  # x' = x + 2^62 lies in [0, 2^63): its bit 62 is the sign test, the borrow needs 62


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


#: Most values an all-pairs level compares at once (all rows together): beyond, binary levels (an 8-fold level's
#: bytes per value are about 3.4x those of the three binary levels it replaces, 54.25 B against 16 B at k = 29,
#: for 5 rounds less).
ALL_PAIRS_MAX_VALUES = 1 << 14


def max_arity(n: int, values: int | None = None) -> int:
    """How many values ``maximum`` compares at once per group at a level of rows of n (``values`` in all rows,
    default n): 8 for short rows with few values in all (an 8-fold level in 7 rounds where three binary levels
    take 12, for about 3.4x the bytes per value), 2 otherwise: a vocabulary of 49,152 halves to 3,072 in 4
    binary levels, then 4 levels of 8 (with the argmax's sign test 48 rounds and 1.5 MB online,
    ``sampling.choice_rounds``); BERT-base's 12 x 128 rows of 128 scores halve to 8 in 4 binary levels, then
    one of 8 (23 rounds, 20.5 B per score, against 18 rounds and about 61 B with levels of 8 throughout); a
    decoding step's 9 rows of 64 scores: two levels of 8 (14 rounds, 61 B per score)."""
    return 8 if n <= 4096 and (n if values is None else values) <= ALL_PAIRS_MAX_VALUES else 2


def max_rounds(n: int, cmp_rounds: int, arity: int | None = None, rows: int = 1) -> int:
    """Online rounds of ``maximum`` with a narrow k over a row of n whose sign test takes ``cmp_rounds``:
    a binary level is its ``drelu_select``, an a-fold level the sign tests without their b2a, an AND tree
    and one select."""
    r = 0
    while n > 1:
        a = min(max_arity(n, n * rows) if arity is None else arity, n)
        r += cmp_rounds + (math.ceil(math.log2(a - 1)) if a > 2 else 0)  # b2a and product: one select
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
    4 rounds, 18.25 B per pair.  Arity a, full ring: the sign tests of a(a-1)/2 pairs + ceil(log2(a - 1)) + 1
    rounds of a (a - 1) products (32 B each) per group.  Arity a at width k: the pairs' narrow sign tests
    without their b2a (at k = 29: 3 rounds, 10 B per pair), an AND tree of the a - 1 bits of each candidate
    on XOR shares (ceil(log2(a - 1)) rounds, 4 bits per AND) and one ``select_bits`` per value (1 round,
    16 B + 2 bits): at k = 29, a = 8: 7 rounds and 54.25 B per value (against 8 rounds and 292 B with the
    products on arithmetic 0/1 shares, and 12 rounds, 18.25 B for the three binary levels it replaces).
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
            if k is None:
                c = drelu(diff)
                both = c._wrap(torch.cat([c.data, _one_minus(c).data], -1))  # [x_i >= x_j], then [x_j > x_i]
                wins = _and_all(both[..., idx])  # (..., g, a) integer 0/1, one 1 per group
                x = mul(v, wins, truncate_result=False).sum(-1)
            else:  # the same on the comparisons' XOR-shared bits: ANDs of 4 bits, one select per value
                with s.span("drelu"):
                    c = narrow.compare_many(diff, k, [0], bits=True)[..., 0]
                both = torch.cat([c, c ^ (1 if s.role == Role.CLIENT else 0)], -1)
                wins = boolean.and_all(s, both[..., idx])  # (..., g, a) XOR-shared, one 1 per group
                x = boolean.select_bits(s, wins, v).sum(-1)
        return x._wrap(x.data.movedim(-1, dim))


def argmax_onehot(x: AShare, dim: int = -1) -> AShare:
    """One-hot (0/1 integers) of the maximum along ``dim``; ties give several ones.

    Cost: ``maximum`` + one drelu over all elements.
    """
    with x.session.span("argmax"):
        return drelu(x - maximum(x, dim))


KINDS = {**boolean.KINDS, **narrow.KINDS, "cmp": _Compare()}
