"""Interactive protocols on additive shares: products, truncation, private-weight matmul, re-sharing.

Every protocol runs SPMD: both parties call the same function with their own shares.  Each docstring
has a ``Cost:`` line (online rounds and payload bytes on the wire, both directions together, for n
elements of output unless stated) and a ``Ref:`` line.  ``tests/test_protocols.py`` asserts every
Cost line against the transport counters.  Dealer traffic is offline and listed separately.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .core import AShare, Role, Session, TruncMode
from .ring import (
    DTYPE,
    HEADROOM_BITS,
    RING_BITS,
    limb_stack,
    limbs_needed,
    logical_rshift,
    lshift,
    msb,
    random_ring,
    ring_matmul,
    wrap_bits,
)

_OFFSET = 1 << HEADROOM_BITS  # shifts |x| < 2^62 into [0, 2^63) for the wrap-corrected truncation


def _same_session(*xs: AShare) -> Session:
    s = xs[0].session
    if any(x.session is not s for x in xs):
        raise ValueError("shares belong to different sessions")
    return s


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def truncate(x: AShare, bits: int | None = None, mode: TruncMode | str | None = None) -> AShare:
    """Divide by 2^bits (default f), in the session's truncation mode unless ``mode`` is given."""
    s = x.session
    bits = s.fp.frac_bits if bits is None else bits
    mode = TruncMode(mode or s.config.trunc)
    if bits == 0:
        return x
    with s.span("trunc"):
        return trunc_exact(x, bits) if mode == TruncMode.EXACT else trunc_local(x, bits)


def trunc_local(x: AShare, bits: int) -> AShare:
    """SecureML local truncation: party 0 shifts its share, party 1 shifts the negation of its own.

    Result within 1 ulp of x/2^bits, except with probability about |x|/2^64 per element (x the ring
    value before truncation), when it is off by 2^(64-bits).  ``bench ops`` measures the rate.
    Cost: 0 rounds, 0 B.
    Ref: Mohassel & Zhang, SecureML (S&P 2017), Theorem 1.
    """
    if x.session.role == Role.CLIENT:
        return x._wrap(x.data >> bits)
    return x._wrap(-((-x.data) >> bits))


def trunc_exact(x: AShare, bits: int) -> AShare:
    """Wrap-corrected truncation with a dealer pair (r, [r >>> bits], [msb r]); needs |x| < 2^62.

    1. x' = x + 2^62 lies in [0, 2^63).  Each party sends c_j = x'_j + r_j; both learn c = x' + r
       (uniform, since r is).
    2. x' = c - r + w 2^64 with the wrap w = msb(r) (1 - msb(c)), linear in the shared bit msb(r).
    3. y = (c >>> bits) - [r >>> bits] + (1 - msb c) 2^(64-bits) [msb r] - 2^(62-bits); the dropped
       borrow of the low bits makes y = floor(x / 2^bits) or one more: error below 1 ulp, never large.
    The result does not depend on how x is shared (unlike ``trunc_local``): for |x| < 2^62 it never
    fails.  Outside that headroom it is wrong; ``RingOps`` checks the same bound in simulation.
    Cost: 1 round, 16 B/element.  Offline: 16 B/element dealer -> server.
    Ref: Escudero et al., "Improved primitives for MPC over mixed arithmetic-binary circuits"
    (CRYPTO 2020), probabilistic truncation with a known-range input.
    """
    return truncate_many([(x, bits)], mode=TruncMode.EXACT)[0]


