"""Framed binary channels (TCP and an in-memory twin) with always-on traffic counters.

Wire format of one frame (network byte order, no pickle anywhere)::

    magic 'CP' | version u8 | dtype u8 | tag u32 | depth u32 | nbytes u64 | deliver_at f64 | ndim u8
    | ndim x u64 shape | payload (nbytes, little-endian elements)

``tag`` names the message (CRC32 of a protocol label) so that a desynchronised peer is an error, not
garbage; ``depth`` is a Lamport clock that counts rounds on the critical path: a send advances the
sender's clock by one and stamps the frame, a receive sets the clock to max(own, frame's).  So a
simultaneous exchange is one round, a ping-pong two, and each further frame a party sends before
hearing back is one more (batch tensors into one frame with ``send_many``); ``deliver_at`` carries
the emulated arrival time when bandwidth/latency emulation is on.  This module knows nothing of shares.
"""

from __future__ import annotations

import collections
import json
import math
import os
import queue
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .meter import LINKS, PHASES, Meter, Traffic  # noqa: F401 - re-exported (transport.Meter)

PROTOCOL_VERSION = 5  # 2: the narrow comparison's dealer tables as words, packed AND triples (issue 11); 3: guessed
# dealer plans (a wrong guess skips indices, so both parties must guess alike), each index answered once; 4: material
# bound to its request (keystreams labelled by index, kind and parameters: ring.request_label); 5: the thermometer
# guess at four thresholds per octave (2 Newton steps), RMSNorm gammas folded into the next layer's weights
MAGIC = b"CP"
HEADER = struct.Struct("!2sBBIIQdB")
MAX_NDIM = 8
DEFAULT_MAX_FRAME = 1 << 31  # the global cap on one frame's payload (``Channel.max_frame``)
DEFAULT_TIMEOUT = 120.0
#: Bounds on what a peer can make ``recv`` allocate (docs/robustness.md): a raw or JSON message may hold at most
#: ``MAX_JSON_BYTES`` (``max_bytes=`` per call, or its tag's entry in ``TAG_MAX_BYTES``); a tensor the caller
#: gave the shape and dtype of must be exactly that size; anything else at most ``max_frame``.  Every limit is
#: checked from the header, before the payload is read; payloads above ``READ_CHUNK`` are read into a buffer that
#: doubles as it fills, so a header that lies about its size costs at most twice what actually arrived plus a chunk.
MAX_JSON_BYTES = 1 << 20
MAX_ERROR_BYTES = 1 << 16  # an ``error`` frame (the peer's reason) is read up to this size, even when unexpected
TAG_MAX_BYTES: dict[str, int] = {
    "error": MAX_ERROR_BYTES,
    "dealer-get": 64 << 20,  # a prefetched dealer plan: thousands of items (a BERT-base query: ~1 MB)
    "query": 8 << 20,  # an attention mask of MAX_BATCH x the longest context, as JSON
    "stats": 16 << 20, "bench-server-stats": 16 << 20,  # meter reports with their spans
}
READ_CHUNK = 1 << 20

_DTYPES = {0: ("raw", None), 1: ("int64", "<i8"), 2: ("float64", "<f8"), 3: ("uint8", "u1"), 4: ("int32", "<i4")}
_DTYPE_CODE = {"raw": 0, torch.int64: 1, torch.float64: 2, torch.uint8: 3, torch.int32: 4}
_ITEMSIZE = {k: np.dtype(v).itemsize if v else 1 for k, (_, v) in _DTYPES.items()}


class TransportError(RuntimeError):
    """Base class of every error raised by a channel."""


class FrameError(TransportError):
    """A frame that is malformed, truncated, oversize or of another protocol."""


class VersionMismatch(FrameError):
    """The peer speaks another version of the wire protocol."""


class ProtocolError(TransportError):
    """A well-formed frame that is not the one the protocol expects here (desynchronised peers)."""


class PeerDisconnected(TransportError):
    """The peer closed the connection or its process died."""


class PeerTimeout(TransportError):
    """No message from the peer within the receive timeout."""


class DeadlineExceeded(PeerTimeout):
    """The peer did not finish within a total deadline (``Channel.set_deadline``: the handshake, a session's
    maximum length), however steadily it trickled bytes."""


class RemoteError(TransportError):
    """The peer gave up on the session and said why (an ``error`` frame)."""


_TAG_NAMES: dict[int, str] = {}
_TAG_IDS: dict[str, int] = {}
ERROR_TAG = "error"


