"""Interactive protocols on additive shares: products, truncation, private-weight matmul, re-sharing.

Every protocol runs SPMD: both parties call the same function with their own shares.  Each docstring
has a ``Cost:`` line (online rounds and payload bytes on the wire, both directions together, for n
elements of output unless stated) and a ``Ref:`` line.  ``tests/test_protocols.py`` asserts every
Cost line against the transport counters.  Dealer traffic is offline and listed separately.
"""

from __future__ import annotations

import torch

from .core import AShare, Role, Session, TruncMode
from .ring import (
    DTYPE,
    HEADROOM_BITS,
    RING_BITS,
    limbs_needed,
    logical_rshift,
    lshift,
    msb,
    random_ring,
    ring_matmul,
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
    Cost: 1 round, 16 B/element.  Offline: 16 B/element dealer -> server.
    Ref: Escudero et al., "Improved primitives for MPC over mixed arithmetic-binary circuits"
    (CRYPTO 2020), probabilistic truncation with a known-range input.
    """
    s = x.session
    r, r_shift, r_msb = s.provider.get("trunc", shape=list(x.shape), f=bits)
    mine = x.data + r + (_OFFSET if s.role == Role.CLIENT else 0)
    c = mine + s.peer.exchange([mine], "trunc-open")[0].to(mine.device)
    no_wrap_c = 1 - msb(c)
    y = -r_shift + lshift(no_wrap_c * r_msb, RING_BITS - bits)
    if s.role == Role.CLIENT:
        y = y + logical_rshift(c, bits) - (_OFFSET >> bits)
    return x._wrap(y)


# --------------------------------------------------------------------------------------------------
# Products of two shared values (Beaver)
# --------------------------------------------------------------------------------------------------


def mul(x: AShare, y: AShare, *, truncate_result: bool = True) -> AShare:
    """Element-wise product with a Beaver triple (a, b, c = ab); shapes must be equal.

    1. Get [a], [b], [c] from the dealer.
    2. Open e = x - a and d = y - b together (one message each way).
    3. [z] = [c] + e[b] + d[a] + e d (the last term by party 0 only).
    4. Truncate by f (session's mode).
    Cost: 1 round, 32 B/element (plus truncation: exact +1 round, +16 B/element; local 0).
    Offline: 8 B/element dealer -> server.
    Ref: Beaver (CRYPTO 1991); CrypTen mpc/primitives/beaver.py.
    """
    s = _same_session(x, y)
    if x.shape != y.shape:
        raise ValueError(f"mul needs equal shapes, got {x.shape} and {y.shape}; broadcast first")
    with s.span("mul"):
        a, b, c = s.provider.get("mul", shape=list(x.shape))
        e, d = s.peer.exchange([x.data - a, y.data - b], "beaver-mul")
        e, d = e + x.data - a, d + y.data - b
        z = c + e * b + d * a
        if s.role == Role.CLIENT:
            z = z + e * d
        out = x._wrap(z)
        return truncate(out) if truncate_result else out


def square(x: AShare, *, truncate_result: bool = True) -> AShare:
    """Element-wise square with a dealer pair (a, c = a^2).

    1. Open e = x - a.  2. [x^2] = [c] + 2e[a] + e^2 (party 0).  3. Truncate by f.
    Cost: 1 round, 16 B/element (plus truncation).  Offline: 8 B/element dealer -> server.
    Ref: standard Beaver squaring (e.g. CrypTen ``square``).
    """
    s = x.session
    with s.span("square"):
        a, c = s.provider.get("square", shape=list(x.shape))
        (e,) = s.peer.exchange([x.data - a], "beaver-square")
        e = e + x.data - a
        z = c + 2 * e * a
        if s.role == Role.CLIENT:
            z = z + e * e
        out = x._wrap(z)
        return truncate(out) if truncate_result else out


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
    """Multiply by a public real constant or tensor (encoded at f bits), then truncate.

    Cost: 0 rounds, 0 B (plus truncation).
    """
    enc = x.session.fp.encode(c).to(x.data.device)
    return truncate(x._wrap(x.data * enc))


def matmul_public(x: AShare, w: torch.Tensor) -> AShare:
    """x @ w for a public real matrix w, then truncate.  Cost: 0 rounds, 0 B (plus truncation)."""
    enc = x.session.fp.encode(w).to(x.data.device)
    return truncate(x._wrap(ring_matmul(x.data, enc, b_limbs=limbs_needed(int(enc.abs().max())))))


# --------------------------------------------------------------------------------------------------
# Linear layers with a server-private weight
# --------------------------------------------------------------------------------------------------


class PrivateWeight:
    """A server-private weight W (k x m), masked once per session.

    On the server it holds W (ring encoded); on the client it holds F = W - B, uniform because the
    mask B (from the dealer, known to the server only) is.  Create it with ``prepare_weight``.
    """

    def __init__(self, session: Session, index: int, shape: tuple[int, int], w=None, f=None, limbs=4):
        self.session, self.index, self.shape = session, index, shape
        self.w, self.f, self.limbs = w, f, limbs


def prepare_weight(session: Session, w: torch.Tensor | None = None, *, shape=None) -> PrivateWeight:
    """Mask a server-private weight for this session (offline). The server passes ``w`` (real
    values), the client passes ``shape``.

    1. Both request ``wmask``: the server expands B (k x m) from its dealer seed.
    2. The server sends F = W - B to the client (offline: it depends on the model only).
    Cost: online 0; offline 1 round, 8 B x k x m server -> client.
    Ref: Delphi (USENIX Sec 2020) preprocessing; SPU ``MulPriv``; docs ../shared/COMET.md section 2.
    """
    s = session
    if s.role == Role.SERVER:
        if w is None:
            raise ValueError("the server must pass the weight")
        enc = s.fp.encode(w).to(s.device)
        shape = tuple(enc.shape)
    elif shape is None:
        raise ValueError("the client must pass the weight's shape")
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"private weights are 2-D (k, m), got shape {shape}")
    idx = s.provider.index
    b = s.provider.get("wmask", shape=list(shape))
    with s.span("prepare_weight"), s.offline():
        if s.role == Role.SERVER:
            s.peer.send(enc - b, "weight-mask")
            return PrivateWeight(s, idx, shape, w=enc, limbs=limbs_needed(int(enc.abs().max())))
        f = s.peer.recv("weight-mask", shape=shape, dtype=DTYPE).to(s.device)
        return PrivateWeight(s, idx, shape, f=f)


def matmul_private(x: AShare, pw: PrivateWeight, *, truncate_result: bool = True) -> AShare:
    """X @ W for shared X (..., n, k) and a server-private W (k, m).

    1. Dealer: client gets (A, C0), server C1, with C0 + C1 = A @ B (B = W's mask).
    2. Client sends E = X0 - A (the only online message).
    3. Server: Y1 = (E + X1) @ W + C1 (W small: fewer limbs).  Client: Y0 = A @ F + C0,
       which is input-independent.  Y0 + Y1 = (X - A) W + A (W - B) + A B = X W.
    4. Truncate by f.
    Cost: 1 round, 8 B x |X| client -> server (plus truncation of |Y| elements).
    Offline: 8 B x |Y| dealer -> client.
    Ref: Delphi / SPU MulPriv; ../shared/COMET.md section 2.
    """
    s = _same_session(x)
    if pw.session is not s:
        raise ValueError("the weight was prepared in another session")
    if x.shape[-1] != pw.shape[0]:
        raise ValueError(f"cannot multiply {x.shape} by a weight of shape {pw.shape}")
    with s.span("matmul_private"):
        if s.role == Role.CLIENT:
            a, c0 = s.provider.get("mulpriv", x=list(x.shape), w=list(pw.shape), widx=pw.index)
            s.peer.send(x.data - a, "mulpriv-e")
            y = ring_matmul(a, pw.f) + c0
        else:
            c1 = s.provider.get("mulpriv", x=list(x.shape), w=list(pw.shape), widx=pw.index)
            e = s.peer.recv("mulpriv-e", shape=x.shape, dtype=DTYPE).to(x.data.device)
            y = ring_matmul(e + x.data, pw.w, b_limbs=pw.limbs) + c1
        out = x._wrap(y)
        return truncate(out) if truncate_result else out


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
