"""Bounds against anyone who can connect (docs/robustness.md): what a peer's frames can make ``recv``
allocate (checked from the header, payloads read a chunk at a time), the server's handshake deadline,
its cap on pending handshakes and its maximum session length, and the key files' safety."""

import json
import os
import socket
import threading
import time
import tracemalloc
from contextlib import contextmanager

import pytest
import torch

from cometpi import serve
from cometpi.core import Config
from cometpi.dealer import DealerServer
from cometpi.party import connect_client
from cometpi.tls import TlsChannel, TlsConfig, TlsError, check_plaintext, is_loopback, keygen
from cometpi.transport import (
    MAX_ERROR_BYTES,
    MAX_JSON_BYTES,
    READ_CHUNK,
    DeadlineExceeded,
    FrameError,
    MemoryChannel,
    Meter,
    PeerDisconnected,
    ProtocolError,
    RemoteError,
    TcpChannel,
    encode_header,
    listen,
    parse_address,
    tag_id,
)

GIB = 1 << 30



def _trickle(sock, data: bytes, every: float, stop: threading.Event) -> None:
    """Send ``data`` one byte per ``every`` seconds from a thread, until ``stop`` or the link closes."""

    def go():
        for b in data:
            if stop.wait(every):
                return
            try:
                sock.send(bytes([b]))
            except OSError:
                return

    threading.Thread(target=go, daemon=True).start()

def _raw_pair(**kw):
    """A TcpChannel whose peer is a raw socket we write whatever we like into."""
    srv = listen()
    raw = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    srv.close()
    return raw, TcpChannel(conn, peer_name="test peer", **{"timeout": 5, **kw})


def _header(tag: str, nbytes: int, shape=(), dtype: int = 0) -> bytes:
    return encode_header(dtype, tag_id(tag), 1, nbytes, 0.0, shape)


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------


