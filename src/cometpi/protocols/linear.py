"""Linear layers with a server-private weight (masked once per session), the lift from a 32-bit ring,
and the embedding lookup, each with its dealer material kind.
"""

from __future__ import annotations

import math

import torch

from ..core import AShare, Role, Session
from ..ring import DTYPE, limb_stack, limbs_needed, request_label, ring_matmul, wrap_bits
from .arith import _same_session, truncate
from .material import Cost, DealerError, _bits_param, _mm_shape, _shape, elementwise_cost


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
        matmul (where it is the faster kernel: ``kernels``), computed on first use and kept for the session
        (float32: 4 B per limb per weight element more memory, instead of splitting the weight at every
        query)."""
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


class _WeightMask:
    """The mask B of a server-private weight (in a 64- or 32-bit ring)."""

    receiver = None

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "wmask")
        return [wrap_bits(prg.ring(stream, s)[0], _bits_param(p))] if role == Role.SERVER else []

    def cost(self, p) -> Cost:  # pragma: no cover - never requested
        return Cost(0, 0)

    def correct(self, own0, own1, p):  # pragma: no cover - never requested
        raise DealerError("wmask needs no correction")

    def finish(self, role, own, corr, p):
        return own[0] if own else None


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
        return ring_matmul(a, b, b_limbs=limbs, diagonals=diag, b_stack=pw.stack)  # split once, if the limbs win

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


class _MulPriv:
    """Client A, C0; server C1 (and B from request widx): C0 + C1 = A @ B, or A * B for mode "vec"
    (B a vector over the last dimension), modulo 2^bits."""

    receiver = Role.CLIENT

    @staticmethod
    def _shapes(p):
        x, w, bits = _shape(p["x"], "mulpriv X"), _shape(p["w"], "mulpriv W"), _bits_param(p)
        vec = p.get("mode", "matmul") == "vec"
        if vec and (len(w) != 1 or not x or x[-1] != w[0]):
            raise DealerError(f"vector multiply needs x (..., {w[0] if w else '?'}) and w (d,), got {x} and {w}")
        return x, w, bits, x if vec else _mm_shape(x, w)

    @staticmethod
    def mask_label(p, w, bits) -> bytes:
        """The keystream of B: request ``widx`` of kind ``wmask`` with the parameters ``prepare_weight``
        gives it (a request naming another index, shape or ring meets randomness no weight uses)."""
        widx = p["widx"]
        if type(widx) is not int or widx < 0:
            raise DealerError(f"mulpriv widx must be a request index, got {widx!r}")
        return request_label(widx, "wmask", {"shape": list(w), **({"bits": bits} if bits != 64 else {})})

    def own(self, role, prg, stream, p):
        x, w, bits, c = self._shapes(p)
        if role == Role.CLIENT:
            return [wrap_bits(prg.ring(stream, x)[0], bits)]
        (c1,) = prg.ring(stream, c)
        label = self.mask_label(p, w, bits)  # the same B as request widx (kind wmask)
        make = lambda: wrap_bits(prg.ring(label, w)[0], bits)  # noqa: E731
        keep = getattr(prg, "keep", None)  # the dealer's kept masks (dealer.KeptMasks)
        return [wrap_bits(c1, bits), make() if keep is None else keep(label, make)]

    def own_party(self, role, prg, stream, p):
        """A party's own part (the server does not need B again: only the dealer's correction does)."""
        if role == Role.CLIENT:
            return self.own(role, prg, stream, p)
        _, _, bits, c = self._shapes(p)
        return [wrap_bits(prg.ring(stream, c)[0], bits)]

    def cost(self, p) -> Cost:
        x, w, _, c = self._shapes(p)
        nx, nw, nc = math.prod(x), math.prod(w), math.prod(c)
        vec = p.get("mode", "matmul") == "vec"
        return Cost(8 * nc, 8 * (nx + nw + 3 * nc), nc if vec else nc * w[0])

    def correct(self, own0, own1, p):
        (a,), (c1, b) = own0, own1
        bits = _bits_param(p)
        prod = a * b if p.get("mode", "matmul") == "vec" else ring_matmul(a, b, diagonals=bits // 16)
        return wrap_bits(prod - c1, bits)

    def finish(self, role, own, corr, p):
        return (own[0], corr) if role == Role.CLIENT else own[0]


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


class _Lift:
    """r uniform in [0, 2^bits) unknown to both parties, with 64-bit shares of r and of its top bit."""

    receiver = Role.SERVER

    def own(self, role, prg, stream, p):
        s = _shape(p["shape"], "lift")
        return prg.ring(stream, s, s, s) if role == Role.CLIENT else prg.ring(stream, s)

    def cost(self, p) -> Cost:
        return elementwise_cost(math.prod(_shape(p["shape"], "lift")), 3, 1, 2)

    def correct(self, own0, own1, p):
        (r0, m0, x0), (x1,) = own0, own1
        bits = _bits_param(p)
        r = (x0 + x1) & ((1 << bits) - 1)
        return torch.cat([(r - r0).reshape(-1), (((r >> (bits - 1)) & 1) - m0).reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return own[0], own[1]
        r1, m1 = corr.chunk(2)
        return r1.reshape(own[0].shape), m1.reshape(own[0].shape)


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


KINDS = {"wmask": _WeightMask(), "mulpriv": _MulPriv(), "lift": _Lift()}
