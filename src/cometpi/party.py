"""Setting up sessions: the client/server handshake, dealer registration, TCP and in-process pairs.

Handshake (client -> server, JSON in one frame each way)::

    hello  {version, config, config_hash, session, pair_seed, extra}
    ack    {ok: true, extra} | {ok: false, error}

The server refuses a different wire version or configuration hash, and any field of the client's
``extra`` that differs from its own (the model server puts the public model card there: model hash,
architecture, approximation config), naming every differing field.  The ack carries the server's
``extra``, so a client that pins nothing learns the public architecture it needs.  Then both parties register
with the dealer for the session and receive their seeds.  The channel is assumed confidential
(semi-honest parties; run it inside TLS or a VPN between machines).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import torch

from .core import Config, ConfigError, Role, Session, new_session_id
from .dealer import DealerClient, LocalDealer, Provider
from .links import accept, dial
from .ring import new_seed
from .transport import (
    DEFAULT_TIMEOUT,
    PROTOCOL_VERSION,
    Channel,
    MemoryChannel,
    Meter,
    NetProfile,
    PeerDisconnected,
    VersionMismatch,
    parse_address,
)

#: Seconds a new connection gets, in all, for the TLS handshake, the hello and the dealer registration.
HANDSHAKE_TIMEOUT = 10.0


def client_handshake(ch: Channel, config: Config, extra: dict | None = None) -> tuple[str, bytes, dict]:
    """Returns (session id, pair seed, the server's extra)."""
    with ch.meter.offline():
        return _client_handshake(ch, config, extra)


def server_handshake(ch: Channel, config: Config, extra: dict | None = None) -> tuple[str, bytes]:
    with ch.meter.offline():
        return _server_handshake(ch, config, extra)


def _client_handshake(ch: Channel, config: Config, extra: dict | None) -> tuple[str, bytes, dict]:
    sid, pair_seed = new_session_id(), new_seed()
    ch.send_json({"version": PROTOCOL_VERSION, "config": config.to_dict(), "config_hash": config.hash(),
                  "session": sid, "pair_seed": pair_seed.hex(), "extra": extra or {}}, "hello")
    ack = ch.recv_json("hello-ack")
    if not ack.get("ok"):
        raise ConfigError(f"server refused the session: {ack.get('error')}")
    return sid, pair_seed, ack.get("extra") or {}


def _server_handshake(ch: Channel, config: Config, extra: dict | None) -> tuple[str, bytes]:
    hello = ch.recv_json("hello")
    try:
        if not isinstance(hello, dict):
            raise ConfigError("hello is not a JSON object")
        if hello.get("version") != PROTOCOL_VERSION:
            raise VersionMismatch(f"client speaks protocol version {hello.get('version')}, "
                                  f"server {PROTOCOL_VERSION}")
        if hello.get("config_hash") != config.hash():
            theirs = hello.get("config") if isinstance(hello.get("config"), dict) else {}
            raise ConfigError("configuration mismatch: " + "; ".join(config.diff(theirs) or ["hash differs"]))
        mine, theirs = extra or {}, hello.get("extra") or {}
        if not isinstance(theirs, dict):
            raise ConfigError("malformed extra in hello")
        keys = sorted(k for k in theirs if mine.get(k) != theirs[k])
        if keys:
            raise ConfigError("session mismatch: " + "; ".join(
                f"{k}: server {mine.get(k)!r}, client {theirs.get(k)!r}" for k in keys))
        sid, pair_seed = str(hello["session"]), bytes.fromhex(hello["pair_seed"])
        if len(pair_seed) != 16 or not 0 < len(sid) <= 64:
            raise ConfigError("malformed session id or seed in hello")
    except (ConfigError, VersionMismatch, KeyError, ValueError, TypeError) as e:
        msg = str(e) if isinstance(e, (ConfigError, VersionMismatch)) else f"malformed hello: {e!r}"
        ch.send_json({"ok": False, "error": msg}, "hello-ack")
        raise type(e)(msg) if isinstance(e, (ConfigError, VersionMismatch)) else ConfigError(msg) from None
    ch.send_json({"ok": True, "extra": extra or {}}, "hello-ack")
    return sid, pair_seed


def _session(role: Role, peer: Channel, dealer: DealerClient, config: Config, sid: str, pair_seed: bytes,
             device=None, card: dict | None = None) -> Session:
    authenticated = getattr(peer, "peer", None)  # TLS: name the peer we authenticated to the dealer
    seed = dealer.hello(sid, role, config.hash(), None if authenticated is None else authenticated.fingerprint)
    provider = Provider(role, seed, dealer, device=device)
    sess = Session(role, peer, provider, config, pair_seed=pair_seed, session_id=sid, meter=peer.meter,
                   device=device)
    sess.card = card or {}  # the server's public model card
    return sess


# --------------------------------------------------------------------------------------------------
# TCP
# --------------------------------------------------------------------------------------------------


def _dealer_client(dealer: str, meter: Meter, timeout: float, tls=None, insecure_plaintext: bool = False,
                   **deadline) -> DealerClient:
    """The dealer link (``deadline``/``deadline_message``: see ``Channel.set_deadline``)."""
    host, port = parse_address(dealer)
    if tls is None or tls.dealer is None:
        from .tls import check_plaintext

        check_plaintext(host, insecure_plaintext, "the dealer")
    return DealerClient(dial(host, port, link="dealer", meter=meter, timeout=timeout,
                                           peer_name=f"dealer at {dealer}", retries=10,
                                           tls=None if tls is None else tls.dealer, **deadline))


def connect_client(server: str, dealer: str, config: Config, *, timeout: float = DEFAULT_TIMEOUT,
                   net: NetProfile | None = None, extra: dict | None = None, device=None, tls=None,
                   insecure_plaintext: bool = False) -> Session:
    """The client's session: connect to the server, agree on the configuration, join the dealer.
    ``tls`` (a ``tls.PartyTls``): both links in TLS 1.3 with the pinned server and dealer certificates;
    without it plaintext TCP is refused off loopback unless ``insecure_plaintext``."""
    meter = Meter()
    host, port = parse_address(server)
    if tls is None or tls.peer is None:
        from .tls import check_plaintext

        check_plaintext(host, insecure_plaintext, "the server")
    ch = dial(host, port, meter=meter, timeout=timeout, net=net,
                            peer_name=f"server at {server}", retries=10, tls=None if tls is None else tls.peer)
    try:
        sid, pair_seed, card = client_handshake(ch, config, extra)
        return _session(Role.CLIENT, ch, _dealer_client(dealer, meter, timeout, tls, insecure_plaintext), config,
                        sid, pair_seed, device, card)
    except BaseException:
        ch.close()
        raise


def accept_server(conn: socket.socket, dealer: str, config: Config, *, timeout: float = DEFAULT_TIMEOUT,
                  net: NetProfile | None = None, extra: dict | None = None, device=None, tls=None,
                  insecure_plaintext: bool = False, handshake_timeout: float | None = HANDSHAKE_TIMEOUT) -> Session:
    """The server's session over an accepted connection (``tls``: the client must present one of the
    admitted certificates; the dealer link is TLS too).

    ``handshake_timeout``: seconds, in all, for the TLS handshake, the hello and the registration of both
    parties with the dealer; a client that has not completed them by then, however steadily it trickles
    bytes, is dropped with ``DeadlineExceeded`` (None: only the per-read ``timeout``)."""
    meter = Meter()
    at = None if handshake_timeout is None else time.monotonic() + handshake_timeout
    within = f"within {handshake_timeout or 0:g} s"
    kw = {"meter": meter, "timeout": timeout, "net": net, "peer_name": "client", "deadline": at,
          "deadline_message": f"the client did not complete the handshake {within}"}
    try:
        ch = accept(conn, tls=tls.peer if tls is not None else None, **kw)
    except BaseException:
        conn.close()
        raise
    dc = None
    try:
        sid, pair_seed = server_handshake(ch, config, extra)
        dc = _dealer_client(dealer, meter, timeout, tls, insecure_plaintext, deadline=at, deadline_message=(
            f"the dealer registration did not complete {within} of the connection (did the client register?)"))
        sess = _session(Role.SERVER, ch, dc, config, sid, pair_seed, device, extra)
        ch.set_deadline(None)
        dc.ch.set_deadline(None)
        return sess
    except BaseException:
        ch.close()
        if dc is not None:
            dc.close()
        raise


# --------------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------------


def local_pair(config: Config | None = None, *, dealer: LocalDealer | None = None, timeout: float = 60.0,
               net: NetProfile | None = None, extra=(None, None), device=None) -> tuple[Session, Session]:
    """A client and a server session in this process over memory channels, with an in-process dealer
    speaking the dealer protocol.  Run each party's code in its own thread (see ``run_local``)."""
    config = config or Config()
    dealer = dealer or LocalDealer()
    cm, sm = Meter(), Meter()
    cch, sch = MemoryChannel.pair((cm, sm), timeout=timeout, net=net)
    cch.peer_name, sch.peer_name = "server", "client"
    out: dict = {}

    def server():
        try:
            sid, seed = server_handshake(sch, config, extra[1])
            out["server"] = _session(Role.SERVER, sch, dealer.connect(sm, timeout), config, sid, seed, device,
                                     extra[1])
        except BaseException as e:  # noqa: BLE001
            out["server_error"] = e

    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        sid, seed, card = client_handshake(cch, config, extra[0])
        client = _session(Role.CLIENT, cch, dealer.connect(cm, timeout), config, sid, seed, device, card)
    finally:
        t.join(timeout)
    if "server_error" in out:
        raise out["server_error"]
    return client, out["server"]


def run_pair(client_fn: Callable[[Session], object], server_fn: Callable[[Session], object],
             sessions: tuple[Session, Session], timeout: float = 300.0):
    """Run each party's function in its own thread; return (client_result, server_result).

    An exception on either side is re-raised here (the client's first); a party that does not
    finish within ``timeout`` raises TimeoutError instead of hanging the caller.
    """
    results: dict = {}

    def go(name, fn, sess):
        try:
            results[name] = fn(sess)
        except BaseException as e:  # noqa: BLE001
            results[name + "_error"] = e
            sess.peer.close()  # unblock the other party

    threads = [threading.Thread(target=go, args=("client", client_fn, sessions[0]), daemon=True),
               threading.Thread(target=go, args=("server", server_fn, sessions[1]), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"a party did not finish within {timeout:g} s")
    errors = [results[n + "_error"] for n in ("client", "server") if n + "_error" in results]
    # the root cause first: a PeerDisconnected is usually the other side's reaction to it
    errors.sort(key=lambda e: isinstance(e, PeerDisconnected))
    if errors:
        raise errors[0]
    return results["client"], results["server"]


def run_local(fn: Callable[[Session], object], config: Config | None = None, **kw):
    """Run the same SPMD function on both parties of a fresh in-process pair (``timeout``: seconds a
    party may take, default 300)."""
    dealer = kw.pop("dealer", None) or LocalDealer()
    timeout = kw.pop("timeout", 300.0)
    sessions = local_pair(config, dealer=dealer, **kw)
    try:
        return run_pair(fn, fn, sessions, timeout=timeout)
    finally:
        for s in sessions:
            s.close()
        dealer.join()


def prefetch_plan(sess: Session, plan: list | None) -> bool:
    """Replay a recorded dealer plan ahead of a query of the same shape, wait for the material
    (offline), then meet the peer, so that the online phase never waits on the dealer."""
    if plan is None:
        return False
    sess.provider.prefetch_relative(plan)
    sess.provider.wait_prefetched()
    with sess.offline():
        sess.peer.exchange([torch.zeros(1, dtype=torch.int64)], "prefetched")
    return True