def truncate_many(items: list[tuple[AShare, int]], mode: TruncMode | str | None = None) -> list[AShare]:
    """Several independent truncations (each with its own shift) in one round: in exact mode all
    openings travel in one message each way.  Same Cost per element as ``trunc_exact``
    (``trunc_local`` in local mode: 0 rounds)."""
    s = _same_session(*[x for x, _ in items])
    mode = TruncMode(mode or s.config.trunc)
    if mode == TruncMode.LOCAL:
        return [trunc_local(x, b) if b else x for x, b in items]
    todo = [(i, x, b) for i, (x, b) in enumerate(items) if b]
    out = [x for x, _ in items]
    if not todo:
        return out
    with s.span("trunc"):
        keys = [s.provider.get("trunc", shape=list(x.shape), f=b) for _, x, b in todo]
        mine = [x.data + r + (_OFFSET if s.role == Role.CLIENT else 0) for (_, x, _), (r, _, _) in zip(todo, keys,
                                                                                                     strict=True)]
        theirs = s.peer.exchange(mine, "trunc-open")
        for (i, x, b), (_, r_shift, r_msb), m, t in zip(todo, keys, mine, theirs, strict=True):
            c = m + t.to(m.device)
            y = -r_shift + lshift((1 - msb(c)) * r_msb, RING_BITS - b)
            if s.role == Role.CLIENT:
                y = y + logical_rshift(c, b) - (_OFFSET >> b)
            out[i] = x._wrap(y)
    return out


# --------------------------------------------------------------------------------------------------
# Products of two shared values (Beaver)
# --------------------------------------------------------------------------------------------------


def mul(x: AShare, y: AShare, *, truncate_result: bool = True, extra_bits: int = 0) -> AShare:
    """Element-wise product with a Beaver triple (a, b, c = ab); shapes broadcast like torch.

    1. Get [a], [b], [c] from the dealer.
    2. Open e = x - a and d = y - b together (one message each way).
    3. [z] = [c] + e[b] + d[a] + e d (the last term by party 0 only).
    4. Truncate by f + extra_bits (session's mode).
    Cost: 1 round, 32 B/element (plus truncation: exact +1 round, +16 B/element; local 0).
    Offline: 8 B/element dealer -> server.
    Ref: Beaver (CRYPTO 1991); CrypTen mpc/primitives/beaver.py.
    """
    return mul_many([(x, y)], truncate_result=truncate_result, extra_bits=extra_bits)[0]


def mul_many(pairs: list[tuple[AShare, AShare]], *, truncate_result: bool = True,
             extra_bits: int = 0) -> list[AShare]:
    """Several independent element-wise products in one round: all openings travel in one message
    each way and all truncations in one more (same Cost per element as ``mul``)."""
    s = _same_session(*[t for p in pairs for t in p])
    with s.span("mul"):
        xs, ys = zip(*[_broadcast(x, y) for x, y in pairs], strict=True)
        shapes = [x.shape for x in xs]
        flat = [t.numel() for t in (x.data for x in xs)]
        x = torch.cat([t.data.reshape(-1) for t in xs])
        y = torch.cat([t.data.reshape(-1) for t in ys])
        a, b, c = s.provider.get("mul", shape=[x.numel()])
        e, d = s.peer.exchange([x - a, y - b], "beaver-mul")
        e, d = e + x - a, d + y - b
        z = c + e * b + d * a
        if s.role == Role.CLIENT:
            z = z + e * d
        out = AShare(s, z)
        if truncate_result:
            out = truncate(out, s.fp.frac_bits + extra_bits)
        return [AShare(s, part.reshape(shape)) for part, shape in zip(out.data.split(flat), shapes, strict=True)]


def _broadcast(x: AShare, y: AShare) -> tuple[AShare, AShare]:
    if x.shape == y.shape:
        return x, y
    a, b = torch.broadcast_tensors(x.data, y.data)
    return x._wrap(a.contiguous()), y._wrap(b.contiguous())


