"""Framed binary channels over TCP, and the one import of everything about channels.

``TcpChannel`` is a ``channel.Channel`` over a connected socket (its writer thread, read-ahead, bounded
send queue); ``listen`` and ``parse_address`` open and name its ports.  The wire format is in ``frames``
(headers, tags, errors), the base channel, its checks and counters and the in-process ``MemoryChannel``
in ``channel``; both are re-exported here (``from cometpi.transport import TcpChannel, Traffic, FrameError``).
This module knows nothing of shares.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

from .channel import (  # noqa: F401 - re-exported (transport.Channel, transport.MemoryChannel, ...)
    DEFAULT_TIMEOUT,
    FAULT_EXIT_CODE,
    MAX_ERROR_BYTES,
    MAX_JSON_BYTES,
    NETWORKS,
    READ_CHUNK,
    TAG_MAX_BYTES,
    Channel,
    MemoryChannel,
    NetProfile,
)
from .frames import (  # noqa: F401 - re-exported (transport.FrameError, transport.PROTOCOL_VERSION, ...)
    DEFAULT_MAX_FRAME,
    ERROR_TAG,
    HEADER,
    MAGIC,
    MAX_NDIM,
    PROTOCOL_VERSION,
    DeadlineExceeded,
    FrameError,
    Header,
    PeerDisconnected,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    TransportError,
    VersionMismatch,
    encode_header,
    parse_header,
    tag_id,
    tag_name,
)
from .meter import LINKS, PHASES, Meter, Traffic  # noqa: F401 - re-exported (transport.Meter)


class TcpChannel(Channel):
    """A channel over a connected TCP socket (TCP_NODELAY, bounded timeouts).

    A send writes straight to the socket from the caller's thread (one non-blocking ``writev`` of the
    header and the payload: no copy, no thread hand-off) and queues what the kernel did not take for a
    writer thread, like a NIC's transmit queue: both parties of an ``exchange`` send megabytes at once and
    then receive, which would deadlock with blocking writes once the kernel's socket buffers fill.  Once
    anything is queued, later frames queue behind it (order is kept).  A write error is raised by the
    next send or receive; ``close`` flushes what is queued first.  Receives read ahead: one ``recv_into``
    of up to ``READ_AHEAD`` bytes takes a small frame's header and payload in one system call.
    """

    READ_AHEAD = 1 << 16

    def __init__(self, sock: socket.socket, **kw):
        super().__init__(**kw)
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)  # a timeout puts the descriptor in non-blocking mode: ``_write``'s writev
        #: Bytes the writer may hold queued before ``send`` blocks (None: unbounded).  The dealer bounds
        #: its links so that a party that consumes slowly holds the dealer back instead of its memory
        #: filling up; a party's own links stay unbounded (both peers of an exchange send first).
        self.max_queued_bytes: int | None = None
        self._queued = 0  # bytes queued or in the writer's hands, not yet on the wire
        self._qcond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._stopping = False
        self._werr: TransportError | None = None
        self._rbuf = bytearray()  # bytes read ahead of the frame being parsed
        self._scratch = bytearray(self.READ_AHEAD)
        self._setup()
        self._writer = threading.Thread(target=self._write_loop, name="tcp-writer", daemon=True)
        self._writer.start()

    def _setup(self) -> None:
        """Called before the writer thread starts (TLS: the handshake)."""

    @classmethod
    def connect(cls, host: str, port: int, *, connect_timeout: float = 10.0, retries: int = 0, tls=None, **kw):
        """Connect to ``host:port``; retry refused connections ``retries`` times (0.2 s apart).  With
        ``tls`` (a ``tls.TlsConfig``) the link runs TLS 1.3 with pinned certificates (``tls.TlsChannel``)."""
        last = None
        for _ in range(retries + 1):
            try:
                sock = socket.create_connection((host, port), timeout=connect_timeout)
                if tls is not None:  # a tls.TlsConfig makes its own channel (no import circle)
                    return tls.channel(sock, server_side=False, **kw)
                return cls(sock, **kw)
            except (TimeoutError, ConnectionRefusedError, OSError) as e:
                last = e
                time.sleep(0.2)
        who, where = kw.get("peer_name", "peer"), f"{host}:{port}"
        if not who.endswith(f" at {where}"):  # party's names carry the address already: "server at HOST:PORT"
            who = f"{who} at {where}"
        raise PeerDisconnected(f"cannot connect to {who}: {last}")

    def _write_loop(self) -> None:
        while True:
            with self._qcond:
                self._qcond.wait_for(lambda: self._pending or self._stopping)
                if not self._pending:
                    return
                data = self._pending[0]
            try:
                self.sock.sendall(data)
                self._on_wire(len(data))
            except TimeoutError:
                self._werr = PeerTimeout(f"{self.peer_name} did not accept data within {self.timeout:g} s")
            except OSError as e:
                self._werr = PeerDisconnected(f"connection to {self.peer_name} lost while sending: {e}")
            with self._qcond:
                self._pending.popleft()
                self._queued -= len(data)
                self._qcond.notify_all()
                if self._werr is not None:
                    return

    def _on_wire(self, n: int) -> None:
        """Called after ``n`` bytes went onto the socket (TLS counts its records)."""

    def _write_frame(self, header: bytes, payload: memoryview) -> None:
        self._write_parts([header, payload] if len(payload) else [header])

    def _write(self, data) -> None:
        self._write_parts([data])

    def _write_parts(self, parts: list) -> None:
        """Write ``parts`` in order: what the socket takes now from this thread, the rest (copied) queued."""
        if self._werr is not None:
            raise self._werr
        if not self._writer.is_alive():
            raise PeerDisconnected(f"connection to {self.peer_name} is closed")
        with self._qcond:
            if not self._pending:
                total = sum(len(p) for p in parts)
                try:
                    n = os.writev(self.sock.fileno(), parts)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as e:
                    self._werr = PeerDisconnected(f"connection to {self.peer_name} lost while sending: {e}")
                    raise self._werr from None
                if n:
                    self._on_wire(n)
                if n == total:
                    return
                parts = _after(parts, n)
            data = b"".join(parts)  # the rest, copied: the caller may change its tensor after send returns
            if self.max_queued_bytes is not None:
                room = self._qcond.wait_for(lambda: self._queued == 0 or self._werr is not None
                                            or self._queued + len(data) <= self.max_queued_bytes, self.timeout)
                if self._werr is not None:
                    raise self._werr
                if not room:
                    raise PeerTimeout(f"{self.peer_name} did not accept queued data within {self.timeout:g} s")
            self._queued += len(data)
            self._pending.append(data)
            self._qcond.notify_all()

    def _set_timeout(self, seconds: float) -> None:
        self.timeout = seconds
        self.sock.settimeout(seconds)

    def _read(self, n: int) -> bytearray:
        rb = self._rbuf
        if len(rb) >= n:
            out = rb[:n]
            del rb[:n]  # O(1) at the head
            return out
        buf = bytearray(n)
        view = memoryview(buf)
        self._read_into(view)
        view.release()
        return buf

    def _read_into(self, view: memoryview) -> None:
        """Fill ``view``: first from what was read ahead, then from the socket, a small rest by reading
        ahead into the scratch buffer (the surplus kept), a large one straight into ``view``."""
        rb, n = self._rbuf, len(view)
        got = min(len(rb), n)
        view[:got] = rb[:got]
        del rb[:got]
        ahead = n - got < self.READ_AHEAD
        while got < n:
            if self._werr is not None:
                raise self._werr
            wait = self.timeout if self._deadline is None else self._arm()
            try:
                k = self.sock.recv_into(self._scratch) if ahead else self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                raise self._timed_out(wait) from None
            except OSError as e:
                raise PeerDisconnected(f"connection to {self.peer_name} lost: {e}") from None
            if k == 0:
                raise PeerDisconnected(f"{self.peer_name} closed the connection"
                                       + (f" in the middle of a frame ({got}/{n} bytes)" if got else ""))
            if ahead:
                take = min(k, n - got)
                view[got:got + take] = self._scratch[:take]
                if k > take:
                    rb += memoryview(self._scratch)[take:k]
                got += take
            else:
                got += k

    def _arm(self) -> float:
        """Before a blocking read under a deadline: the socket waits at most what is left of it."""
        wait = self._wait()
        if wait < self.timeout:
            self.sock.settimeout(wait)
        return wait

    def _close(self) -> None:
        if self._writer.is_alive():
            with self._qcond:
                self._stopping = True
                self._qcond.notify_all()
            self._writer.join(self.timeout)  # flush queued frames first
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _after(parts: list, n: int) -> list:
    """``parts`` without their first ``n`` bytes."""
    out = []
    for p in parts:
        if n >= len(p):
            n -= len(p)
            continue
        out.append(memoryview(p)[n:] if n else p)
        n = 0
    return out


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0 picks a free port: read it from ``getsockname()``)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    return srv


def parse_address(addr: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port) with a clear error."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host or "127.0.0.1", int(port)

