"""Boolean pieces of the comparisons on shares: AND of XOR-shared bits packed 8 per byte (packed Beaver
triples), the comparison tree that combines per-chunk (lt, eq) bits, and bit-to-arithmetic conversion, each
with its dealer material kind.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core import AShare, Role, Session
from ..ring import DTYPE, substream
from .material import Cost, _bits, _shape, elementwise_cost


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


def and_all(s: Session, bits: torch.Tensor) -> torch.Tensor:
    """The AND of XOR-shared bits (uint8 0/1) along the last axis, by a balanced tree of ``and_packed``
    levels: ceil(log2 n) rounds, n - 1 ANDs (4 bits each, both directions) per row."""
    while bits.shape[-1] > 1:
        n = bits.shape[-1]
        h = n // 2
        lo, hi = bits[..., :h].contiguous(), bits[..., h : 2 * h].contiguous()
        both = _unpack(and_packed(s, _pack(lo), _pack(hi)), lo.numel()).reshape(lo.shape)
        bits = both if n % 2 == 0 else torch.cat([both, bits[..., 2 * h :]], -1)
    return bits[..., 0]


def select_bits(s: Session, bits: torch.Tensor, v: AShare) -> AShare:
    """b v for XOR-shared bits b (uint8 0/1) and shared values v of b's shape, in one round: b's b2a
    and the product share one opening.

    1. Dealer (``bsel``): a random bit beta (XOR- and arithmetically shared), a mask a for v, [beta a].
    2. Open e = b ^ beta (packed) and d = v - a together.
    3. With b = e + (1 - 2e) beta: [b v] = e [a] + (1 - 2e)(d [beta] + [beta a]) + e d (party 0).
    Cost: 1 round, 16 B + 2 bits per element (against b2a and a Beaver product: 2 rounds, 32 B + 2 bits).
    Offline: 16 B/element dealer -> server."""
    n = bits.numel()
    beta, vb, a, ba = s.provider.get("bsel", shape=[n])
    flat = v.data.reshape(-1)
    mine_bits, mine = _pack(bits.reshape(-1) ^ beta), flat - a
    nb = mine_bits.numel()
    words = torch.cat([mine_bits, mine_bits.new_zeros(-nb % 8)]).view(DTYPE)  # the bits in the same frame
    theirs = s.peer.exchange([mine, words.to(flat.device)], "select-open")
    d = mine + theirs[0]
    theirs_bits = theirs[1].cpu().contiguous().view(torch.uint8)[:nb]
    e = (_unpack(mine_bits, n) ^ _unpack(theirs_bits, n)).to(DTYPE).to(flat.device)
    out = e * a + (1 - 2 * e) * (d * vb + ba)
    if s.role == Role.CLIENT:
        out = out + e * d
    return v._wrap(out.reshape(v.shape))


class _BitSelect:
    """``select_bits``' material: beta (XOR shares, uint8), [beta] and a mask a (ring), [beta a];
    correction 2n ring elements (the server's [beta] and [beta a])."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "bsel")
        (bit,) = _bits(prg, stream, s)
        ring = prg.ring(substream(stream, 1), s, s, s) if role == Role.CLIENT else prg.ring(substream(stream, 1), s)
        return [bit, *ring]

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "bsel")), 3, 1, 2)

    def correct(self, own0, own1, p):
        (b0, v0, a0, c0), (b1, a1) = own0, own1
        beta = (b0 ^ b1).to(torch.int64)
        return torch.cat([(beta - v0).reshape(-1), (beta * (a0 + a1) - c0).reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            bit, v, a, c = own
            return bit, v, a, c
        bit, a = own
        vb, c = corr.chunk(2)
        return bit, vb.reshape(a.shape), a, c.reshape(a.shape)


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


KINDS = {"bandp": _PackedAndTriple(), "b2a": _BitToArith(), "bsel": _BitSelect()}
