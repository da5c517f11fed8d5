"""Correlated randomness: the dealer process and an in-process dealer for tests (the parties' side,
``DealerClient`` and ``Provider``, is in ``cometpi.provider``).

How it works (as CrypTen's TTP provider): on connecting, each party receives a fresh 128-bit seed from
the dealer.  Every request has an index; both parties issue the same sequence of requests, so they
agree on indices without talking.  For request ``i`` each party expands its own part of the material
from AES-CTR(seed, i); the dealer, which knows both seeds, computes the one *correction* tensor that
makes the material consistent and sends it to one party only (the ``receiver`` of that kind).  The
other party never waits on the dealer for that request.

Everything the dealer sends is offline traffic.  A *plan* (the list of requests of a run) can be sent
up front with ``Provider.prefetch``; a background reader then collects the corrections while the
online phase runs, so the online phase does not wait on the dealer.

Kinds of material are defined beside the protocols that consume them (``cometpi.protocols``: each
family module's ``KINDS``, collected in ``protocols.KINDS``; ``protocols.material`` describes the
interface).  Each kind's docstring says what it holds and what its correction costs.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import torch

from .core import Role
from .dealer_limits import DealerLimits, KeptMasks, ServedIndices, SessionBudget  # noqa: F401 - re-exported
from .links import accept
from .profiling import thread_profile
from .protocols import KINDS
from .protocols.material import DealerError
from .provider import (  # noqa: F401 - the parties' side, re-exported (cometpi.dealer.Provider and friends)
    DEALER_BUFFER_BYTES,
    DealerClient,
    Provider,
    plan_delta,
    plan_shift,
)
from .ring import AesCtrPrg, new_seed, request_label
from .transport import (
    PROTOCOL_VERSION,
    Channel,
    MemoryChannel,
    PeerDisconnected,
    TcpChannel,
    TransportError,
    listen,
)

log = logging.getLogger("cometpi.dealer")


#: Sessions with only one party registered that the dealer holds at most (half-open registrations).
MAX_HALF_OPEN = 256


class DealerCore:
    """The dealer's state: one pair of seeds per session. Thread-safe.

    With authenticated links (TLS), each registration carries the party's certificate fingerprint
    (``identity``) and the fingerprint it names for its peer (``names``); ``allow`` maps a role to the
    fingerprints admitted in it (None: any authenticated party).  A session's seeds are used only once
    its two registrations name each other.  Half-open registrations are closed after
    ``pairing_timeout`` and at most ``MAX_HALF_OPEN`` are held."""

    def __init__(self, pairing_timeout: float = 30.0, allow: dict | None = None,
                 limits: DealerLimits | None = None):
        self.limits = limits or DealerLimits()
        self._cond = threading.Condition()
        self._seeds: dict[str, dict[int, bytes]] = {}
        self._connected: dict[str, set[int]] = {}
        self._who: dict[str, dict[int, tuple]] = {}  # session -> role -> (identity, names, since, channel)
        self._budget: dict[str, SessionBudget] = {}  # session -> indices answered (each once), requests, bytes
        self.pairing_timeout = pairing_timeout
        self.allow = allow or {}
        self.masks = KeptMasks(self.limits.kept_mask_bytes)

    def register(self, session: str, role: int, identity: str | None = None, names: str | None = None,
                 channel=None) -> bytes:
        if role not in (0, 1):
            raise DealerError(f"unknown role {role!r}")
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise DealerError("invalid session id")
        allowed = self.allow.get(role)
        if allowed is not None and identity not in allowed:
            raise DealerError(f"{Role(role).name} identity {identity} is not admitted by this dealer")
        with self._cond:
            self._reap()
            half_open = sum(len(w) == 1 and next(iter(w.values()))[2] != float("inf") for w in self._who.values())
            if session not in self._seeds and half_open >= MAX_HALF_OPEN:  # reaped ones are on their way out
                raise DealerError(f"too many half-open sessions ({MAX_HALF_OPEN}); try again later")
            seeds = self._seeds.setdefault(session, {})
            live = self._connected.setdefault(session, set())
            if role in live:
                raise DealerError(f"role {Role(role).name} is already connected for session {session}")
            live.add(role)
            seeds[role] = new_seed()
            self._who.setdefault(session, {})[role] = (identity, names, time.monotonic(), channel)
            self._cond.notify_all()
            return seeds[role]

    def _reap(self) -> None:
        """Close half-open registrations older than the pairing timeout (called with the lock held)."""
        now = time.monotonic()
        for sid, who in list(self._who.items()):
            if len(who) == 1:
                (role, (_, _, since, ch)), = who.items()
                if now - since > self.pairing_timeout and ch is not None:
                    log.warning("session %s: %s waited %.0f s for its peer: closed", sid, Role(role).name,
                                now - since)
                    who[role] = (*who[role][:2], float("inf"), None)
                    ch.close()

    def unregister(self, session: str, role: int) -> None:
        """Forget a session once both of its parties have disconnected."""
        with self._cond:
            live = self._connected.get(session, set())
            live.discard(role)
            if not live:
                self._connected.pop(session, None)
                self._seeds.pop(session, None)
                self._who.pop(session, None)
                self._budget.pop(session, None)
                self.masks.drop(session)

    def _both(self, session: str) -> tuple[bytes, bytes]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._seeds.get(session, {})) == 2, self.pairing_timeout)
            if not ok:
                raise DealerError(f"the other party of session {session} did not connect to the dealer "
                                  f"within {self.pairing_timeout:g} s")
            who = self._who.get(session, {})
            if 0 in who and 1 in who and (who[0][0] is not None or who[1][0] is not None):
                (c_id, c_names, *_), (s_id, s_names, *_) = who[0], who[1]
                if c_names != s_id or s_names != c_id:
                    raise DealerError(f"session {session}: its two registrations do not name each other "
                                      f"(client {c_id} names {c_names}, server {s_id} names {s_names})")
            s = self._seeds[session]
            return s[0], s[1]

    def correction(self, session: str, role: int, item) -> torch.Tensor:
        """The correction of one request ``item`` ([index, kind, params]) of ``role`` in ``session``,
        after checking it against this dealer's limits (refused with a ``DealerError`` otherwise)."""
        if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int and isinstance(item[1], str)
                and isinstance(item[2], dict)):
            raise DealerError(f"malformed request item {item!r:.200}")
        idx, kind, params = item
        k = KINDS.get(kind)
        if k is None:
            raise DealerError(f"unknown kind of material {kind!r:.40}")
        if k.receiver is None or int(k.receiver) != role:
            raise DealerError(f"{Role(role).name} may not ask for corrections of kind {kind}")
        if idx < 0:
            raise DealerError(f"request index {idx} is outside this session's range")
        try:
            cost = k.cost(params)
            request_label(idx, kind, params)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DealerError):
                raise
            raise DealerError(f"bad parameters for {kind}: {e!r:.200}") from None
        s0, s1 = self._both(session)
        with self._cond:
            budget = self._budget.setdefault(session, SessionBudget(self.limits))
            budget.admit(session, idx, kind, cost)
        try:
            prg1 = AesCtrPrg(s1)
            prg1.keep = lambda label, make: self.masks.get(session, s1 + label, make)
            return compute_correction(kind, idx, params, AesCtrPrg(s0), prg1)
        except (KeyError, TypeError, ValueError, RuntimeError, MemoryError) as e:
            with self._cond:
                budget.refund(idx, cost)  # nothing was sent for it
            if isinstance(e, DealerError):
                raise
            if isinstance(e, MemoryError):
                raise DealerError(f"the dealer ran out of memory for request {idx} ({kind})") from None
            raise DealerError(f"bad parameters for {kind}: {e!r:.200}") from None