def test_a_header_claiming_a_gib_allocates_nothing():
    """A raw frame claiming 1 GiB is refused from its header (the limit named); a tensor frame claiming
    1 GiB is read a chunk at a time into a buffer that doubles when full, so a peer that sends 3 MiB of it
    costs a 4 MiB buffer, not 1 GiB."""
    raw, ch = _raw_pair()
    tracemalloc.start()
    try:
        raw.sendall(_header("x", GIB))
        with pytest.raises(FrameError, match=f"message 'x' .* of {GIB} bytes exceeds its limit of {MAX_JSON_BYTES}"):
            ch.recv_json("x")
        raw, ch = _raw_pair()
        raw.sendall(_header("x", GIB, (GIB // 8,), dtype=1) + bytes(3 << 20))
        raw.close()
        tracemalloc.reset_peak()
        with pytest.raises(PeerDisconnected, match=f"closed the connection .*at {3 << 20} of the frame's {GIB} bytes"):
            ch.recv("x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * (3 << 20), peak  # a 4 MiB buffer (and the 2 MiB of its last growth), far below 1 GiB


def test_expected_shape_and_dtype_are_checked_before_the_payload():
    """The caller knows the size: a header claiming another shape, dtype or size is refused at once (no
    payload was sent here: a read of it would time out)."""
    for hdr, match in ((_header("x", GIB, (GIB // 8,), dtype=1), r"has shape \(134217728,\), expected \(10,\)"),
                       (_header("x", GIB, (GIB // 8,), dtype=2), "wrong type"),
                       (_header("x", GIB), "wrong type")):
        raw, ch = _raw_pair()
        raw.sendall(hdr)
        t0 = time.perf_counter()
        with pytest.raises(ProtocolError, match=match):
            ch.recv("x", shape=(10,), dtype=torch.int64)
        assert time.perf_counter() - t0 < 1


def test_an_unexpected_tag_is_refused_from_the_header_but_an_error_frame_is_read():
    raw, ch = _raw_pair()
    raw.sendall(_header("y", 100 << 20))  # no payload follows
    with pytest.raises(ProtocolError, match="expected message 'x' from test peer, got 'y'"):
        ch.recv("x")
    raw, ch = _raw_pair()
    why = b'{"error":"query too long"}'
    raw.sendall(_header("error", len(why)) + why)
    with pytest.raises(RemoteError, match="ended the session: query too long"):
        ch.recv("x", shape=(3,), dtype=torch.int64)
    raw, ch = _raw_pair()
    raw.sendall(_header("error", GIB))
    with pytest.raises(RemoteError, match=f"over the limit of {MAX_ERROR_BYTES}, not read"):
        ch.recv("x")


def test_json_over_its_limit_is_refused_and_the_limit_is_per_message():
    big = {"items": ["x" * 100] * (1 << 14)}  # ~1.7 MB of JSON
    a, b = MemoryChannel.pair((Meter(), Meter()), timeout=5)
    a.send_json(big, "hello")
    with pytest.raises(FrameError, match=f"message 'hello' from peer of .* exceeds its limit of {MAX_JSON_BYTES}"):
        b.recv_json("hello")
    a, b = MemoryChannel.pair((Meter(), Meter()), timeout=5)
    a.send_json(big, "hello")
    a.send_json(big, "dealer-get")  # a prefetched dealer plan: a larger limit for its tag (TAG_MAX_BYTES)
    a.send_json({"small": 1}, "hello")
    assert b.recv_json("hello", max_bytes=4 << 20) == big
    assert b.recv_json("dealer-get") == big
    with pytest.raises(FrameError, match="exceeds its limit of 5 bytes"):
        b.recv_json("hello", max_bytes=5)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("bound-keys")
    for n in ("server", "client"):
        keygen(n, d)
    return d


def _tls_pair(d):
    srv = listen()
    out = {}
    conf = TlsConfig(str(d / "server"), [d / "client.crt"])
    t = threading.Thread(target=lambda: out.setdefault("s", TlsChannel(srv.accept()[0], conf, server_side=True,
                                                                        timeout=10)))
    t.start()
    a = TcpChannel.connect("127.0.0.1", srv.getsockname()[1], tls=TlsConfig(str(d / "client"), [d / "server.crt"]),
                           timeout=10)
    t.join(10)
    srv.close()
    return a, out["s"]


@pytest.mark.parametrize("kind", ["memory", "tcp", "tls"])
def test_incremental_reading_gives_the_same_results(kind, keys):
    if kind == "memory":
        a, b = MemoryChannel.pair((Meter(), Meter()), timeout=10)
    elif kind == "tcp":
        raw, b = _raw_pair(timeout=10)
        a = TcpChannel(raw, timeout=10)
    else:
        a, b = _tls_pair(keys)
    g = torch.Generator().manual_seed(5)
    big = torch.randint(-(1 << 62), 1 << 62, (3, 1_700_000), generator=g)  # 40 MB: 39 chunks
    odd = torch.rand(READ_CHUNK // 8 + 1, generator=g, dtype=torch.float64)  # one chunk and 8 bytes
    blobs = [os.urandom(n) for n in (READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1)]
    a.send(big, "big")
    a.send(odd, "odd")
    for blob in blobs:
        a.send(blob, "blob")
    a.send(torch.zeros((0, 3), dtype=torch.int64), "empty")
    a.send(torch.tensor(7, dtype=torch.int32), "scalar")
    assert torch.equal(b.recv("big", shape=big.shape, dtype=torch.int64), big)
    assert torch.equal(b.recv("odd"), odd)
    for blob in blobs:
        assert b.recv("blob", dtype="raw", max_bytes=2 * READ_CHUNK) == blob
    assert b.recv("empty", shape=(0, 3), dtype=torch.int64).shape == (0, 3)
    assert b.recv("scalar", shape=(), dtype=torch.int32).item() == 7
    assert b.meter.total().bytes_recv == a.meter.total().bytes_sent
    a.close()
    b.close()


@pytest.mark.parametrize("tls", [False, True])
def test_a_channel_deadline_ends_a_trickling_peer(tls, keys):
    """One byte every 0.2 s keeps every read within its 5 s timeout; the total deadline still ends it."""
    srv = listen()
    raw = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    srv.close()
    stop = threading.Event()

    data = b"\x16\x03\x01\x40\x00" + bytes(100) if tls else _header("x", 1 << 20) * 3  # a 16 KiB TLS record's start

    _trickle(raw, data, 0.2, stop)
    t0 = time.perf_counter()
    kw = {"timeout": 5, "deadline": time.monotonic() + 1.0, "deadline_message": "too slow"}
    try:
        with pytest.raises(DeadlineExceeded, match="too slow"):
            if tls:
                TlsChannel(conn, TlsConfig(str(keys / "server"), [keys / "client.crt"]), server_side=True, **kw)
            else:
                TcpChannel(conn, **kw).recv("x")
        assert 0.9 < time.perf_counter() - t0 < 2.5
    finally:
        stop.set()
        raw.close()


# --------------------------------------------------------------------------------------------------
# The server: handshake deadline, pending handshakes, session length
# --------------------------------------------------------------------------------------------------


def _echo(sess) -> None:
    while True:
        q = sess.peer.recv_json("ping")
        if q == "bye":
            return
        sess.peer.send_json(q, "pong")


@contextmanager
def _server(monkeypatch, handler=_echo, **kw):
    """serve_forever in a thread with an in-process dealer; yields (server address, dealer address)."""
    dealer = DealerServer().start()
    daddr = f"{dealer.address[0]}:{dealer.address[1]}"
    socks, stop = [], threading.Event()
    monkeypatch.setattr(serve, "listen", lambda h, p: socks.append(listen(h, p)) or socks[-1])
    t = threading.Thread(target=serve.serve_forever, args=(handler,), daemon=True,
                         kwargs={"host": "127.0.0.1", "port": 0, "dealer": daddr, "config": Config(), "timeout": 10,
                                 "stop_event": stop, **kw})
    t.start()
    while not socks:
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{socks[0].getsockname()[1]}", daddr
    finally:
        stop.set()
        t.join(15)
        dealer.stop()
    assert not t.is_alive()


def _ping(saddr, daddr, n=1, pause=0.0):
    sess = connect_client(saddr, daddr, Config(), timeout=10)
    try:
        for i in range(n):
            sess.peer.send_json({"i": i}, "ping")
            assert sess.peer.recv_json("pong") == {"i": i}
            time.sleep(pause)
        sess.peer.send_json("bye", "ping")
    finally:
        sess.close()


def _closed_by_peer(raw: socket.socket, within: float) -> bool:
    raw.settimeout(within)
    try:
        return raw.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_trickling_client_is_dropped_while_an_honest_one_is_served(monkeypatch, capsys):
    """--workers 1: a client trickling a byte every 0.5 s no longer holds the only slot: its handshake runs
    beside the accept loop and ends at the deadline, with the reason logged; an honest client is served
    meanwhile."""
    with _server(monkeypatch, handshake_timeout=2.0, workers=1) as (saddr, daddr):
        raw = socket.create_connection(parse_address(saddr))
        t0 = time.perf_counter()
        stop = threading.Event()

        _trickle(raw, _header("hello", 100), 0.5, stop)
        _ping(saddr, daddr, n=3)
        assert not _closed_by_peer(raw, 0.01)  # served while the trickler was still in its handshake
        assert _closed_by_peer(raw, 4.0)
        assert 1.9 < time.perf_counter() - t0 < 4.5
        stop.set()
        raw.close()
        _ping(saddr, daddr)  # and the slot is free for the next one
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith('{"event": "session"')]
    outcomes = sorted(x["outcome"] for x in lines if not x["peer"].startswith("party"))  # the dealer's apart
    assert outcomes == ["error: the client did not complete the handshake within 2 s", "ok", "ok"]


def test_pending_handshakes_are_capped(monkeypatch):
    with _server(monkeypatch, handshake_timeout=5, max_pending_handshakes=2) as (saddr, daddr):
        addr = parse_address(saddr)
        silent = [socket.create_connection(addr) for _ in range(2)]
        time.sleep(0.3)  # both accepted, in their handshakes
        extra = socket.create_connection(addr)
        t0 = time.perf_counter()
        assert _closed_by_peer(extra, 2.0) and time.perf_counter() - t0 < 1.5  # closed at once
        assert not _closed_by_peer(silent[0], 0.2)  # the pending ones are still waiting
        for s in silent + [extra]:
            s.close()
        time.sleep(0.3)
        _ping(saddr, daddr)  # their places are free again


def test_a_session_ends_at_the_maximum_session_length(monkeypatch):
    with _server(monkeypatch, max_session_seconds=1.0) as (saddr, daddr):
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match=r"maximum session length \(1 s\)"):
            _ping(saddr, daddr, n=100, pause=0.2)
        assert 0.9 < time.perf_counter() - t0 < 3.0
        _ping(saddr, daddr)  # the next session starts afresh


# --------------------------------------------------------------------------------------------------
# Keys and plaintext
# --------------------------------------------------------------------------------------------------


def test_keygen_refuses_to_overwrite_and_refuses_symlinks(tmp_path):
    first = keygen("alice", tmp_path)
    with pytest.raises(TlsError, match="alice.key exists: refusing to overwrite"):
        keygen("alice", tmp_path)
    again = keygen("alice", tmp_path, overwrite=True)
    assert again["fingerprint"] != first["fingerprint"]
    assert (tmp_path / "alice.key").stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "bob.key").symlink_to(elsewhere)
    for overwrite in (False, True):
        with pytest.raises(TlsError, match="bob.key is a symbolic link"):
            keygen("bob", tmp_path, overwrite=overwrite)
    assert not elsewhere.exists()


def test_a_key_readable_by_others_is_refused(tmp_path):
    keygen("carol", tmp_path)
    TlsConfig(str(tmp_path / "carol"), [tmp_path / "carol.crt"])
    os.chmod(tmp_path / "carol.key", 0o644)
    with pytest.raises(TlsError, match=r"carol.key is accessible by group/others \(mode 0644\).*chmod 600"):
        TlsConfig(str(tmp_path / "carol"), [tmp_path / "carol.crt"])


def test_loopback_is_decided_without_dns(monkeypatch):
    def no_dns(*a, **k):
        raise AssertionError("is_loopback asked DNS")

    monkeypatch.setattr(socket, "gethostbyname", no_dns)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("0.0.0.0") and not is_loopback("my-laptop")
    check_plaintext("localhost", False, "the server")
    with pytest.raises(TlsError, match="not on loopback"):
        check_plaintext("my-laptop", False, "the server")
