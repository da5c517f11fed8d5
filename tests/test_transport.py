import os
import select
import socket
import struct
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cometpi.channel import Channel
from cometpi.transport import (
    HEADER,
    MAGIC,
    FrameError,
    MemoryChannel,
    Meter,
    NetProfile,
    PeerDisconnected,
    PeerTimeout,
    ProtocolError,
    TcpChannel,
    VersionMismatch,
    encode_header,
    listen,
    parse_header,
    tag_id,
)


def pair(**kw):
    return MemoryChannel.pair((Meter(), Meter()), **kw)


class PipeChannel(Channel):
    """docs/architecture.md's recipe for a transport, followed once: a channel over two OS pipes
    (``_write``, ``_read`` with the base class's deadline, ``_close``); the frames, counters and checks
    are the base class's."""

    def __init__(self, rfd: int, wfd: int, **kw):
        super().__init__(**kw)
        self._r, self._w = rfd, wfd

    def _write(self, data) -> None:
        view = memoryview(bytes(data))
        while view:
            view = view[os.write(self._w, view):]

    def _read(self, n: int) -> bytearray:
        out = bytearray()
        while len(out) < n:
            wait = self._wait()
            if not select.select([self._r], [], [], wait)[0]:
                raise self._timed_out(wait)
            chunk = os.read(self._r, n - len(out))
            if not chunk:
                raise PeerDisconnected(f"{self.peer_name} closed the connection")
            out += chunk
        return out

    def _close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def pipe_pair(**kw):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return PipeChannel(r1, w2, meter=Meter(), **kw), PipeChannel(r2, w1, meter=Meter(), **kw)


def tcp_pair(**kw):
    srv = listen()
    port = srv.getsockname()[1]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("s", srv.accept()[0]))
    t.start()
    a = TcpChannel.connect("127.0.0.1", port, meter=Meter(), **kw)
    t.join()
    srv.close()
    return a, TcpChannel(out["s"], meter=Meter(), **kw)


@pytest.mark.parametrize("make", [pair, tcp_pair, pipe_pair])
def test_roundtrip_and_exact_counters(make):
    a, b = make(timeout=5)
    x = torch.arange(12, dtype=torch.int64).reshape(3, 4) - 6
    y = torch.linspace(-1, 1, 5, dtype=torch.float64)
    a.send(x, "x")
    a.send(y, "y")
    a.send(b"hello", "raw")
    assert torch.equal(b.recv("x", shape=(3, 4), dtype=torch.int64), x)
    assert torch.equal(b.recv("y"), y)
    assert b.recv("raw", dtype="raw") == b"hello"
    sent = a.meter.total("online")
    assert sent.bytes_sent == 12 * 8 + 5 * 8 + 5
    assert sent.header_bytes_sent == 3 * HEADER.size + 8 * (2 + 1 + 0)
    assert sent.msgs_sent == 3
    recv = b.meter.total("online")
    assert (recv.bytes_recv, recv.msgs_recv) == (sent.bytes_sent, 3)
    a.close()
    b.close()


def test_rounds_are_critical_path_depth():
    a, b = pair(timeout=5)
    t = torch.zeros(4, dtype=torch.int64)
    # simultaneous exchange: one round on each side
    a.send(t, "e")
    b.send(t, "e")
    a.recv("e")
    b.recv("e")
    assert a.meter.total().rounds == b.meter.total().rounds == 1
    # ping-pong: two more rounds
    a.send(t, "p")
    b.recv("p")
    b.send(t, "q")
    a.recv("q")
    assert a.meter.total().rounds == 3 and b.meter.total().rounds == 3
    # each frame sent is a flight: two frames in a row from one side are two rounds
    a.send(t, "r1")
    a.send(t, "r2")
    b.recv("r1")
    b.recv("r2")
    assert a.meter.total().rounds == 5 and b.meter.total().rounds == 5
    # one-way messages: the receiver's clock follows the sender's
    b.send(t, "s")
    a.recv("s")
    assert a.meter.total().rounds == b.meter.total().rounds == 6


def test_spans_nest_and_split_phases():
    a, b = pair(timeout=5)
    m = a.meter
    with m.span("layer"):
        with m.span("attn"):
            a.send(torch.zeros(10, dtype=torch.int64), "x")
        with m.offline():
            a.send(torch.zeros(3, dtype=torch.int64), "w")
    rep = m.report()
    assert rep["spans"]["layer/attn"]["online"]["bytes_sent"] == 80
    assert rep["spans"]["layer"]["online"]["bytes_sent"] == 80
    assert rep["spans"]["layer"]["offline"]["bytes_sent"] == 24
    assert rep["online"]["bytes_sent"] == 80 and rep["offline"]["bytes_sent"] == 24


def test_wrong_tag_shape_and_dtype_are_errors():
    # refused from the header, the payload unread: after a ProtocolError the channel is out of step (a fresh pair each)
    i64, f64 = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.float64)
    for sent, kw, match in ((i64, {"tag": "beta"}, "expected message 'beta'.*got 'alpha'"),
                            (i64, {"shape": (4,)}, "shape"), (f64, {"dtype": torch.int64}, "wrong type")):
        a, b = pair(timeout=5)
        a.send(sent, "alpha")
        with pytest.raises(ProtocolError, match=match):
            b.recv(kw.pop("tag", "alpha"), **kw)