def compute_correction(kind: str, idx: int, params: dict, prg0: AesCtrPrg, prg1: AesCtrPrg) -> torch.Tensor:
    """The correction of request ``idx`` of ``kind`` from the two parties' seed expansions: each
    party's part is drawn under the request's own label (``ring.request_label``), so the correction
    depends on nothing a party uses for any other request (tests/test_deviating.py)."""
    k, label = KINDS[kind], request_label(idx, kind, params)
    return k.correct(k.own(Role.CLIENT, prg0, label, params), k.own(Role.SERVER, prg1, label, params), params)


#: Corrections the dealer queues per party link before it waits for the party to read.
DEALER_SEND_QUEUE_BYTES = 1 << 28


def serve_connection(core: DealerCore, ch: Channel, registered=None) -> None:
    """Serve one party's dealer connection until it closes (runs in its own thread).  The link's send
    queue is bounded (``DEALER_SEND_QUEUE_BYTES``): a party whose prefetch buffer is full holds the
    dealer back instead of the dealer's memory filling with its corrections.  ``registered`` is called
    once the party is registered (``DealerServer`` stops its handshake deadline there)."""
    with thread_profile("dealer"):
        _serve_connection(core, ch, registered)


def _serve_connection(core: DealerCore, ch: Channel, registered) -> None:
    session = role = None
    t0, outcome = time.perf_counter(), "ok"
    if hasattr(ch, "max_queued_bytes"):
        ch.max_queued_bytes = DEALER_SEND_QUEUE_BYTES
    try:
        hello = ch.recv_json("dealer-hello")
        if hello.get("version") != PROTOCOL_VERSION:
            raise DealerError(f"party speaks protocol version {hello.get('version')}, "
                              f"dealer {PROTOCOL_VERSION}")
        peer = getattr(ch, "peer", None)  # the authenticated identity on a TLS link
        names = hello.get("peer")
        if peer is not None and not isinstance(names, str):
            raise DealerError("an authenticated party must name its peer's certificate fingerprint")
        seed = core.register(hello.get("session"), hello.get("role"), None if peer is None else peer.fingerprint,
                             names if peer is not None else None, ch)
        session, role = hello["session"], hello["role"]
        if registered is not None:
            registered()
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
        outcome = f"refused: {e}"
        log.warning("refusing dealer client: %s", e)
        try:
            if session is None:
                ch.send_json({"ok": False, "error": str(e)}, "dealer-hello")
            else:
                ch.send(str(e).encode(), "dealer-error")
        except TransportError:
            pass
    except TransportError as e:
        outcome = f"error: {e}"
        log.warning("dealer connection ended: %s", e)
    finally:
        if session is not None:
            core.unregister(session, role)
        ch.close()
        _log_session(ch, session, role, outcome, time.perf_counter() - t0)