def mul_private_pair(mine: torch.Tensor, session: Session, *, trunc_bits: int | None = None) -> AShare:
    """Product u * v where the client privately holds u and the server privately holds v (both
    fixed-point ring tensors of one shape; each party passes its own).

    1. Dealer: client gets a and [ab]_0, server gets b and [ab]_1.
    2. Client sends e = u - a, server sends d = v - b (together).
    3. uv = e d + e b + a d + ab: client takes e d + a d + [ab]_0, server e b + [ab]_1.
    4. Truncate by ``trunc_bits`` (default f; 0: none).
    Cost: 1 round, 16 B/element (plus truncation).  Offline: 8 B/element dealer -> server.
    Ref: Beaver's trick with each factor known to one party (as in Comet's product of the two
    parties' local initial-guess factors).
    """
    s = session
    with s.span("mul_private_pair"):
        shape = list(mine.shape)
        if s.role == Role.CLIENT:
            a, c = s.provider.get("pmul", shape=shape)
            (d,) = s.peer.exchange([mine - a], "pmul-open")
            e = mine - a
            z = e * d + a * d + c
        else:
            b, c = s.provider.get("pmul", shape=shape)
            (e,) = s.peer.exchange([mine - b], "pmul-open")
            z = e * b + c
        return truncate(AShare(s, z), s.fp.frac_bits if trunc_bits is None else trunc_bits)


def square(x: AShare, *, truncate_result: bool = True, extra_bits: int = 0) -> AShare:
    """Element-wise square with a dealer pair (a, c = a^2).

    1. Open e = x - a.  2. [x^2] = [c] + 2e[a] + e^2 (party 0).  3. Truncate by f + extra_bits.
    Cost: 1 round, 16 B/element (plus truncation).  Offline: 8 B/element dealer -> server.
    Ref: standard Beaver squaring (e.g. CrypTen ``square``).
    """
    s = x.session
    with s.span("square"):
        x = x._wrap(x.data.contiguous())
        a, c = s.provider.get("square", shape=list(x.shape))
        (e,) = s.peer.exchange([x.data - a], "beaver-square")
        e = e + x.data - a
        z = c + 2 * e * a
        if s.role == Role.CLIENT:
            z = z + e * e
        out = x._wrap(z)
        return truncate(out, s.fp.frac_bits + extra_bits) if truncate_result else out


def matmul(x: AShare, y: AShare, *, truncate_result: bool = True) -> AShare:
    """x @ y for two shared matrices (batched like torch.matmul) with a matrix Beaver triple.

    1. Get [A], [B], [C = A @ B].  2. Open E = X - A and D = Y - B together.
    3. [Z] = [C] + E @ [B] + [A] @ D + E @ D (party 0).  4. Truncate the |Z| outputs by f.
    Cost: 1 round, 16 B x (|X| + |Y|) (plus truncation of |Z| elements).
    Offline: 8 B x |Z| dealer -> server.
    Ref: Mohassel & Zhang, SecureML, matrix triples; CrypTen ``beaver.matmul``.
    """
    s = _same_session(x, y)
    with s.span("matmul"):
        A, B, C = s.provider.get("matmul", a=list(x.shape), b=list(y.shape))
        E, D = s.peer.exchange([x.data - A, y.data - B], "beaver-matmul")
        E, D = E + x.data - A, D + y.data - B
        z = C + ring_matmul(E, B) + ring_matmul(A, D)
        if s.role == Role.CLIENT:
            z = z + ring_matmul(E, D)
        out = x._wrap(z)
        return truncate(out) if truncate_result else out


def mul_public(x: AShare, c) -> AShare:
    """Multiply by a public real constant or tensor, then truncate.  Constants below 1 are encoded
    with up to 16 extra fractional bits (``FixedPoint.encode_const``) and the product truncated by
    as many more bits.

    Cost: 0 rounds, 0 B (plus truncation).
    """
    enc, bits = x.session.fp.encode_const(c)
    return truncate(x._wrap(x.data * enc.to(x.data.device)), bits)


