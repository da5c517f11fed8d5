"""Correlated randomness: the dealer process, its client, and an in-process dealer for tests.

How it works (as CrypTen's TTP provider): on connecting, each party receives a fresh 128-bit seed from
the dealer.  Every request has an index; both parties issue the same sequence of requests, so they
agree on indices without talking.  For request ``i`` each party expands its own part of the material
from AES-CTR(seed, i); the dealer, which knows both seeds, computes the one *correction* tensor that
makes the material consistent and sends it to one party only (the ``receiver`` of that kind).  The
other party never waits on the dealer for that request.

Everything the dealer sends is offline traffic.  A *plan* (the list of requests of a run) can be sent
up front with ``Provider.prefetch``; a background reader then collects the corrections while the
online phase runs, so the online phase does not wait on the dealer.

Kinds of material (n = elements of the output, shapes in the request):

==========  ===========================================  ==========  ===================
kind        material                                     receiver    correction (int64)
==========  ===========================================  ==========  ===================
mul         a, b, c = a*b                                server      n
pmul        client a, [ab]_0; server b, [ab]_1           server      n
square      a, c = a^2                                   server      n
matmul      A, B, C = A @ B                              server      |C|
trunc       r, s = r >>> f (logical), m = msb(r)         server      2n
band        bits a, b, c = a & b (XOR shares)            server      n bits (packed)
bandp       as band, 8 triples per byte (packed bytes)   server      n bytes
cmp         r (arithmetic), w0 ^ w1 = r (bits)           server      n
b2a         random bit: XOR shares and arithmetic        server      n
wmask       B (server only, the weight mask)             nobody      0
mulpriv     client: A, C0; server: C1; A @ B = C0 + C1   client      |C|
            (or A * B for a weight vector; 64- or 32-bit ring)
lift        r < 2^bits; 64-bit shares of r and msb(r)    server      2n
cmpn        r mod 2^(k+1), bit k of r and one-time       server      n (1 + 2 C 2^4) bits
            truth tables of r's 4-bit chunks (XOR; each
            chunk's lt and eq tables as one 32-bit word)
==========  ===========================================  ==========  ===================
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque

import numpy as np
import torch

from .core import Role
from .ring import AesCtrPrg, logical_rshift, msb, new_seed, ring_matmul, wrap_bits
from .transport import (
    PROTOCOL_VERSION,
    Channel,
    MemoryChannel,
    PeerDisconnected,
    PeerTimeout,
    TcpChannel,
    TransportError,
    listen,
)

log = logging.getLogger("cometpi.dealer")
MAX_REQUEST_ELEMENTS = 1 << 28


class DealerError(RuntimeError):
    """The dealer refused a request or could not be reached."""


def _shape(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in x) or len(x) > 8:
        raise DealerError(f"invalid shape for {what}: {x!r}")
    if math.prod(x) > MAX_REQUEST_ELEMENTS:
        raise DealerError(f"request for {what} of shape {tuple(x)} exceeds {MAX_REQUEST_ELEMENTS} elements")
    return tuple(x)


def _mm_shape(a, b) -> tuple[int, ...]:
    try:
        return tuple(torch.matmul(torch.empty(a, device="meta"), torch.empty(b, device="meta")).shape)
    except RuntimeError as e:
        raise DealerError(f"matmul shapes {a} and {b} do not match: {e}") from None


# --------------------------------------------------------------------------------------------------
# Kinds of material. own(): a party's seed-derived part; correct(): the dealer's correction;
# finish(): the party's final material.
# --------------------------------------------------------------------------------------------------


class _Mul:
    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "mul")
        return prg.ring(idx, s, s, s) if role == Role.CLIENT else prg.ring(idx, s, s)

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return (a0 + a1) * (b0 + b1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (*own, corr)


class _PrivateMul:
    """u (client's) times v (server's): client a, [ab]_0; server b, [ab]_1."""

    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "pmul")
        return prg.ring(idx, s, s)

    def correct(self, own0, own1, p):
        (a, c0), (b, _) = own0, own1
        return a * b - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


class _Square:
    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "square")
        return prg.ring(idx, s, s) if role == Role.CLIENT else prg.ring(idx, s)

    def correct(self, own0, own1, p):
        (a0, c0), (a1,) = own0, own1
        return (a0 + a1) * (a0 + a1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


class _Matmul:
    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        a, b = _shape(p["a"], "matmul A"), _shape(p["b"], "matmul B")
        c = _mm_shape(a, b)
        return prg.ring(idx, a, b, c) if role == Role.CLIENT else prg.ring(idx, a, b)

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return ring_matmul(a0 + a1, b0 + b1) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (*own, corr)


class _Trunc:
    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "trunc")
        return prg.ring(idx, s, s, s) if role == Role.CLIENT else prg.ring(idx, s)

    def correct(self, own0, own1, p):
        (r0, s0, m0), (r1,) = own0, own1
        r = r0 + r1
        return torch.cat([(logical_rshift(r, int(p["f"])) - s0).reshape(-1), (msb(r) - m0).reshape(-1)])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return tuple(own)
        s, m = corr.chunk(2)
        return own[0], s.reshape(own[0].shape), m.reshape(own[0].shape)


def _bits(prg, idx, *shapes):
    """Uniform bit tensors (uint8 0/1) from keystream ``idx``."""
    sizes = [math.prod(s) for s in shapes]
    raw = np.unpackbits(np.frombuffer(prg.bytes(idx, (sum(sizes) + 7) // 8), dtype=np.uint8))
    out, off = [], 0
    for shape, n in zip(shapes, sizes, strict=True):
        out.append(torch.from_numpy(raw[off : off + n].copy()).reshape(shape))
        off += n
    return out


class _AndTriple:
    """Boolean Beaver triples: bits a, b, c = a & b, XOR-shared; correction packed 8 per byte."""

    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "band")
        return _bits(prg, idx, s, s, s) if role == Role.CLIENT else _bits(prg, idx, s, s)

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return torch.from_numpy(np.packbits((((a0 ^ a1) & (b0 ^ b1)) ^ c0).numpy()))

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return tuple(own)
        n = own[0].numel()
        return own[0], own[1], torch.from_numpy(np.unpackbits(corr.numpy(), count=n)).reshape(own[0].shape)


class _PackedAndTriple:
    """Boolean Beaver triples packed 8 per byte: bytes a, b, c with c = a & b bitwise, XOR-shared
    (``shape`` counts bytes).  The correction is c's server share, n bytes."""

    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        n = math.prod(_shape(p["shape"], "bandp"))
        raw = torch.frombuffer(bytearray(prg.bytes(idx, (3 if role == Role.CLIENT else 2) * n)), dtype=torch.uint8)
        return list(raw.chunk(3 if role == Role.CLIENT else 2)) if n else [raw] * (3 if role == Role.CLIENT else 2)

    def correct(self, own0, own1, p):
        (a0, b0, c0), (a1, b1) = own0, own1
        return ((a0 ^ a1) & (b0 ^ b1)) ^ c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], own[1], corr)


