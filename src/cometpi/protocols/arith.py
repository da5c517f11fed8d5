"""Arithmetic on shares: truncation, products (Beaver), shared matmul, public products, re-sharing,
each with its dealer material kind.  Cost lines as in ``cometpi.protocols``.
"""

from __future__ import annotations

import math

import torch

from ..core import AShare, Role, Session, TruncMode
from ..ring import DTYPE, HEADROOM_BITS, RING_BITS, limbs_needed, logical_rshift, lshift, msb, random_ring, ring_matmul
from .material import Cost, _broadcast_to, _mm_shape, _shape, elementwise_cost

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


def _opened_trunc(x: AShare, bits: int, kind: str, **params):
    """The exact truncation of ``trunc_exact`` by a kind whose material starts with (r, [r >>> bits],
    [msb r]): (c, t, y, the rest of the material), c = x + 2^62 + r the opening, t = 1 - msb(c) and
    y = x / 2^bits; y's share is this party's part of -[r >>> bits] + t 2^(64 - bits) [msb r] plus, on
    party 0, the public (c >>> bits) - 2^(62 - bits).  Cost: 1 round, 16 B/element."""
    s = x.session
    r, r_shift, r_msb, *rest = s.provider.get(kind, shape=list(x.shape), f=bits, **params)
    client = s.role == Role.CLIENT
    mine = x.data + r + (_OFFSET if client else 0)
    c = mine + s.peer.exchange([mine], "trunc-open")[0]
    t = 1 - msb(c)
    y = -r_shift + lshift(t * r_msb, RING_BITS - bits)
    if client:
        y = y + logical_rshift(c, bits) - (_OFFSET >> bits)
    return c, t, x._wrap(y), (r, r_shift, r_msb, *rest)


class Pending:
    """A product not yet truncated: z = y 2^bits for the y a caller wants, kept so that the truncation can
    share its opening with what comes next (``compare.trunc_select``: a linear layer's output and its
    activation's sign test).  Reshapes like its value."""

    def __init__(self, z: AShare, bits: int):
        self.z, self.bits = z, bits

    @property
    def shape(self):
        return self.z.shape

    def reshape(self, *shape) -> Pending:
        return Pending(self.z.reshape(*shape), self.bits)

    def __getitem__(self, idx) -> Pending:
        return Pending(self.z[idx], self.bits)


class Kept:
    """The opening of a ``truncate_keep``: one later product with its input costs only the other factor's
    masked difference (``mul_kept``).  Used once: a second product with the same mask would open the
    difference of the two other factors."""

    def __init__(self, x: AShare, opened: torch.Tensor, b: torch.Tensor, a: torch.Tensor, ab: torch.Tensor):
        self.x, self.opened, self.b, self.a, self.ab, self.used = x, opened, b, a, ab, False


def truncate_keep(x: AShare, bits: int) -> tuple[AShare, Kept | AShare]:
    """``trunc_exact(x, bits)`` whose opening c = x + 2^62 + r also serves one later product with x: the
    dealer's material (``truncmul``) adds a Beaver half-triple whose x-mask is b = -(r + 2^62), so that
    x - b = c is already public.  In local truncation mode: the local shift, and x itself (a plain product
    later).
    Cost: as ``trunc_exact`` (1 round, 16 B/element).  Offline: 24 B/element dealer -> server (the
    truncation's 16 B and the product's c = a b)."""
    s = x.session
    if TruncMode(s.config.trunc) == TruncMode.LOCAL:
        return trunc_local(x, bits), x
    with s.span("trunc"):
        c, _, y, (r, _, _, a, ab) = _opened_trunc(x, bits, "truncmul")
        return y, Kept(x, c, -r - (_OFFSET if s.role == Role.CLIENT else 0), a, ab)