def tag_id(name: str) -> int:
    """The 32-bit wire tag of a protocol label."""
    t = _TAG_IDS.get(name)
    if t is None:
        t = _TAG_IDS[name] = zlib.crc32(name.encode())
        _TAG_NAMES.setdefault(t, name)
    return t


def tag_name(t: int) -> str:
    return _TAG_NAMES.get(t, f"0x{t:08x}")


# --------------------------------------------------------------------------------------------------
# Network emulation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetProfile:
    """A network: bandwidth in bytes/s and one-way delay in seconds (RTT = 2 x delay)."""

    name: str
    bandwidth: float
    delay: float

    def project(self, seconds: float, nbytes: int, rounds: int) -> float:
        """Projected time ``compute + bytes/bandwidth + rounds*RTT`` (docs/COMET §6 convention)."""
        return seconds + nbytes / self.bandwidth + rounds * 2 * self.delay


NETWORKS = {
    "lan": NetProfile("lan", 1e9, 0.25e-3),
    "wan": NetProfile("wan", 400e6, 2e-3),
    "bolt-wan": NetProfile("bolt-wan", 200e6 / 8, 20e-3),
}


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    version: int
    dtype: int
    tag: int
    depth: int
    nbytes: int
    deliver_at: float
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return HEADER.size + 8 * len(self.shape)


def encode_header(dtype: int, tag: int, depth: int, nbytes: int, deliver_at: float, shape) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, dtype, tag, depth, nbytes, deliver_at, len(shape)) + (
        struct.pack(f"!{len(shape)}Q", *shape)
    )


def _parse_fixed(fixed, max_frame: int) -> tuple[int, int, int, int, float, int]:
    """Validate the fixed part of a header: (dtype, tag, depth, nbytes, deliver_at, ndim)."""
    if len(fixed) != HEADER.size:
        raise FrameError(f"truncated frame header ({len(fixed)} of {HEADER.size} bytes)")
    magic, version, dtype, tag, depth, nbytes, deliver_at, ndim = HEADER.unpack(fixed)
    if magic != MAGIC:
        raise FrameError(f"not a cometpi frame: bad magic {magic!r} (is something else on this port?)")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"peer speaks wire protocol version {version}, this side {PROTOCOL_VERSION}")
    if dtype not in _DTYPES:
        raise FrameError(f"unknown dtype code {dtype} in frame header")
    if ndim > MAX_NDIM:
        raise FrameError(f"frame has {ndim} dimensions (max {MAX_NDIM})")
    if ndim and not dtype:
        raise FrameError(f"raw frame with {ndim} dimensions")
    if nbytes > max_frame:
        raise FrameError(f"frame of {nbytes} bytes exceeds the maximum frame size {max_frame}")
    if not math.isfinite(deliver_at) or deliver_at < 0:
        raise FrameError("invalid delivery time in frame header")
    return dtype, tag, depth, nbytes, deliver_at, ndim


def _parse_shape(raw, dtype: int, nbytes: int) -> tuple[int, ...]:
    """The shape bytes of a tensor frame, checked against its payload size."""
    shape = struct.unpack(f"!{len(raw) // 8}Q", raw)
    if math.prod(shape) * _ITEMSIZE[dtype] != nbytes:
        raise FrameError(f"frame payload of {nbytes} bytes does not match shape {shape} of {_DTYPES[dtype][0]}")
    return shape


def parse_header(fixed: bytes, max_frame: int = DEFAULT_MAX_FRAME, read_shape=None) -> Header:
    """Validate a header; ``read_shape(n)`` supplies the n shape bytes that follow the fixed part."""
    dtype, tag, depth, nbytes, deliver_at, ndim = _parse_fixed(fixed, max_frame)
    raw = (read_shape(8 * ndim) if read_shape else b"") if ndim else b""
    if len(raw) != 8 * ndim:
        raise FrameError("truncated frame shape")
    shape = _parse_shape(raw, dtype, nbytes) if dtype else ()
    return Header(PROTOCOL_VERSION, dtype, tag, depth, nbytes, deliver_at, shape)