class _Compare:
    """r (arithmetic shares) and XOR shares w0 ^ w1 = r of its bits, as int64 words."""

    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "cmp")
        return prg.ring(idx, s, s) if role == Role.CLIENT else prg.ring(idx, s)

    def correct(self, own0, own1, p):
        (r0, w0), (r1,) = own0, own1
        return (r0 + r1) ^ w0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


class _BitToArith:
    """A random bit beta, XOR-shared (uint8) and arithmetically shared (int64)."""

    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "b2a")
        (bit,) = _bits(prg, idx, s)
        return [bit, prg.ring(idx + (1 << 62), s)[0]] if role == Role.CLIENT else [bit]

    def correct(self, own0, own1, p):
        (b0, v0), (b1,) = own0, own1
        return (b0 ^ b1).to(torch.int64) - v0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


def _bits_param(p) -> int:
    bits = int(p.get("bits", 64))
    if bits not in (32, 64):
        raise DealerError(f"ring size must be 32 or 64 bits, got {bits}")
    return bits


class _WeightMask:
    """The mask B of a server-private weight (in a 64- or 32-bit ring)."""

    receiver = None

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "wmask")
        return [wrap_bits(prg.ring(idx, s)[0], _bits_param(p))] if role == Role.SERVER else []

    def correct(self, own0, own1, p):  # pragma: no cover - never requested
        raise DealerError("wmask needs no correction")

    def finish(self, role, own, corr, p):
        return own[0] if own else None


