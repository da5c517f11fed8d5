"""The parties' side of the dealer: ``DealerClient`` (a party's link to the dealer: requests, and a
background reader that collects corrections while the online phase runs) and ``Provider`` (a
session's material by request index: each party expands its own part from its seed, the receiver adds
the dealer's correction; plans, prefetch and speculation), with the plan arithmetic the lookahead uses
(``plan_delta``, ``plan_shift``).  How the dealer works: ``cometpi.dealer``."""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque

import torch

from .core import Role
from .profiling import thread_profile
from .protocols import KINDS
from .protocols.material import DealerError
from .ring import AesCtrPrg, request_label
from .transport import PROTOCOL_VERSION, Channel, PeerTimeout, TransportError

log = logging.getLogger("cometpi.dealer")


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
        self._drop: set[int] = set()  # requested corrections no longer wanted (a wrong speculation)
        self._reader: threading.Thread | None = None

    def hello(self, session_id: str, role: Role, config_hash: str, peer: str | None = None) -> bytes:
        """Register with the dealer for this session and role; returns this party's seed.  ``peer``: the
        other party's certificate fingerprint (TLS links): the dealer hands out the session's seeds only
        to two parties that name each other."""
        self.ch.send_json({"op": "hello", "version": PROTOCOL_VERSION, "session": session_id,
                           "role": int(role), "config": config_hash, "peer": peer}, "dealer-hello")
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
        with thread_profile("dealer-link"):  # a party's reader of its dealer material
            self._read_loop_inner()

    def _read_loop_inner(self) -> None:
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
                    if idx in self._drop:
                        self._drop.discard(idx)
                    else:
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

    def discard(self, indices) -> None:
        """Forget requested corrections that will not be used (a speculation that proved wrong): held
        ones are freed, outstanding ones dropped on arrival.  Their indices are never used again."""
        with self._cond:
            for idx in indices:
                t = self._cache.pop(idx, None)
                if t is not None:
                    self._cached_bytes -= t.numel() * t.element_size()
                elif idx in self._pending_set:
                    self._drop.add(idx)
            self._cond.notify_all()

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
        self._speculated: set[int] = set()  # expected indices that are guesses (``speculate``)
        self._spec_end = 0  # the index after the last speculated one
        self.mispredictions = 0  # speculations abandoned (``speculate``)

    def get(self, kind: str, **params):
        """Material of ``kind`` for this party (see the table in the module docstring)."""
        k = KINDS[kind]
        idx = self.index
        item = [idx, kind, params]
        exp = self._expected.pop(idx, None)
        if exp is not None and exp[1:] != item[1:]:
            if idx not in self._speculated:
                raise DealerError(f"request {idx} is {kind} {params}, but the prefetched plan said {exp[1:]}")
            idx = self._abandon_speculation(idx)
            item = [idx, kind, params]
        self._speculated.discard(idx)
        self.index = idx + 1
        self.plan.append(item)
        own = getattr(k, "own_party", k.own)(self.role, self.prg, request_label(idx, kind, params), params)
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

    def speculate(self, plan: list[list]) -> int:
        """Prefetch a *guess* of the coming requests: ``plan`` (relative, as from ``plan_since``) placed
        after what is already speculated (e.g. the next layer of a model, guessed from the layer just
        done).  Unlike ``prefetch``, a request that differs from the guess is no error: both parties
        (which make the same guesses and the same requests) then abandon every speculated index from
        there on and continue at a fresh one, so no index is used twice (the dealer refuses that:
        two corrections at one index would reveal the other party's material).  Does nothing where a
        replayed plan already covers those indices.  Returns the number of corrections requested."""
        at = max(self.index, self._spec_end)
        items = [[at + i, kind, p] for i, kind, p in plan]
        if not items or any(it[0] in self._expected for it in items):
            return 0
        for it in items:
            self._expected[it[0]] = it
            self._speculated.add(it[0])
        self._spec_end = at + len(items)
        mine = [it for it in items if KINDS[it[1]].receiver == self.role]
        if mine and self.link is not None:
            self.link.request(mine)
        return len(mine)

    def _abandon_speculation(self, idx: int) -> int:
        """A request differs from the speculated one at ``idx``: drop every speculated index from ``idx``
        on (requested corrections are discarded) and return the first fresh index."""
        dropped = [i for i in self._speculated if i >= idx]
        for i in dropped:
            self._expected.pop(i, None)
        self._speculated.difference_update(dropped)
        if self.link is not None:
            self.link.discard(dropped)
        self.mispredictions += 1
        log.debug("speculated dealer plan abandoned at request %d (%d indices skipped)", idx, len(dropped))
        return self._spec_end

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
        """The requests made since index ``start``, numbered from 0 (a reusable plan; indices skipped
        by an abandoned speculation are not part of it)."""
        first = bisect.bisect_left(self.plan, start, key=lambda it: it[0])  # the plan is in index order
        return [[n, k, p] for n, (_, k, p) in enumerate(self.plan[first:])]

    def prefetch_relative(self, plan: list[list]) -> int:
        """``prefetch`` a relative plan (from ``plan_since``) for the requests starting now.  Guesses
        still outstanding (``speculate``: a guessed tail a query did not use) are abandoned first, so
        the plan starts at a fresh index (both parties do the same)."""
        if self._speculated:
            self.index = self._abandon_speculation(min(self._speculated))
        return self.prefetch([[self.index + i, k, p] for i, k, p in plan])

    def wait_prefetched(self, timeout: float | None = None) -> None:
        """Block until every prefetched correction has arrived (ends the offline phase); fails if the
        dealer stalls for ``timeout`` seconds (default: the dealer channel's timeout)."""
        if self.link is not None:
            self.link.wait_idle(timeout)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