def _log_session(ch: Channel, session, role, outcome: str, seconds: float) -> None:
    """One structured JSON line per party connection (logger ``cometpi.dealer``, and stderr in the
    dealer process): session, role, peer identity, bytes, seconds, outcome."""
    import json
    import sys

    rep = ch.meter.report()
    rec = {"event": "dealer-session", "session": session, "role": None if role is None else Role(role).name,
           "peer": ch.peer_name, "outcome": outcome, "seconds": round(seconds, 3),
           "bytes": sum(rep[p]["bytes_sent"] + rep[p]["bytes_recv"] for p in ("online", "offline"))}
    peer = getattr(ch, "peer", None)
    if peer is not None:
        rec["identity"] = {"name": peer.name, "fingerprint": peer.fingerprint}
    line = json.dumps(rec)
    log.info(line)
    if not isinstance(ch, MemoryChannel):  # the dealer process (not the in-process test dealer)
        print(line, file=sys.stderr, flush=True)


class DealerServer:
    """The dealer process's TCP server: one thread per party connection, at most
    ``limits.max_connections`` at once (more are refused at once), each of which must complete its
    registration (TLS handshake and hello) within ``limits.handshake_timeout`` seconds.  With ``tls``
    (a ``tls.TlsConfig`` trusting the admitted servers' and clients' certificates) every link is TLS
    1.3 with mutual authentication and ``allow`` ({role: fingerprints}) says who may register as what."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, idle_timeout: float = 3600.0,
                 pairing_timeout: float = 30.0, tls=None, allow: dict | None = None,
                 limits: DealerLimits | None = None):
        self.core = DealerCore(pairing_timeout, allow, limits)
        self.limits = self.core.limits
        self.sock = listen(host, port)
        self.address = self.sock.getsockname()[:2]
        self.idle_timeout = idle_timeout
        self.tls = tls
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def serve_forever(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self._threads = [x for x in self._threads if x.is_alive()]
            if len(self._threads) >= self.limits.max_connections:
                self._refuse(conn, addr)
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True)
            t.start()
            self._threads.append(t)

    def _refuse(self, conn, addr) -> None:
        """Too many links: say so (a plaintext party reads it as the reply to its hello) and hang up."""
        why = f"dealer busy: {self.limits.max_connections} connections already (try again later)"
        log.warning("refusing party at %s:%s: %s", addr[0], addr[1], why)
        if self.tls is None:
            ch = TcpChannel(conn, link="dealer", timeout=1.0, peer_name=f"party at {addr[0]}:{addr[1]}")
            try:
                ch.send_json({"ok": False, "error": why}, "dealer-hello")
            except TransportError:
                pass
            ch.close()
        else:
            conn.close()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the connections being served to end (after ``stop``)."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _serve(self, conn, addr) -> None:
        name = f"party at {addr[0]}:{addr[1]}"
        # one deadline for the TLS handshake and the hello together: a peer that trickles bytes is cut off
        watchdog = threading.Timer(self.limits.handshake_timeout, _hang_up, args=(conn, name))
        watchdog.daemon = True
        watchdog.start()
        if self.tls is None:
            ch = accept(conn, link="dealer", timeout=self.idle_timeout, peer_name=name)
        else:
            try:  # the handshake in this connection's thread: a slow peer does not block the others
                ch = accept(conn, tls=self.tls, link="dealer", timeout=self.limits.handshake_timeout, peer_name=name)
            except TransportError as e:
                watchdog.cancel()
                log.warning("refusing %s: %s", name, e)
                conn.close()
                return
            ch._set_timeout(self.idle_timeout)
        serve_connection(self.core, ch, registered=watchdog.cancel)

    def start(self) -> DealerServer:
        threading.Thread(target=self.serve_forever, name="dealer", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


def _hang_up(conn, name: str) -> None:
    log.warning("%s did not register within the handshake deadline: closed", name)
    try:
        conn.shutdown(socket.SHUT_RDWR)  # wakes the connection's thread from its blocked read
    except OSError:
        pass


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