class _MulPriv:
    """Client A, C0; server C1 (and B from request widx): C0 + C1 = A @ B, or A * B for mode "vec"
    (B a vector over the last dimension), modulo 2^bits."""

    receiver = Role.CLIENT

    def own(self, role, prg, idx, p):
        x, w, bits = _shape(p["x"], "mulpriv X"), _shape(p["w"], "mulpriv W"), _bits_param(p)
        vec = p.get("mode", "matmul") == "vec"
        if vec and (len(w) != 1 or not x or x[-1] != w[0]):
            raise DealerError(f"vector multiply needs x (..., {w[0] if w else '?'}) and w (d,), got {x} and {w}")
        c = x if vec else _mm_shape(x, w)
        if role == Role.CLIENT:
            return [wrap_bits(prg.ring(idx, x)[0], bits)]
        (c1,) = prg.ring(idx, c)
        (b,) = prg.ring(int(p["widx"]), w)  # the same B as request widx (kind wmask)
        return [wrap_bits(c1, bits), wrap_bits(b, bits)]

    def own_party(self, role, prg, idx, p):
        """A party's own part (the server does not need B again: only the dealer's correction does)."""
        if role == Role.CLIENT:
            return self.own(role, prg, idx, p)
        x, w, bits = _shape(p["x"], "mulpriv X"), _shape(p["w"], "mulpriv W"), _bits_param(p)
        c = x if p.get("mode", "matmul") == "vec" else _mm_shape(x, w)
        return [wrap_bits(prg.ring(idx, c)[0], bits)]

    def correct(self, own0, own1, p):
        (a,), (c1, b) = own0, own1
        bits = _bits_param(p)
        prod = a * b if p.get("mode", "matmul") == "vec" else ring_matmul(a, b, diagonals=bits // 16)
        return wrap_bits(prod - c1, bits)

    def finish(self, role, own, corr, p):
        return (own[0], corr) if role == Role.CLIENT else own[0]


class _Lift:
    """r uniform in [0, 2^bits) unknown to both parties, with 64-bit shares of r and of its top bit."""

    receiver = Role.SERVER

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "lift")
        return prg.ring(idx, s, s, s) if role == Role.CLIENT else prg.ring(idx, s)

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


#: Chunk width of the narrow comparison's one-time truth tables (2^CMP_CHUNK entries per chunk).
CMP_CHUNK = 4