def _ints(v, path: tuple):
    """The (path, value) leaves of a parameter: an int, or a list of them (nested: ``kvmm``'s parts)."""
    if isinstance(v, list) and v and all(type(x) is int or isinstance(x, list) for x in v):
        for j, x in enumerate(v):
            yield from _ints(x, (*path, j))
    else:
        yield path, v


def plan_delta(a: list[list], b: list[list]) -> dict | None:
    """How plan ``b`` (relative, of one layer) follows plan ``a`` (the layer before): the parameters
    that grow by a constant, as {name or (name, position...): increment} (the index of the layer's
    weights, ``widx``; within a list, each element by its own constant: the request indices of a KV
    cache's mask blocks, ``kvmm``'s parts, made in different steps), when the two plans are otherwise
    equal request for request; None when they differ in any other way or a parameter grows by
    different amounts."""
    if len(a) != len(b):
        return None
    rule: dict = {}
    for (_, ka, pa), (_, kb, pb) in zip(a, b, strict=True):
        if ka != kb or pa.keys() != pb.keys():
            return None
        for name, va in pa.items():
            la, lb = list(_ints(va, (name,))), list(_ints(pb[name], (name,)))
            if [p for p, _ in la] != [p for p, _ in lb]:
                return None
            for (path, xa), (_, xb) in zip(la, lb, strict=True):
                key = path[0] if len(path) == 1 else path
                if type(xa) is int and type(xb) is int:
                    if rule.setdefault(key, xb - xa) != xb - xa:
                        return None
                elif xa != xb:
                    return None
    return {name: d for name, d in rule.items() if d}


def plan_shift(plan: list[list], delta: dict | None) -> list[list] | None:
    """The guess of the next layer's requests: ``plan`` with each parameter of ``delta`` (from
    ``plan_delta``) increased; None without a delta."""
    if delta is None:
        return None

    def shift(v, path):
        if isinstance(v, list) and v and all(type(x) is int or isinstance(x, list) for x in v):
            return [shift(x, (*path, j)) for j, x in enumerate(v)]
        key = path[0] if len(path) == 1 else path
        return v + delta[key] if key in delta and type(v) is int else v

    return [[i, kind, {k: shift(v, (k,)) for k, v in p.items()}] for i, kind, p in plan]