def _payload(obj) -> tuple[int, tuple[int, ...], memoryview]:
    """(dtype code, shape, the payload's bytes as a view: no copy of a contiguous little-endian tensor).
    The view is valid until the caller's tensor changes: ``Channel._write_frame`` copies what it cannot
    put on the wire at once."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return 0, (), memoryview(obj).cast("B")
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"can only send tensors or bytes, not {type(obj).__name__}")
    code = _DTYPE_CODE.get(obj.dtype)
    if code is None:
        raise TypeError(f"unsupported tensor dtype {obj.dtype}")
    arr = obj.detach().cpu().contiguous().numpy().astype(_DTYPES[code][1], copy=False)
    return code, tuple(obj.shape), memoryview(arr.reshape(-1)).cast("B")


# --------------------------------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------------------------------


#: Fault injection for the crash tests (docs/robustness.md): with COMETPI_FAULT_EXIT_AFTER_SENDS=N in its
#: environment, a process dies abruptly (os._exit, no cleanup, like kill -9) right after sending its N-th frame.
FAULT_EXIT_CODE = 86
_fault_lock = threading.Lock()
_fault_left = int(os.environ.get("COMETPI_FAULT_EXIT_AFTER_SENDS", "0") or 0)


def _fault_point() -> None:
    global _fault_left
    with _fault_lock:
        _fault_left -= 1
        if _fault_left == 0:
            os._exit(FAULT_EXIT_CODE)


class Channel:
    """A framed, counted, bidirectional message channel to one peer.

    Subclasses provide ``_write(data)``, ``_read(n)`` (exactly n bytes, a fresh bytearray, or raise) and
    ``_close()``.
    """

    def __init__(self, meter: Meter | None = None, link: str = "peer", *, timeout: float = DEFAULT_TIMEOUT,
                 max_frame: int = DEFAULT_MAX_FRAME, net: NetProfile | None = None, peer_name: str = "peer",
                 deadline: float | None = None, deadline_message: str | None = None):
        self.meter = meter or Meter()
        self.link = link
        self.timeout = timeout
        self.max_frame = max_frame
        self.net = net
        self.peer_name = peer_name
        #: ``deadline``/``deadline_message``: see ``set_deadline`` (given here, it covers a TLS handshake too)
        self._deadline = deadline
        self._deadline_message = deadline_message or f"{peer_name} did not complete the handshake in time"
        self._clock = 0  # Lamport clock: rounds on the critical path so far
        self._rounds_seen = 0
        self._link_free_at = 0.0
        self._send_lock = threading.Lock()

    # -- counting ------------------------------------------------------------------------------
    def _phase(self) -> str:
        return "offline" if self.link == "dealer" else self.meter.phase

    def _tick(self) -> int:
        """Rounds newly on the critical path: max(received depth, sent depth) grew by this much."""
        delta, self._rounds_seen = self._clock - self._rounds_seen, self._clock
        return delta

    # -- sending -------------------------------------------------------------------------------
    def send(self, obj, tag: str) -> None:
        """Send one tensor (int64/float64/uint8) or raw bytes as one frame labelled ``tag``."""
        code, shape, payload = _payload(obj)
        if len(payload) > self.max_frame:
            raise FrameError(f"refusing to send a frame of {len(payload)} bytes (max {self.max_frame})")
        with self._send_lock:
            deliver_at = 0.0
            if self.net is not None:
                now = time.time()
                start = max(now, self._link_free_at)
                self._link_free_at = start + len(payload) / self.net.bandwidth
                time.sleep(max(0.0, self._link_free_at - now))
                deliver_at = self._link_free_at + self.net.delay
            self._clock += 1  # every frame sent is a flight; batch tensors with send_many
            header = encode_header(code, tag_id(tag), self._clock, len(payload), deliver_at, shape)
            phase = self._phase()
            self._write_frame(header, payload)
            self.meter.count(self.link, phase, True, len(payload), len(header), self._tick())
        if _fault_left > 0:
            _fault_point()

    def send_json(self, obj, tag: str) -> None:
        self.send(json.dumps(obj, separators=(",", ":")).encode(), tag)

    def send_many(self, tensors: list[torch.Tensor], tag: str) -> None:
        """Send several int64 tensors as one frame (one message, one round)."""
        self.send(torch.cat([t.reshape(-1) for t in tensors]), tag)

    def _write_frame(self, header: bytes, payload: memoryview) -> None:
        """Put one frame on the link; the payload view must not be kept beyond this call."""
        self._write(header + payload)

    # -- receiving -----------------------------------------------------------------------------
    def recv(self, tag: str | tuple[str, ...], *, shape=None, dtype=None, max_bytes: int | None = None):
        """Receive the next frame, which must carry ``tag`` (or one of several) and, when given,
        ``shape`` and ``dtype``.

        Everything is checked from the header, before the payload is read (see ``MAX_JSON_BYTES``): the
        tag (another one is a ``ProtocolError``; an ``error`` frame, read up to ``MAX_ERROR_BYTES``, a
        ``RemoteError``), the type and shape, and the size: a raw (JSON) message may hold ``max_bytes``
        (default: ``TAG_MAX_BYTES[tag]`` or ``MAX_JSON_BYTES``), a tensor ``max_bytes`` (default
        ``max_frame``; with ``shape`` exactly its size)."""
        code, t, depth, nbytes, deliver_at, ndim = _parse_fixed(self._read(HEADER.size), self.max_frame)
        if (t != tag_id(tag)) if isinstance(tag, str) else (t not in {tag_id(x) for x in tag}):
            self._unexpected(t, tag, code, nbytes)
        if code:  # a tensor
            wrong = dtype is not None and _DTYPE_CODE.get(dtype) != code
            limit = max_bytes
        else:
            wrong = dtype not in (None, "raw") or shape is not None
            limit = TAG_MAX_BYTES.get(_TAG_NAMES.get(t, ""), MAX_JSON_BYTES) if max_bytes is None else max_bytes
        if wrong:
            raise ProtocolError(f"message '{tag_name(t)}' from {self.peer_name} has the wrong type "
                                f"({_DTYPES[code][0]}, expected {'a tensor' if dtype is None else dtype})")
        if limit is not None and nbytes > limit:
            raise FrameError(f"message '{tag_name(t)}' from {self.peer_name} of {nbytes} bytes exceeds its limit "
                             f"of {limit} bytes (max_bytes; defaults: transport.TAG_MAX_BYTES, MAX_JSON_BYTES)")
        off, payload, got = 8 * ndim, None, None
        if (shape is not None and ndim == len(shape) and nbytes <= READ_CHUNK
                and nbytes == math.prod(shape) * _ITEMSIZE[code]):  # the size expected: shape and payload in one read
            payload = self._read(off + nbytes)
            got = _parse_shape(payload[:off], code, nbytes)
        elif code:
            got, off = _parse_shape(self._read(off) if ndim else b"", code, nbytes), 0
        if shape is not None and got != tuple(shape):
            raise ProtocolError(f"message '{tag_name(t)}' from {self.peer_name} has shape {got}, expected "
                                f"{tuple(shape)}")
        if payload is None:  # a shape asked for and met: the receiver expects exactly these bytes
            payload = self._read_payload(nbytes, exact=shape is not None)
        if self.net is not None and deliver_at > 0:
            time.sleep(max(0.0, deliver_at - time.time()))
        self._clock = max(self._clock, depth)
        self.meter.count(self.link, self._phase(), False, nbytes, HEADER.size + 8 * ndim, self._tick())
        if not code:
            return bytes(payload)
        return torch.from_numpy(np.frombuffer(payload, dtype=_DTYPES[code][1], offset=off).reshape(got))

    def _unexpected(self, t: int, tag: str | tuple[str, ...], code: int, nbytes: int):
        """Raise for a frame of an unexpected tag, reading no payload but a bounded ``error`` frame's."""
        tags = (tag,) if isinstance(tag, str) else tuple(tag)
        if t == tag_id(ERROR_TAG) and ERROR_TAG not in tags:
            why = f"(a reason of {nbytes} bytes, over the limit of {MAX_ERROR_BYTES}, not read)"
            if not code and nbytes <= MAX_ERROR_BYTES:
                try:
                    why = json.loads(bytes(self._read_payload(nbytes))).get("error", "?")
                except (ValueError, UnicodeDecodeError, AttributeError):
                    why = "(unreadable reason)"
            raise RemoteError(f"the {self.peer_name} ended the session: {str(why)[:500]}")
        raise ProtocolError(f"expected message '{'/'.join(tags)}' from {self.peer_name}, got '{tag_name(t)}'")

    def _read_payload(self, n: int, exact: bool = False):
        """``n`` bytes into a buffer that starts at ``READ_CHUNK`` and doubles each time it is full, never
        past n: it holds at most twice what arrived (a header that lies about its size costs that much),
        and the bytes are read into it in place (growing by small steps copied a large frame ~8 times).
        ``exact``: the receiver asked for exactly n bytes (a shape it named), so the buffer is made at
        once, uninitialised (a SmolLM2 session's 1.2 GB of masked weights were copied by each doubling)."""
        if n <= READ_CHUNK:
            return self._read(n) if n else bytearray()
        buf, got = (np.empty(n, dtype=np.uint8), 0) if exact else (bytearray(READ_CHUNK), 0)
        while got < n:
            if got == len(buf):
                buf.extend(bytes(min(n, 2 * len(buf)) - len(buf)))
            end = min(len(buf), got + READ_CHUNK)  # a chunk at a time: an error says how much arrived
            view = memoryview(buf)[got:end]
            try:
                self._read_into(view)
            except PeerDisconnected as e:
                raise PeerDisconnected(f"{e} (at {got} of the frame's {n} bytes)") from None
            finally:
                view.release()
            got = end
        return buf

    def _read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly (a channel may read into it in place; by default a copy of ``_read``)."""
        view[:] = self._read(len(view))

    def recv_json(self, tag: str, *, max_bytes: int | None = None):
        """Receive one JSON message (at most ``max_bytes``; default ``TAG_MAX_BYTES[tag]`` or ``MAX_JSON_BYTES``)."""
        raw = self.recv(tag, dtype="raw", max_bytes=max_bytes)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise FrameError(f"message '{tag}' from {self.peer_name} is not valid JSON: {e}") from None

    def recv_many(self, shapes: list[tuple[int, ...]], tag: str) -> list[torch.Tensor]:
        """Receive one frame sent by ``send_many`` and split it into tensors of ``shapes``."""
        sizes = [math.prod(s) for s in shapes]
        flat = self.recv(tag, shape=(sum(sizes),), dtype=torch.int64)
        return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes, strict=True)]

    def exchange_wire(self, tensor: torch.Tensor, tag: str) -> torch.Tensor:
        """Send one tensor and receive the peer's of the same shape and dtype (one round)."""
        self.send(tensor, tag)
        return self.recv(tag, shape=tuple(tensor.shape), dtype=tensor.dtype)

    def exchange(self, tensors: list[torch.Tensor], tag: str) -> list[torch.Tensor]:
        """Both parties send their tensors and receive the peer's (same shapes): one round."""
        self.send_many(tensors, tag)
        return self.recv_many([tuple(t.shape) for t in tensors], tag)

    def send_error(self, error: BaseException | str) -> None:
        """Tell the peer why this side ends the session (best effort: the link may be gone)."""
        try:
            self.send_json({"error": str(error)}, ERROR_TAG)
        except Exception:  # noqa: BLE001
            pass

    @contextmanager
    def waiting(self, seconds: float):
        """Use another receive timeout inside the block (e.g. a server idling between queries)."""
        old = self.timeout
        self._set_timeout(seconds)
        try:
            yield self
        finally:
            self._set_timeout(old)

    def _set_timeout(self, seconds: float) -> None:
        self.timeout = seconds

    def set_deadline(self, at: float | None, message: str = "") -> None:
        """End every read at ``at`` (``time.monotonic()``; None: no deadline) with ``DeadlineExceeded(message)``,
        however steadily the peer trickles bytes: each blocking read waits at most the time left (or
        ``timeout``, the longest silence allowed, when it is shorter).  The server's handshake deadline and
        maximum session length."""
        self._deadline, self._deadline_message = at, message
        self._set_timeout(self.timeout)

    def _wait(self) -> float:
        """Seconds the next blocking read may wait: ``timeout``, or less as the deadline nears."""
        if self._deadline is None:
            return self.timeout
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(0.0)
        return min(left, self.timeout)

    def _timed_out(self, waited: float) -> PeerTimeout:
        """The error for a read that waited ``waited`` seconds in vain (less than ``timeout``: the deadline)."""
        if waited < self.timeout:
            self._set_timeout(self.timeout)  # the socket's own timeout back, e.g. for the error frame that follows
            return DeadlineExceeded(self._deadline_message)
        return PeerTimeout(f"no data from {self.peer_name} within {self.timeout:g} s")

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


_EOF = object()


class MemoryChannel(Channel):
    """In-process twin of ``TcpChannel``: the same frames and counters over a pair of queues."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, **kw):
        super().__init__(**kw)
        self._inbox, self._outbox = inbox, outbox
        self._buf = bytearray()
        self._closed = False

    @classmethod
    def pair(cls, meters=(None, None), **kw) -> tuple[MemoryChannel, MemoryChannel]:
        a, b = queue.Queue(), queue.Queue()
        return cls(a, b, meter=meters[0], **kw), cls(b, a, meter=meters[1], **kw)

    def _write(self, data: bytes) -> None:
        if self._closed:
            raise PeerDisconnected("channel is closed")
        self._outbox.put(bytes(data))

    def _read(self, n: int) -> bytearray:
        while len(self._buf) < n:
            wait = self._wait()
            try:
                item = self._inbox.get(timeout=wait)
            except queue.Empty:
                raise self._timed_out(wait) from None
            if item is _EOF:
                self._inbox.put(_EOF)
                raise PeerDisconnected(f"{self.peer_name} closed the connection")
            self._buf += item
        out = self._buf[:n]
        del self._buf[:n]  # O(1): a bytearray drops its head without moving the rest
        return out

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put(_EOF)


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