def cmp_chunks(k: int, m: int = CMP_CHUNK) -> int:
    return -(-k // m)


class _NarrowCompare:
    """For comparisons of |x| < 2^k opened modulo 2^n, n = k + 1: r mod 2^n (additive shares, no
    correction), XOR shares of r's bit k (packed 8 per byte), and for each m-bit chunk of r's low k
    bits the one-time truth tables lt[v] = [v < chunk] and eq[v] = [v == chunk] for all v < 2^m,
    XOR-shared as one int32 word per chunk (bit v: lt[v], bit 16 + v: eq[v]), so a lookup is a shift.
    Correction to the server: 2 C 2^m + 1 bits per element (C = ceil(k/m) chunks): the words, then
    the packed bits of r's bit k, as bytes."""

    receiver = Role.SERVER

    @staticmethod
    def _k(p) -> int:
        k = int(p.get("k", 0))
        if not 1 <= k <= 61:
            raise DealerError(f"narrow comparison width k must be in 1..61, got {k}")
        return k

    def own(self, role, prg, idx, p):
        s = _shape(p["shape"], "cmpn")
        (r,) = prg.ring(idx, s)
        if role == Role.SERVER:
            return [r]
        n, c = math.prod(s), cmp_chunks(self._k(p))
        raw = torch.frombuffer(bytearray(prg.bytes(idx + (1 << 61), 4 * n * c + (n + 7) // 8)), dtype=torch.uint8)
        return [r, raw[: 4 * n * c].view(torch.int32).reshape(n, c), raw[4 * n * c:]]

    def correct(self, own0, own1, p):
        (r0, words0, top0), (r1,) = own0, own1
        k = self._k(p)
        r = ((r0 + r1) & ((1 << (k + 1)) - 1)).reshape(-1)
        low = r & ((1 << k) - 1)
        chunk = torch.stack([((low >> (CMP_CHUNK * ch)) & ((1 << CMP_CHUNK) - 1)) for ch in range(cmp_chunks(k))], 1)
        one = torch.ones_like(chunk)
        truth = ((one << chunk) - 1) | (one << (chunk + 16))  # lt: bits below the chunk; eq: its own bit
        truth = torch.where(truth >= 1 << 31, truth - (1 << 32), truth).to(torch.int32)
        top = torch.from_numpy(np.packbits(((r >> k) & 1).to(torch.uint8).numpy())) ^ top0
        return torch.cat([(truth ^ words0).reshape(-1).view(torch.uint8), top])

    def finish(self, role, own, corr, p):
        if role == Role.CLIENT:
            return own[0], own[1], own[2]
        n, c = own[0].numel(), cmp_chunks(self._k(p))
        return own[0], corr[: 4 * n * c].contiguous().view(torch.int32).reshape(n, c), corr[4 * n * c:]


KINDS = {"mul": _Mul(), "pmul": _PrivateMul(), "square": _Square(), "matmul": _Matmul(), "trunc": _Trunc(),
         "wmask": _WeightMask(), "mulpriv": _MulPriv(), "band": _AndTriple(), "bandp": _PackedAndTriple(),
         "cmp": _Compare(),
         "b2a": _BitToArith(), "lift": _Lift(), "cmpn": _NarrowCompare()}


# --------------------------------------------------------------------------------------------------
# Party side
# --------------------------------------------------------------------------------------------------


#: Prefetched corrections a party holds in memory at most (a BERT-base/128 query with Comet's guess
#: needs 27 GB of dealer material: the rest streams in while the online phase consumes it).
DEALER_BUFFER_BYTES = 1 << 31


class DealerClient:
    """A party's connection to the dealer: on-demand requests plus background prefetch, holding at
    most ``buffer_bytes`` of corrections that are not yet consumed (backpressure on the dealer)."""

    def __init__(self, channel: Channel, buffer_bytes: int = DEALER_BUFFER_BYTES):
        self.ch = channel
        self.buffer_bytes = buffer_bytes
        self._cached_bytes = 0
        self._cond = threading.Condition()
        self._pending: deque[int] = deque()
        self._pending_set: set[int] = set()
        self._cache: dict[int, torch.Tensor] = {}
        self._error: BaseException | None = None
        self._closing = False
        self._wanted: int | None = None  # the index a party is blocked on in ``fetch``
        self._reader: threading.Thread | None = None

    def hello(self, session_id: str, role: Role, config_hash: str) -> bytes:
        """Register with the dealer for this session and role; returns this party's seed."""
        self.ch.send_json({"op": "hello", "version": PROTOCOL_VERSION, "session": session_id,
                           "role": int(role), "config": config_hash}, "dealer-hello")
        reply = self.ch.recv_json("dealer-hello")
        if not reply.get("ok"):
            raise DealerError(f"dealer refused the session: {reply.get('error')}")
        self._reader = threading.Thread(target=self._read_loop, name="dealer-reader", daemon=True)
        self._reader.start()
        return bytes.fromhex(reply["seed"])

    def request(self, items: list[list]) -> None:
        """Ask for the corrections of ``items`` ([index, kind, params] each); answers arrive in order."""
        if not items:
            return
        with self._cond:
            for it in items:
                self._pending.append(it[0])
                self._pending_set.add(it[0])
            self._cond.notify_all()
        self.ch.send_json({"op": "get", "items": items}, "dealer-get")

    def _read_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    # a full buffer waits for the party to consume (unless the party waits on the head)
                    self._cond.wait_for(lambda: (self._pending and (self._cached_bytes < self.buffer_bytes
                                                                    or self._wanted in self._pending_set))
                                        or self._closing)
                    if self._closing:
                        return
                t = self.ch.recv(("dealer-corr", "dealer-error"))
                if isinstance(t, bytes):
                    raise DealerError(f"dealer error: {t.decode(errors='replace')}")
                with self._cond:
                    idx = self._pending.popleft()
                    self._pending_set.discard(idx)
                    self._cache[idx] = t
                    self._cached_bytes += t.numel() * t.element_size()
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting party thread
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def fetch(self, idx: int, kind: str, params: dict) -> torch.Tensor:
        """The correction of request ``idx``, asking for it now unless it was prefetched."""
        with self._cond:
            need = idx not in self._cache and idx not in self._pending_set
        if need:
            self.request([[idx, kind, params]])
        with self._cond:
            self._wanted = idx
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: idx in self._cache or self._error is not None,
                                     timeout=self.ch.timeout)
            self._wanted = None
            if idx in self._cache:
                t = self._cache.pop(idx)
                self._cached_bytes -= t.numel() * t.element_size()
                self._cond.notify_all()
                return t
            if self._error is not None:
                err = self._error
                if isinstance(err, (TransportError, DealerError)):
                    raise type(err)(f"dealer link: {err}") from None
                raise DealerError(f"dealer link failed: {err!r}") from err
            assert not ok
            raise PeerTimeout(f"no answer from the dealer within {self.ch.timeout:g} s for request {idx}")

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no requested correction is outstanding, or the buffer is full (the rest then
        streams in while the party consumes).  ``timeout`` (default: the channel's) bounds a *stall*:
        the wait fails only when no correction arrives for that long, so a large plan on a busy
        machine (gigabytes of corrections) is not cut off while the dealer works."""
        timeout = self.ch.timeout if timeout is None else timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise DealerError(f"dealer link failed: {self._error}")
                if not self._pending or self._cached_bytes >= self.buffer_bytes:
                    return
                left = len(self._pending)
                ok = self._cond.wait_for(lambda left=left: len(self._pending) < left or self._error is not None,
                                         timeout)
                if not ok:
                    raise PeerTimeout(f"prefetch from the dealer stalled: no correction for {timeout:g} s "
                                      f"({len(self._pending)} outstanding)")

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.ch.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5.0)


class Provider:
    """Shape-keyed correlated randomness for one party, recorded as a replayable plan."""

    def __init__(self, role: Role, seed: bytes, link: DealerClient | None, device=None):
        self.role = Role(role)
        self.prg = AesCtrPrg(seed)
        self.link = link
        self.device = device
        self.index = 0
        self.plan: list[list] = []
        self._expected: dict[int, list] = {}

    def get(self, kind: str, **params):
        """Material of ``kind`` for this party (see the table in the module docstring)."""
        k = KINDS[kind]
        idx, self.index = self.index, self.index + 1
        item = [idx, kind, params]
        self.plan.append(item)
        exp = self._expected.pop(idx, None)
        if exp is not None and exp[1:] != item[1:]:
            raise DealerError(f"request {idx} is {kind} {params}, but the prefetched plan said {exp[1:]}")
        own = getattr(k, "own_party", k.own)(self.role, self.prg, idx, params)
        corr = None
        if k.receiver == self.role:
            if self.link is None:
                raise DealerError("this party has no dealer connection")
            corr = self.link.fetch(idx, kind, params)
        out = k.finish(self.role, own, corr, params)
        if self.device is not None:
            out = tuple(t.to(self.device) for t in out) if isinstance(out, tuple) else (
                out if out is None else out.to(self.device))
        return out

    def prefetch(self, plan: list[list]) -> int:
        """Request, ahead of time, every correction of ``plan`` (a previous run's ``plan``) that this
        party receives, starting at the current index. Returns the number of requests sent."""
        mine = [it for it in plan if it[0] >= self.index and KINDS[it[1]].receiver == self.role]
        for it in plan:
            if it[0] >= self.index:
                self._expected[it[0]] = it
        if mine and self.link is not None:
            self.link.request(mine)
        return len(mine)

    def plan_since(self, start: int) -> list[list]:
        """The requests made since index ``start``, with indices relative to it (a reusable plan)."""
        return [[i - start, k, p] for i, k, p in self.plan if i >= start]

    def prefetch_relative(self, plan: list[list]) -> int:
        """``prefetch`` a relative plan (from ``plan_since``) for the requests starting now."""
        return self.prefetch([[self.index + i, k, p] for i, k, p in plan])

    def wait_prefetched(self, timeout: float | None = None) -> None:
        """Block until every prefetched correction has arrived (ends the offline phase); fails if the
        dealer stalls for ``timeout`` seconds (default: the dealer channel's timeout)."""
        if self.link is not None:
            self.link.wait_idle(timeout)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


# --------------------------------------------------------------------------------------------------
# Dealer side
# --------------------------------------------------------------------------------------------------


class DealerCore:
    """The dealer's state: one pair of seeds per session. Thread-safe."""

    def __init__(self, pairing_timeout: float = 30.0):
        self._cond = threading.Condition()
        self._seeds: dict[str, dict[int, bytes]] = {}
        self._connected: dict[str, set[int]] = {}
        self.pairing_timeout = pairing_timeout

    def register(self, session: str, role: int) -> bytes:
        if role not in (0, 1):
            raise DealerError(f"unknown role {role!r}")
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise DealerError("invalid session id")
        with self._cond:
            seeds = self._seeds.setdefault(session, {})
            live = self._connected.setdefault(session, set())
            if role in live:
                raise DealerError(f"role {Role(role).name} is already connected for session {session}")
            live.add(role)
            seeds[role] = new_seed()
            self._cond.notify_all()
            return seeds[role]

    def unregister(self, session: str, role: int) -> None:
        """Forget a session once both of its parties have disconnected."""
        with self._cond:
            live = self._connected.get(session, set())
            live.discard(role)
            if not live:
                self._connected.pop(session, None)
                self._seeds.pop(session, None)

    def _both(self, session: str) -> tuple[bytes, bytes]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._seeds.get(session, {})) == 2, self.pairing_timeout)
            if not ok:
                raise DealerError(f"the other party of session {session} did not connect to the dealer "
                                  f"within {self.pairing_timeout:g} s")
            s = self._seeds[session]
            return s[0], s[1]

    def correction(self, session: str, role: int, item) -> torch.Tensor:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)
                and isinstance(item[2], dict)):
            raise DealerError(f"malformed request item {item!r:.200}")
        idx, kind, params = item
        k = KINDS.get(kind)
        if k is None:
            raise DealerError(f"unknown kind of material {kind!r}")
        if k.receiver is None or int(k.receiver) != role:
            raise DealerError(f"{Role(role).name} may not ask for corrections of kind {kind}")
        s0, s1 = self._both(session)
        try:
            own0 = k.own(Role.CLIENT, AesCtrPrg(s0), idx, params)
            own1 = k.own(Role.SERVER, AesCtrPrg(s1), idx, params)
            return k.correct(own0, own1, params)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, DealerError):
                raise
            raise DealerError(f"bad parameters for {kind}: {e}") from None


#: Corrections the dealer queues per party link before it waits for the party to read.
DEALER_SEND_QUEUE_BYTES = 1 << 28


def serve_connection(core: DealerCore, ch: Channel) -> None:
    """Serve one party's dealer connection until it closes (runs in its own thread).  The link's send
    queue is bounded (``DEALER_SEND_QUEUE_BYTES``): a party whose prefetch buffer is full holds the
    dealer back instead of the dealer's memory filling with its corrections."""
    session = role = None
    if hasattr(ch, "max_queued_bytes"):
        ch.max_queued_bytes = DEALER_SEND_QUEUE_BYTES
    try:
        hello = ch.recv_json("dealer-hello")
        if hello.get("version") != PROTOCOL_VERSION:
            raise DealerError(f"party speaks protocol version {hello.get('version')}, "
                              f"dealer {PROTOCOL_VERSION}")
        seed = core.register(hello.get("session"), hello.get("role"))
        session, role = hello["session"], hello["role"]
        ch.send_json({"ok": True, "seed": seed.hex()}, "dealer-hello")
        log.info("session %s: %s connected", session, Role(role).name)
        while True:
            try:
                req = ch.recv_json("dealer-get")
            except PeerDisconnected:
                break
            items = req.get("items") if isinstance(req, dict) else None
            if not isinstance(items, list):
                raise DealerError("request without an item list")
            for it in items:
                ch.send(core.correction(session, role, it), "dealer-corr")
    except DealerError as e:
        log.warning("refusing dealer client: %s", e)
        try:
            if session is None:
                ch.send_json({"ok": False, "error": str(e)}, "dealer-hello")
            else:
                ch.send(str(e).encode(), "dealer-error")
        except TransportError:
            pass
    except TransportError as e:
        log.warning("dealer connection ended: %s", e)
    finally:
        if session is not None:
            core.unregister(session, role)
        ch.close()


class DealerServer:
    """The dealer process's TCP server: one thread per party connection."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, idle_timeout: float = 3600.0,
                 pairing_timeout: float = 30.0):
        self.core = DealerCore(pairing_timeout)
        self.sock = listen(host, port)
        self.address = self.sock.getsockname()[:2]
        self.idle_timeout = idle_timeout
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            ch = TcpChannel(conn, link="dealer", timeout=self.idle_timeout, peer_name=f"party at {addr[0]}")
            threading.Thread(target=serve_connection, args=(self.core, ch), daemon=True).start()

    def start(self) -> DealerServer:
        threading.Thread(target=self.serve_forever, name="dealer", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


class LocalDealer:
    """An in-process dealer with the same protocol as the dealer process, over memory channels."""

    def __init__(self, pairing_timeout: float = 30.0):
        self.core = DealerCore(pairing_timeout)
        self.threads: list[threading.Thread] = []

    def connect(self, meter=None, timeout: float = 60.0) -> DealerClient:
        party, dealer = MemoryChannel.pair((meter, None), link="dealer", timeout=timeout,
                                           peer_name="dealer")
        dealer.timeout, dealer.peer_name = 3600.0, "party"
        t = threading.Thread(target=serve_connection, args=(self.core, dealer), daemon=True)
        t.start()
        self.threads.append(t)
        return DealerClient(party)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the serving threads of closed connections to finish."""
        for t in self.threads:
            t.join(timeout)