def mul_kept(y: AShare, kept: Kept | AShare, *, truncate_result: bool = True, extra_bits: int = 0) -> AShare:
    """y x for the x whose ``truncate_keep`` gave ``kept`` (y of x's shape): Beaver with x - b already open,
    so only e = y - a travels.
    Cost: 1 round, 16 B per element of y (plus truncation: exact +1 round, +16 B per element of x), against
    ``mul``'s 32 B per element (``square_keep``'s y broadcasts to x: 16 B per row)."""
    if isinstance(kept, AShare):
        return mul(y, kept, truncate_result=truncate_result, extra_bits=extra_bits)
    if kept.used:
        raise ValueError("a kept opening serves one product only")
    if tuple(y.shape) != tuple(kept.a.shape):
        raise ValueError(f"mul_kept: a factor of shape {tuple(y.shape)} where the opening kept material for "
                         f"{tuple(kept.a.shape)}")
    kept.used = True
    s = _same_session(y, kept.x)
    with s.span("mul"):
        mine = y.data - kept.a
        e = mine + s.peer.exchange([mine], "beaver-mul")[0]
        z = kept.ab + e * kept.b + kept.opened * kept.a
        if s.role == Role.CLIENT:
            z = z + e * kept.opened
        out = AShare(s, z)
        return truncate(out, s.fp.frac_bits + extra_bits) if truncate_result else out