def _raw_pair():
    """A TcpChannel whose peer is a raw socket we can write garbage into."""
    srv = listen()
    raw = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    srv.close()
    return raw, TcpChannel(conn, timeout=2, peer_name="test peer")


def test_garbage_bad_version_oversize_and_mismatch():
    raw, ch = _raw_pair()
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
    with pytest.raises(FrameError, match="bad magic"):
        ch.recv("x")
    raw, ch = _raw_pair()
    raw.sendall(struct.pack("!2sBBIIQdB", MAGIC, 99, 1, tag_id("x"), 1, 0, 0.0, 0))
    with pytest.raises(VersionMismatch, match="version 99"):
        ch.recv("x")
    raw, ch = _raw_pair()
    ch.max_frame = 1000
    raw.sendall(encode_header(1, tag_id("x"), 1, 8 * 10_000, 0.0, (10_000,)))
    with pytest.raises(FrameError, match="exceeds the maximum frame size"):
        ch.recv("x")
    raw, ch = _raw_pair()
    raw.sendall(encode_header(1, tag_id("x"), 1, 24, 0.0, (4,)))
    with pytest.raises(FrameError, match="does not match shape"):
        ch.recv("x")
    ch.max_frame = 1000
    with pytest.raises(FrameError, match="refusing to send"):
        ch.send(torch.zeros(1000, dtype=torch.int64), "x")


def test_truncated_frame_and_disconnect():
    raw, ch = _raw_pair()
    raw.sendall(encode_header(1, tag_id("x"), 1, 80, 0.0, (10,)) + bytes(30))
    raw.close()
    with pytest.raises(PeerDisconnected, match="middle of a frame"):
        ch.recv("x")
    a, b = pair(timeout=5)
    a.close()
    with pytest.raises(PeerDisconnected):
        b.recv("x")


def test_cannot_connect_names_the_address_once():
    """Issue 15: 'cannot connect to server at A at A' printed the address twice."""
    from cometpi.core import Config
    from cometpi.party import connect_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    where = f"127.0.0.1:{free}"
    for name, want in ((f"server at {where}", f"cannot connect to server at {where}: "),
                       ("dealer", f"cannot connect to dealer at {where}: ")):
        with pytest.raises(PeerDisconnected) as e:
            TcpChannel.connect("127.0.0.1", free, meter=Meter(), peer_name=name)
        assert str(e.value).startswith(want) and str(e.value).count(where) == 1, str(e.value)
    with pytest.raises(PeerDisconnected) as e:  # the client's own path (cometpi infer, linear query)
        connect_client(where, where, Config(), timeout=5)
    assert str(e.value).startswith(f"cannot connect to server at {where}: ") and str(e.value).count(where) == 1


@pytest.mark.parametrize("make", [pair, tcp_pair, pipe_pair])
def test_silent_peer_times_out(make):
    a, b = make(timeout=0.5)
    t0 = time.perf_counter()
    with pytest.raises(PeerTimeout, match="within 0.5 s"):
        b.recv("x")
    assert time.perf_counter() - t0 < 3


def test_network_emulation_is_felt():
    net = NetProfile("test", bandwidth=1e6, delay=0.05)
    a, b = pair(timeout=5, net=net)
    t0 = time.perf_counter()
    a.send(torch.zeros(12_500, dtype=torch.int64), "x")  # 100 kB at 1 MB/s = 0.1 s
    b.recv("x")
    dt = time.perf_counter() - t0
    assert 0.15 <= dt < 1.0
    assert net.project(1.0, 1_000_000, 10) == pytest.approx(1.0 + 1.0 + 10 * 0.1)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=HEADER.size, max_size=HEADER.size + 64))
def test_header_parser_never_crashes(data):
    """Random bytes either parse or raise FrameError; nothing else escapes."""
    rest = data[HEADER.size:]
    try:
        h = parse_header(data[:HEADER.size], 1 << 20, lambda n: rest[:n])
    except FrameError:
        return
    assert h.nbytes <= 1 << 20


def test_a_bounded_send_queue_waits_for_the_reader():
    """The dealer bounds its links' send queues: send blocks while the peer does not read (instead of
    the sender's memory filling), and resumes as the peer reads."""
    import socket
    import threading
    import time

    from cometpi.transport import TcpChannel

    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    tx, rx = TcpChannel(a, timeout=10.0), TcpChannel(b, timeout=10.0)
    tx.max_queued_bytes = 1 << 20
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # no receive autotuning: the kernel holds little
    payload = torch.zeros(1 << 17, dtype=torch.int64)  # 1 MiB per frame
    sent = []

    def writer():
        for _ in range(24):
            tx.send(payload, "x")
            sent.append(1)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(1.0)
    assert len(sent) < 24 and tx._queued <= (1 << 20) + payload.numel() * 8  # held back, memory bounded
    for _ in range(24):
        assert rx.recv("x", shape=(1 << 17,), dtype=torch.int64).numel() == 1 << 17
    t.join(10)
    assert len(sent) == 24
    tx.close()
    rx.close()