def matmul_public(x: AShare, w: torch.Tensor) -> AShare:
    """x @ w for a public real matrix w, then truncate.  Cost: 0 rounds, 0 B (plus truncation)."""
    enc = x.session.fp.encode(w).to(x.data.device)
    return truncate(x._wrap(ring_matmul(x.data, enc, b_limbs=limbs_needed(int(enc.abs().max())))))


# --------------------------------------------------------------------------------------------------
# Linear layers with a server-private weight
# --------------------------------------------------------------------------------------------------


class PrivateWeight:
    """A server-private weight W, (k, m) for a matmul or (d,) for an element-wise product over the last
    dimension, masked once per session in a 64- or 32-bit ring.

    On the server it holds W (ring encoded); on the client it holds F = W - B, uniform because the
    mask B (from the dealer, known to the server only) is.  Create it with ``prepare_weight``.
    """

    def __init__(self, session: Session, index: int, shape: tuple, w=None, f=None, limbs=4, bits=64):
        self.session, self.index, self.shape = session, index, shape
        self.w, self.f, self.limbs, self.bits = w, f, limbs, bits
        self._stack = None

    def stack(self) -> torch.Tensor:
        """This party's operand (W on the server, F on the client) as a ``ring.limb_stack`` for the limb
        matmul (off the CPU), computed on first use and kept for the session (float32: 4 B per limb
        per weight element more memory, instead of splitting the weight at every query)."""
        if self._stack is None:
            mine = self.w if self.w is not None else self.f
            self._stack = limb_stack(mine, min(self.limbs if self.w is not None else 4, self.bits // 16))
        return self._stack

    @property
    def is_vector(self) -> bool:
        return len(self.shape) == 1

    def params(self, x_shape) -> dict:
        p = {"x": list(x_shape), "w": list(self.shape), "widx": self.index}
        if self.bits != 64:
            p["bits"] = self.bits
        if self.is_vector:
            p["mode"] = "vec"
        return p


def _wire(t: torch.Tensor, bits: int) -> torch.Tensor:
    return t.to(torch.int32) if bits == 32 else t


def prepare_weight(session: Session, w: torch.Tensor | None = None, *, shape=None, bits: int = 64,
                   encoded: bool = False) -> PrivateWeight:
    """Mask a server-private weight (2-D matrix or 1-D vector) for this session (offline).  The server
    passes ``w`` (real values, or ring values with ``encoded``), the client passes ``shape``.

    1. Both request ``wmask``: the server expands B from its dealer seed.
    2. The server sends F = W - B to the client (offline: it depends on the model only).
    Cost: online 0; offline 1 round, 8 B (4 B in a 32-bit ring) per weight element server -> client.
    Ref: Delphi (USENIX Sec 2020) preprocessing; SPU ``MulPriv``; docs ../shared/COMET.md section 2.
    """
    s = session
    if s.role == Role.SERVER:
        if w is None:
            raise ValueError("the server must pass the weight")
        enc = (w.to(DTYPE) if encoded else s.fp.encode(w)).to(s.device)
        shape = tuple(enc.shape)
    elif shape is None:
        raise ValueError("the client must pass the weight's shape")
    shape = tuple(shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"private weights are (k, m) matrices or (d,) vectors, got shape {shape}")
    idx = s.provider.index
    b = s.provider.get("wmask", shape=list(shape), **({"bits": bits} if bits != 64 else {}))
    with s.span("prepare_weight"), s.offline():
        if s.role == Role.SERVER:
            s.peer.send(_wire(wrap_bits(enc - b, bits), bits), "weight-mask")
            return PrivateWeight(s, idx, shape, w=enc, limbs=limbs_needed(int(enc.abs().max())), bits=bits)
        f = s.peer.recv("weight-mask", shape=shape, dtype=torch.int32 if bits == 32 else DTYPE)
        return PrivateWeight(s, idx, shape, f=f.to(DTYPE).to(s.device), bits=bits)


def matmul_private(x: AShare, pw: PrivateWeight, *, truncate_result: bool = True) -> AShare:
    """X @ W for shared X (..., n, k) and a server-private W (k, m); or X * w for a server-private
    vector w (d,) over X's last dimension (``pw.is_vector``).

    1. Dealer: client gets (A, C0), server C1, with C0 + C1 = A @ B (B = W's mask).
    2. Client sends E = X0 - A (the only online message).
    3. Server: Y1 = (E + X1) @ W + C1 (W small: fewer limbs).  Client: Y0 = A @ F + C0,
       which is input-independent.  Y0 + Y1 = (X - A) W + A (W - B) + A B = X W.
    4. Truncate by f.
    In a 32-bit ring (``pw.bits == 32``) everything is reduced modulo 2^32 and E travels as int32;
    the result is a 32-bit sharing (see ``lift``), not truncated.
    Cost: 1 round, 8 B x |X| client -> server (4 B in a 32-bit ring) (plus truncation of |Y|).
    Offline: 8 B x |Y| dealer -> client.
    Ref: Delphi / SPU MulPriv; ../shared/COMET.md section 2.
    """
    s = _same_session(x)
    if pw.session is not s:
        raise ValueError("the weight was prepared in another session")
    if x.shape[-1] != pw.shape[0]:
        raise ValueError(f"cannot multiply {x.shape} by a weight of shape {pw.shape}")
    bits, diag = pw.bits, pw.bits // 16

    def prod(a, b, limbs=4):
        if pw.is_vector:
            return a * b
        stack = pw.stack() if a.device.type != "cpu" else None  # the limb split: off the CPU only
        return ring_matmul(a, b, b_limbs=limbs, diagonals=diag, b_stack=stack)

    with s.span("matmul_private" if not pw.is_vector else "mul_private_vector"):
        if s.role == Role.CLIENT:
            a, c0 = s.provider.get("mulpriv", **pw.params(x.shape))
            s.peer.send(_wire(wrap_bits(x.data - a, bits), bits), "mulpriv-e")
            y = prod(a, pw.f) + c0
        else:
            c1 = s.provider.get("mulpriv", **pw.params(x.shape))
            e = s.peer.recv("mulpriv-e", shape=x.shape, dtype=torch.int32 if bits == 32 else DTYPE)
            y = prod(e.to(DTYPE).to(x.data.device) + x.data, pw.w, pw.limbs) + c1
        out = x._wrap(wrap_bits(y, bits))
        if bits != 64:
            return out
        return truncate(out) if truncate_result else out


def lift(y: AShare, bits: int = 32) -> AShare:
    """Turn a sharing modulo 2^bits of |y| < 2^(bits-2) into a sharing in Z_2^64.

    1. z = y + 2^(bits-2) lies in [0, 2^(bits-1)).  Dealer: r < 2^bits unknown to both, 64-bit shares
       of r and of its top bit.  Open c = z + r mod 2^bits (``bits`` bits each way).
    2. z = c - r + 2^bits msb(r) (1 - msb(c)) over the integers: linear in the shared r and msb(r).
    Cost: 1 round, 2 x bits/8 B per element (8 B for bits = 32).  Offline: 16 B/element -> server.
    Ref: the same known-range wrap correction as ``trunc_exact``.
    """
    s = y.session
    with s.span("lift"):
        r, m = s.provider.get("lift", shape=list(y.shape), bits=bits)
        mine = wrap_bits(y.data + r + ((1 << (bits - 2)) if s.role == Role.CLIENT else 0), bits)
        theirs = s.peer.exchange_wire(mine.to(torch.int32) if bits == 32 else mine, "lift-open")
        c = (mine + theirs.to(DTYPE)) & ((1 << bits) - 1)
        top = (c >> (bits - 1)) & 1
        z = -r + ((1 - top) * m) * (1 << bits)
        if s.role == Role.CLIENT:
            z = z + c - (1 << (bits - 2))
        return y._wrap(z)


def embedding_lookup(ids: torch.Tensor | None, table: PrivateWeight, *, n_tokens=None) -> AShare:
    """Rows of a server-private table (V, d) selected by the client's private token ids, as a 64-bit
    sharing: the client's one-hot (T, V) times the table in a 32-bit ring, then ``lift``.

    The one-hot is an integer (not fixed point), so no truncation; table entries must satisfy
    |w| 2^f < 2^30.  The client passes ``ids`` (T,), the server ``n_tokens``.
    Cost: 2 rounds; 4 B x T x V client -> server (the masked one-hot) + 8 B x T x d (lift).
    Offline: once per session 4 B x V x d (the masked table); per query 4 B x T x d + 16 B x T x d.
    Ref: one-hot lookup as in SPU/CrypTen, with the smaller ring suggested by their 23 GB embedding.
    """
    s = table.session
    vocab = table.shape[0]
    with s.span("embedding"):
        if s.role == Role.CLIENT:
            if ids is None:
                raise ValueError("the client must pass the token ids")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise ValueError(f"token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
            onehot = torch.nn.functional.one_hot(ids.reshape(-1), vocab).to(DTYPE)
            x = AShare(s, onehot.to(s.device))
        else:
            x = AShare(s, torch.zeros(n_tokens, vocab, dtype=DTYPE, device=s.device))
        return lift(matmul_private(x, table), table.bits)


# --------------------------------------------------------------------------------------------------
# Re-sharing
# --------------------------------------------------------------------------------------------------


def reshare(x: AShare, new_share0: torch.Tensor | None = None) -> AShare:
    """Re-share x so that party 0 holds ``new_share0`` (uniform if not given) and party 1 holds
    x - new_share0.  Party 0 sends D = x0 - new_share0.  Party 1's new share is a one-time-pad of x
    only when new_share0 is uniform; Comet's flooding passes a non-uniform one (see approx).

    Cost: 1 round, 8 B/element party 0 -> party 1.
    Ref: ../shared/COMET.md section 4 (share flooding).
    """
    s = x.session
    with s.span("reshare"):
        if s.role == Role.CLIENT:
            if new_share0 is None:
                (new_share0,) = random_ring(x.shape, device=x.data.device)
            s.peer.send(x.data - new_share0, "reshare")
            return x._wrap(new_share0.to(DTYPE))
        d = s.peer.recv("reshare", shape=x.shape, dtype=DTYPE).to(x.data.device)
        return x._wrap(x.data + d)


# --------------------------------------------------------------------------------------------------
# Secure comparison (dealer-assisted): DReLU, ReLU, max, argmax
# --------------------------------------------------------------------------------------------------

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


def drelu(x: AShare) -> AShare:
    """[x >= 0] as an arithmetic share of 0/1, for |x| < 2^62 (ring integers).

    1. Dealer: r (arithmetic shares) and XOR shares of r's bits.  Open c = x + 2^62 + r.
    2. x' = x + 2^62 in [0, 2^63) and bit 62 of x' = c_62 ^ r_62 ^ [c mod 2^62 < r mod 2^62].
    3. The borrow [c_low < r_low] (public c, bit-shared r) by a comparison tree over 64 padded bit
       positions: leaves lt = !c_i & r_i, eq = !(c_i ^ r_i); a level combines (hi, lo) pairs as
       lt = lt_hi ^ (eq_hi & lt_lo), eq = eq_hi & eq_lo with two ANDs (one at the top): 6 rounds,
       125 ANDs per element.
    4. b2a of bit 62 of x' (which is [x >= 0]).
    Cost: 8 rounds, 16 B + 500 bits + 2 bits = 78.75 B/element (bits packed per row of the tree,
    each row rounding up to whole bytes).  Offline: 8 B (r bits) + 125 bits (AND triples) + 8 B (b2a) per
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
        # 64 positions: 6 levels, 125 ANDs (bits packed along the elements)
        borrow = _unpack_rows(_combine_chunks(s, _pack_rows(lt.T.contiguous()), _pack_rows(eq.T.contiguous())), n)
        bit = borrow ^ rb[:, _LOW_BITS] ^ (cb[:, _LOW_BITS] if is0 else 0)
        return b2a(s, bit).reshape(*shape)


def relu(x: AShare) -> AShare:
    """max(x, 0) = x * [x >= 0] (the 0/1 factor is an integer: no truncation).

    Cost: drelu + 1 round, 32 B/element.
    """
    with x.session.span("relu"):
        return mul(x, drelu(x), truncate_result=False)


def maximum(x: AShare, dim: int = -1) -> AShare:
    """Max along ``dim`` by a tree of max(a, b) = b + relu(a - b); keeps the dimension (size 1).

    Cost: ceil(log2 n) levels of relu on the halves (9 rounds each).
    """
    s = x.session
    with s.span("max"):
        x = x._wrap(x.data.movedim(dim, -1))
        while x.shape[-1] > 1:
            n = x.shape[-1]
            h = n // 2
            a, b = x[..., :h], x[..., h : 2 * h]
            m = b + relu(a - b)
            x = m if n % 2 == 0 else x._wrap(torch.cat([m.data, x.data[..., 2 * h :]], -1))
        return x._wrap(x.data.movedim(-1, dim))


def argmax_onehot(x: AShare, dim: int = -1) -> AShare:
    """One-hot (0/1 integers) of the maximum along ``dim``; ties give several ones.

    Cost: ``maximum`` + one drelu over all elements.
    """
    with x.session.span("argmax"):
        return drelu(x - maximum(x, dim))


# --------------------------------------------------------------------------------------------------
# Narrow comparison: one small-ring opening, one-time truth tables, a short AND tree
# --------------------------------------------------------------------------------------------------


def _combine_chunks(s: Session, lt: torch.Tensor, eq: torch.Tensor) -> torch.Tensor:
    """[a < b] from per-chunk (lt, eq) XOR shares, packed: (C, nbytes) uint8, chunk 0 the least
    significant.  Pairs (lo, hi) combine as lt = lt_hi ^ (eq_hi & lt_lo), eq = eq_hi & eq_lo; an odd
    top chunk passes through; the last level computes lt only.  ceil(log2 C) rounds, one message
    each (``and_packed`` on whole packed rows).  Returns the packed (nbytes,) result."""
    while lt.shape[0] > 1:
        c = lt.shape[0]
        h = c // 2
        lo_lt, hi_lt, lo_eq, hi_eq = lt[0:2 * h:2], lt[1:2 * h:2], eq[0:2 * h:2], eq[1:2 * h:2]
        if c > 2:
            both = and_packed(s, torch.cat([hi_eq, hi_eq]), torch.cat([lo_lt, lo_eq]))
            new_lt, new_eq = hi_lt ^ both[:h], both[h:]
        else:
            new_lt, new_eq = hi_lt ^ and_packed(s, hi_eq, lo_lt), None
        if c % 2:
            new_lt = torch.cat([new_lt, lt[-1:]])
            new_eq = torch.cat([new_eq, eq[-1:]])
        lt, eq = new_lt, new_eq
    return lt[0]


def compare_many(x: AShare, k: int, thresholds) -> AShare:
    """[x >= t] for each public ring integer t (a 1-D list or tensor of them), as arithmetic 0/1
    shares of shape (*x.shape, len(thresholds)); valid while every |x - t| < 2^k.

    1. x' = x - t + 2^k lies in [0, 2^(k+1)) for every t.  Dealer (``cmpn``): r uniform mod 2^n,
       n = k + 1, XOR shares of r's bit k and one-time truth tables of r's 4-bit chunks.  Each
       party sends its share of x + 2^k + r reduced mod 2^n: c is uniform mod 2^n, so nothing leaks
       however small x is (the full-ring trap of Curl/SHAFT is avoided by reducing first).
    2. For each t, c_t = c - t mod 2^n = x' + r mod 2^n, and bit k of x' is
       c_t[k] ^ r[k] ^ [c_t mod 2^k < r mod 2^k].  The borrow's per-chunk (lt, eq) bits are table
       lookups at the public chunks of c_t (local: a shift of the chunk's 32-bit table word); one r
       serves every threshold.
    3. Chunks combine in an AND tree on bits packed 8 per byte (``_combine_chunks``), then b2a.
    Outside the domain (some |x - t| >= 2^k) the opened value wraps modulo 2^n and the bit is that of
    x - t + 2^k reduced mod 2^(k+1): wrong, never a leak; ``RingOps`` raises ``HeadroomError`` there.
    Cost: 2 + ceil(log2 C) rounds (C = ceil(k/4) chunks); online per element 2 x 4 B for the
    opening (n <= 32; 2 x 8 B above), plus per threshold 4 bits per AND (2C - 3 ANDs for C >= 2,
    from the tree) and 2 bits of b2a (each packed chunk row of a tree level rounds up to whole bytes:
    at most 2 (4 floor(C/2)) B more per level).  Offline: (1 + 32 C) bits + 1 bit per AND + 8 B per threshold
    (b2a), dealer -> server.
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
        r, words, r_top = s.provider.get("cmpn", shape=[n], k=k)
        mine = (x.data.reshape(-1) + r + ((1 << k) if s.role == Role.CLIENT else 0)) & mask
        wire = mine.to(torch.int32) if n_bits <= 32 else mine
        c = (mine + s.peer.exchange_wire(wire, "cmp-open").to(DTYPE)) & mask
        chunks = -(-k // 4)
        lt = torch.empty((chunks, n, t), dtype=torch.uint8)
        eq = torch.empty((chunks, n, t), dtype=torch.uint8)
        top = torch.empty((n, t), dtype=torch.uint8)
        small = n_bits <= 31  # the lookups in int32 (half the memory traffic) where values fit
        cw, tw = (c.to(torch.int32), thr.to(torch.int32)) if small else (c, thr)
        block = max(1, (1 << 20) // t)  # the local lookups in blocks of elements (temporaries stay small)
        for a in range(0, n, block):
            sl = slice(a, min(n, a + block))
            ct = (cw[sl, None] - tw[None, :]) & mask  # (b, t): x' + r mod 2^n for each threshold
            top[sl] = ct >> k
            low = ct & ((1 << k) - 1)
            ws = words[sl] if small else words[sl].to(DTYPE)
            for j in range(chunks):  # the table word's bit v is lt[v], bit 16 + v is eq[v]
                w = ws[:, j, None] >> ((low >> (4 * j)) & 15)
                lt[j, sl] = w & 1
                eq[j, sl] = (w >> 16) & 1
        packed = _combine_chunks(s, _pack_rows(lt.reshape(chunks, n * t)), _pack_rows(eq.reshape(chunks, n * t)))
        del lt, eq
        bit = _unpack_rows(packed, n * t).reshape(n, t) ^ _unpack_rows(r_top, n)[:, None]
        if s.role == Role.CLIENT:
            bit = bit ^ top
        return b2a(s, bit).reshape(*shape, t)


def drelu_narrow(x: AShare, k: int) -> AShare:
    """[x >= 0] for |x| < 2^k (ring integers) by ``compare_many`` with the single threshold 0.

    Cost: as ``compare_many`` with one threshold; at k = 24: 5 rounds, 8 B + 9 ANDs (36 bits) +
    2 bits = 12.75 B/element (against ``drelu``'s 78.75 B and 8 rounds over the full ring).
    """
    with x.session.span("drelu"):
        return compare_many(x, k, [0])[..., 0]