class _TruncMul(_Trunc):
    """``truncate_keep``'s material: the exact truncation's r, [r >>> f], [msb r] and a Beaver half-triple
    a, c = a b with b = -(r + 2^62); correction 3n ring elements."""

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "truncmul")
        return prg.ring(stream, s, s, s, s, s) if role == Role.CLIENT else prg.ring(stream, s, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "truncmul")), 5, 2, 3)

    def correct(self, own0, own1, p):
        (r0, s0, m0, a0, c0), (r1, a1) = own0, own1
        trunc = super().correct((r0, s0, m0), (r1,), p)
        ab = (a0 + a1) * (-(r0 + r1) - _OFFSET) - c0
        return torch.cat([trunc, ab.reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return tuple(own)
        r, a = own
        sh, m, c = corr.chunk(3)
        return r, sh.reshape(r.shape), m.reshape(r.shape), a, c.reshape(r.shape)


class KeptTrunc:
    """A ``truncate_for_mul`` result y = P + B (P public, ``b`` this party's share of B, both from the
    truncation's opening; ``t`` = 1 - msb of it) with the material for one product by y
    (``mul_truncated``).  Used once."""

    def __init__(self, y: AShare, public: torch.Tensor, b: torch.Tensor, t: torch.Tensor, bits: int, material):
        self.y, self.public, self.b, self.t, self.bits = y, public, b, t, bits
        self.material, self.used = material, False


def truncate_for_mul(x: AShare, bits: int, other=None) -> tuple[AShare, KeptTrunc | AShare]:
    """``trunc_exact(x, bits)`` = y whose opening also serves one later product with y itself: y is the
    public (c >>> bits) - 2^(62 - bits) (party 0) plus B = -[r >>> bits] + (1 - msb c) 2^(64 - bits) [msb r],
    so a product a y needs only a's masked difference and the dealer's [a' (r >>> bits)], [a' msb r] for a's
    mask a' (kind ``truncout``; ``other``: the shape of that factor if it broadcasts to y's, a row's
    statistic).  The same y, and so the same product, as ``trunc_exact`` then ``mul``.
    In local truncation mode: the local shift, and y itself (a plain product later).
    Cost: as ``trunc_exact`` (1 round, 16 B/element).  Offline: 32 B/element dealer -> server."""
    s = x.session
    if TruncMode(s.config.trunc) == TruncMode.LOCAL:
        y = trunc_local(x, bits)
        return y, y
    with s.span("trunc"):
        extra = {} if other is None or tuple(other) == tuple(x.shape) else {"y": list(other)}
        c, t, y, (_, r_shift, r_msb, *material) = _opened_trunc(x, bits, "truncout", **extra)
        b = -r_shift + lshift(t * r_msb, RING_BITS - bits)
        public = logical_rshift(c, bits) - (_OFFSET >> bits)
        return y, KeptTrunc(y, public, b, t, bits, tuple(material))


def mul_truncated(a: AShare, kept: KeptTrunc | AShare, *, extra_bits: int = 0) -> AShare:
    """a y for the y of a ``truncate_for_mul`` (a of y's shape, or of the shape that truncation was told of,
    broadcasting to y's), truncated by f + extra_bits: Beaver with y's
    side already open (y = P + B), so only e = a - a' travels.
    1. Open e = a - a'.  2. [a y] = [a] P + e [B] + [a' B], with [a' B] = -[a' (r >>> f)] + (1 - msb c)
    2^(64 - f) [a' msb r] from the dealer.  3. Truncate.
    Cost: 1 round, 16 B per element of a + the truncation (exact: 1 round, 16 B per element of y), against
    ``mul``'s 32 B per element (a factor a that broadcasts to y, a row's statistic: 16 B per row)."""
    if isinstance(kept, AShare):
        return mul(a, kept, extra_bits=extra_bits)
    if kept.used:
        raise ValueError("a kept truncation serves one product only")
    if tuple(a.shape) != tuple(kept.material[0].shape):
        raise ValueError(f"mul_truncated: a factor of shape {tuple(a.shape)} where the truncation kept material for "
                         f"{tuple(kept.material[0].shape)}")
    kept.used = True
    s = _same_session(a, kept.y)
    a_mask, q_shift, q_msb = kept.material
    with s.span("mul"):
        mine = a.data - a_mask
        e = mine + s.peer.exchange([mine], "beaver-mul")[0]
        z = a.data * kept.public + e * kept.b - q_shift + lshift(kept.t * q_msb, RING_BITS - kept.bits)
        return truncate(AShare(s, z), s.fp.frac_bits + extra_bits)


class _TruncOut(_Trunc):
    """``truncate_for_mul``'s material: the exact truncation's r, [r >>> f], [msb r], a mask a' (of shape
    ``y``, default ``shape``: it broadcasts to it) and [a' (r >>> f)], [a' msb r]; correction 4n ring
    elements."""

    @staticmethod
    def _shapes(p):
        return _broadcast_to(p["shape"], p.get("y", p["shape"]), "truncout")

    def own(self, role, prg, stream, p):
        s, y = self._shapes(p)
        return prg.ring(stream, s, s, s, y, s, s) if role == Role.CLIENT else prg.ring(stream, s, y)

    def cost(self, p) -> Cost:
        s, y = self._shapes(p)
        n, m = math.prod(s), math.prod(y)
        return Cost(8 * 4 * n, 8 * (11 * n + 2 * m))

    def correct(self, own0, own1, p):
        (r0, s0, m0, a0, q10, q20), (r1, a1) = own0, own1
        trunc = super().correct((r0, s0, m0), (r1,), p)
        r, a = r0 + r1, a0 + a1
        q1 = a * logical_rshift(r, int(p["f"])) - q10
        q2 = a * msb(r) - q20
        return torch.cat([trunc, q1.reshape(-1), q2.reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return tuple(own)
        r, a = own
        sh, m, q1, q2 = (t.reshape(r.shape) for t in corr.chunk(4))
        return r, sh, m, a, q1, q2


class KeptPoly:
    """The opening of a ``truncate_poly``: u = c + b with c public and [b] from the dealer, with the
    material for one degree-2 polynomial in u whose coefficients are shared (``poly_kept``).  Used once."""

    def __init__(self, u: AShare, opened: torch.Tensor, b: torch.Tensor, material: tuple):
        self.u, self.opened, self.b, self.material, self.used = u, opened, b, material, False


def truncate_poly(u: AShare, bits: int) -> tuple[AShare, KeptPoly | AShare]:
    """``trunc_exact(u, bits)`` whose opening c = u + 2^62 + r also serves one later degree-2 polynomial
    c0 + c1 u + c2 u^2 with shared coefficients (``poly_kept``): with b = -(r + 2^62), u = c + b, so u^2 =
    c^2 + 2 c b + b^2 and every product with u or u^2 needs only the coefficient's masked difference and
    the dealer's products of its mask with b and b^2 (kind ``truncpoly``).  In local truncation mode:
    the local shift, and u itself (``poly_kept`` then multiplies by Horner's rule).
    Cost: as ``trunc_exact`` (1 round, 16 B/element).  Offline: 48 B/element dealer -> server (the
    truncation's 16 B, b^2 and the three products of the coefficients' masks)."""
    s = u.session
    if TruncMode(s.config.trunc) == TruncMode.LOCAL:
        return trunc_local(u, bits), u
    with s.span("trunc"):
        c, _, y, (r, _, _, *material) = _opened_trunc(u, bits, "truncpoly")
        return y, KeptPoly(u, c, -r - (_OFFSET if s.role == Role.CLIENT else 0), tuple(material))


def poly_kept(kept: KeptPoly | AShare, c0: AShare, c1: AShare, c2: AShare, extra: tuple[int, int, int], *,
              keep_rows: bool = False):
    """y = c0 / 2^e0 + c1 u / 2^e1 + c2 u^2 / 2^e2 at f fractional bits, for the u whose ``truncate_poly``
    gave ``kept`` and shared coefficients c_j at f + e_j bits (``extra`` = (e0, e1, e2), e0 <= e1 <= e2):
    the three terms are summed exactly at 3f + e2 bits and truncated once.  Domain: |y| < 2^(62 - 3f - e2)
    (4 at f = 16, e2 = 12), the exact truncation's headroom; ``RingOps`` checks the same bound.
    1. Open E1 = c1 - a1 and E2 = c2 - a2 together (a1, a2 fresh masks from ``truncpoly``).
    2. Locally, with u = c + b: c1 u = c c1 + E1 b + [a1 b]; c2 u^2 = c^2 c2 + 2 c (E2 b + [a2 b]) + E2 [b^2]
       + [a2 b^2]; T = c0 2^(2f + e2 - e0) + c1 u 2^(f + e2 - e1) + c2 u^2.
    3. y = trunc(T, 2f + e2).
    Cost: 1 round, 32 B/element + the truncation (1 round, 16 B/element), against Horner's two products
    with truncations (4 rounds, 96 B/element).
    In local truncation mode (``kept`` is u itself): Horner, (c2 u / 2^(e2 - e1) + c1) u / 2^(e1 - e0) + c0.
    ``keep_rows``: (y, a handle whose one later product of y by a row's statistic opens only that
    statistic: the final truncation is a ``truncate_for_mul``).
    Ref: Beaver (CRYPTO 1991) with one factor's opening shared by several products; the truncation's
    opening as a Beaver mask: ``truncate_keep``."""
    e0, e1, e2 = extra
    if not 0 <= e0 <= e1 <= e2:
        raise ValueError(f"poly_kept needs 0 <= e0 <= e1 <= e2, got {extra}")
    if isinstance(kept, AShare):  # local truncation mode
        acc = c1 + mul(c2, kept, extra_bits=e2 - e1)
        y = c0 + mul(acc, kept, extra_bits=e1 - e0)
        return (y, y) if keep_rows else y
    if kept.used:
        raise ValueError("a kept opening serves one polynomial only")
    kept.used = True
    s = _same_session(kept.u, c0, c1, c2)
    f = s.fp.frac_bits
    if 3 * f + e2 > HEADROOM_BITS:
        raise ValueError(f"poly_kept: 3f + e2 = {3 * f + e2} bits exceed the ring's headroom of {HEADROOM_BITS}")
    b2, a1, a2, a1b, a2b, a2b2 = kept.material
    c, b = kept.opened, kept.b
    with s.span("poly"):
        mine = [c1.data - a1, c2.data - a2]
        theirs = s.peer.exchange(mine, "beaver-poly")
        E1, E2 = theirs[0] + mine[0], theirs[1] + mine[1]
        c1u = c * c1.data + E1 * b + a1b
        c2u2 = c * c * c2.data + 2 * c * (E2 * b + a2b) + E2 * b2 + a2b2
        t = AShare(s, lshift(c0.data, 2 * f + e2 - e0) + lshift(c1u, f + e2 - e1) + c2u2)
        if keep_rows:
            return truncate_for_mul(t, 2 * f + e2, other=(*t.shape[:-1], 1))
        return trunc_exact(t, 2 * f + e2)


class _TruncPoly(_Trunc):
    """``truncate_poly``'s material: the exact truncation's r, [r >>> f], [msb r]; masks a1, a2 of the
    coefficients; [b^2], [a1 b], [a2 b], [a2 b^2] with b = -(r + 2^62); correction 6n ring elements."""

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "truncpoly")
        return prg.ring(stream, *[s] * 9) if role == Role.CLIENT else prg.ring(stream, s, s, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "truncpoly")), 9, 3, 6)

    def correct(self, own0, own1, p):
        (r0, s0, m0, a10, a20, q0, q1, q2, q3), (r1, a11, a21) = own0, own1
        trunc = super().correct((r0, s0, m0), (r1,), p)
        b = -(r0 + r1) - _OFFSET
        a1, a2 = a10 + a11, a20 + a21
        qs = [b * b - q0, a1 * b - q1, a2 * b - q2, a2 * b * b - q3]
        return torch.cat([trunc, *[q.reshape(-1) for q in qs]])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            r, sh, m, a1, a2, q0, q1, q2, q3 = own
            return r, sh, m, q0, a1, a2, q1, q2, q3
        r, a1, a2 = own
        sh, m, q0, q1, q2, q3 = (t.reshape(r.shape) for t in corr.chunk(6))
        return r, sh, m, q0, a1, a2, q1, q2, q3


def mul(x: AShare, y: AShare, *, truncate_result: bool = True, extra_bits: int = 0) -> AShare:
    """Element-wise product with a Beaver triple (a, b, c = ab); shapes broadcast like torch.

    1. Get [a], [b], [c] from the dealer.
    2. Open e = x - a and d = y - b together (one message each way).
    3. [z] = [c] + e[b] + d[a] + e d (the last term by party 0 only).
    4. Truncate by f + extra_bits (session's mode).
    Cost: 1 round, 32 B/element (plus truncation: exact +1 round, +16 B/element; local 0); where y
    broadcasts to x (a row's statistic), 16 B per element of x and 16 B per element of y (``mul_many``).
    Offline: 8 B/element dealer -> server.
    Ref: Beaver (CRYPTO 1991); CrypTen mpc/primitives/beaver.py.
    """
    return mul_many([(x, y)], truncate_result=truncate_result, extra_bits=extra_bits)[0]


def mul_many(pairs: list[tuple[AShare, AShare]], *, truncate_result: bool = True,
             extra_bits: int = 0) -> list[AShare]:
    """Several independent element-wise products in one round: all openings travel in one message
    each way and all truncations in one more (same Cost per element as ``mul``).  A pair whose one
    factor broadcasts to the other's shape (a row's statistic times the row) takes a broadcast triple
    (``mulb``): only the small factor's masked difference is opened at its own size, 16 B per element
    of the large one plus 16 B per element of the small one."""
    s = _same_session(*[t for p in pairs for t in p])
    with s.span("mul"):
        full, bcast = [], []  # (position, x, y) with equal shapes; (position, big, small) broadcasting
        for i, (x, y) in enumerate(pairs):
            shape = torch.broadcast_shapes(x.shape, y.shape)
            if x.shape == y.shape:
                full.append((i, x, y))
            elif tuple(x.shape) == tuple(shape) and y.data.numel() < x.data.numel():
                bcast.append((i, x, y))
            elif tuple(y.shape) == tuple(shape) and x.data.numel() < y.data.numel():
                bcast.append((i, y, x))
            else:
                full.append((i, *_broadcast(x, y)))
        mats, opens = [], []
        if full:
            x = torch.cat([t.data.reshape(-1) for _, t, _ in full])
            y = torch.cat([t.data.reshape(-1) for _, _, t in full])
            a, b, c = s.provider.get("mul", shape=[x.numel()])
            mats.append((x, y, a, b, c))
            opens += [x - a, y - b]
        for _, big, small in bcast:
            a, b, c = s.provider.get("mulb", x=list(big.shape), y=list(small.shape))
            mats.append((big.data, small.data, a, b, c))
            opens += [big.data - a, small.data - b]
        theirs = s.peer.exchange(opens, "beaver-mul")
        products = []
        for j, (_, _, a, b, c) in enumerate(mats):
            e, d = theirs[2 * j] + opens[2 * j], theirs[2 * j + 1] + opens[2 * j + 1]
            z = c + e * b + d * a
            products.append(z + e * d if s.role == Role.CLIENT else z)
        flat = torch.cat([z.reshape(-1) for z in products])
        if truncate_result:  # every product in one truncation request
            flat = truncate(AShare(s, flat), s.fp.frac_bits + extra_bits).data
        shapes = [t.shape for _, t, _ in full] + [t.shape for _, t, _ in bcast]
        out: list[AShare | None] = [None] * len(pairs)
        order = [i for i, _, _ in full] + [i for i, _, _ in bcast]
        for i, part, shape in zip(order, flat.split([math.prod(sh) for sh in shapes]), shapes, strict=True):
            out[i] = AShare(s, part.reshape(shape))
        return out


class _BroadcastMul:
    """Beaver triples for x * y where y broadcasts to x's shape: a (x's shape), b (y's), c = a b
    (x's shape); correction c's server share."""

    receiver = Role.SERVER

    @staticmethod
    def _shapes(p):
        return _broadcast_to(p["x"], p["y"], "mulb")

    def own(self, role, prg, stream, p):
        x, y = self._shapes(p)
        return prg.ring(stream, x, y, x) if role == Role.CLIENT else prg.ring(stream, x, y)

    def cost(self, p) -> Cost:
        x, y = self._shapes(p)
        nx, ny = math.prod(x), math.prod(y)
        return Cost(8 * nx, 8 * (4 * nx + 2 * ny))

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return (a0 + a1) * (b0 + b1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (*own, corr)


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


def square_keep(x: AShare, row, *, extra_bits: int = 0) -> tuple[AShare, Kept]:
    """``square(x)`` whose opening e = x - a also serves one later product of x by a factor of shape ``row``
    that broadcasts to x's (a row's statistic: the norms' rsqrt): the dealer adds a mask a2 for that factor
    and [a a2] (kind ``squarek``), so the product opens only the factor's masked difference (``mul_kept``).
    Cost: as ``square`` (1 round, 16 B/element, plus truncation).  Offline: 16 B/element dealer -> server."""
    s = x.session
    with s.span("square"):
        x = x._wrap(x.data.contiguous())
        a, c, a2, q = s.provider.get("squarek", shape=list(x.shape), y=list(row))
        mine = x.data - a
        e = mine + s.peer.exchange([mine], "beaver-square")[0]
        z = c + 2 * e * a
        if s.role == Role.CLIENT:
            z = z + e * e
        out = truncate(x._wrap(z), s.fp.frac_bits + extra_bits)
        return out, Kept(x, e, a, a2, q)


class _SquareKeep:
    """``square_keep``'s material: a, c = a^2 (x's shape), a mask a2 (shape ``y``, broadcasting to x's) and
    q = a a2; correction 2n ring elements (the server's c and q)."""

    receiver = Role.SERVER

    @staticmethod
    def _shapes(p):
        return _broadcast_to(p["shape"], p["y"], "squarek")

    def own(self, role, prg, stream, p):
        x, y = self._shapes(p)
        return prg.ring(stream, x, x, y, x) if role == Role.CLIENT else prg.ring(stream, x, y)

    def cost(self, p) -> Cost:
        x, y = self._shapes(p)
        nx, ny = math.prod(x), math.prod(y)
        return Cost(16 * nx, 8 * (7 * nx + 2 * ny))

    def correct(self, own0, own1, p):
        (a0, c0, b0, q0), (a1, b1) = own0, own1
        a, b = a0 + a1, b0 + b1
        return torch.cat([(a * a - c0).reshape(-1), (a * b - q0).reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return tuple(own)
        a, b = own
        c, q = (t.reshape(a.shape) for t in corr.chunk(2))
        return a, c, b, q


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


KINDS = {"mul": _Mul(), "mulb": _BroadcastMul(), "pmul": _PrivateMul(), "square": _Square(), "matmul": _Matmul(),
         "trunc": _Trunc(), "truncmul": _TruncMul(), "truncpoly": _TruncPoly(), "truncout": _TruncOut(),
         "squarek": _SquareKeep()}
