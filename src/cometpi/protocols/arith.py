"""Arithmetic on shares: truncation, products (Beaver), shared matmul, public products, re-sharing,
each with its dealer material kind.  Cost lines as in ``cometpi.protocols``.
"""

from __future__ import annotations

import math

import torch

from ..core import AShare, Role, Session, TruncMode
from ..ring import DTYPE, HEADROOM_BITS, RING_BITS, limbs_needed, logical_rshift, lshift, msb, random_ring, ring_matmul
from .material import Cost, _mm_shape, _shape, elementwise_cost

_OFFSET = 1 << HEADROOM_BITS  # shifts |x| < 2^62 into [0, 2^63) for the wrap-corrected truncation


def _same_session(*xs: AShare) -> Session:
    s = xs[0].session
    if any(x.session is not s for x in xs):
        raise ValueError("shares belong to different sessions")
    return s


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


class _Trunc:
    """r, s = r >>> f (logical) and m = msb(r) for the exact truncation; correction 2n ring elements."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "trunc")
        return prg.ring(stream, s, s, s) if role == Role.CLIENT else prg.ring(stream, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "trunc")), 3, 1, 2)

    def correct(self, own0, own1, p):
        (r0, s0, m0), (r1,) = own0, own1
        r = r0 + r1
        return torch.cat([(logical_rshift(r, int(p["f"])) - s0).reshape(-1), (msb(r) - m0).reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return tuple(own)
        s, m = corr.chunk(2)
        return own[0], s.reshape(own[0].shape), m.reshape(own[0].shape)


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


class _Mul:
    """Beaver triples a, b, c = a b; correction n ring elements (c's server share)."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "mul")
        return prg.ring(stream, s, s, s) if role == Role.CLIENT else prg.ring(stream, s, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "mul")), 3, 2, 1)

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return (a0 + a1) * (b0 + b1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (*own, corr)


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


class _PrivateMul:
    """u (client's) times v (server's): client a, [ab]_0; server b, [ab]_1."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "pmul")
        return prg.ring(stream, s, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "pmul")), 2, 2, 1)

    def correct(self, own0, own1, p):
        (a, c0), (b, _) = own0, own1
        return a * b - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


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


class _Square:
    """Square pairs a, c = a^2; correction n ring elements."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "square")
        return prg.ring(stream, s, s) if role == Role.CLIENT else prg.ring(stream, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "square")), 2, 1, 1)

    def correct(self, own0, own1, p):
        (a0, c0), (a1,) = own0, own1
        return (a0 + a1) * (a0 + a1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


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


class _Matmul:
    """Matrix triples A, B, C = A @ B; correction |C| ring elements."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        a, b = _shape(p["a"], "matmul A"), _shape(p["b"], "matmul B")
        c = _mm_shape(a, b)
        return prg.ring(stream, a, b, c) if role == Role.CLIENT else prg.ring(stream, a, b)

    def cost(self, p) -> Cost:
        a, b = _shape(p["a"], "matmul A"), _shape(p["b"], "matmul B")
        c = math.prod(_mm_shape(a, b))
        return Cost(8 * c, 8 * (3 * math.prod(a) + 3 * math.prod(b) + 2 * c), c * a[-1])

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return ring_matmul(a0 + a1, b0 + b1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (*own, corr)


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


KINDS = {"mul": _Mul(), "pmul": _PrivateMul(), "square": _Square(), "matmul": _Matmul(), "trunc": _Trunc()}
