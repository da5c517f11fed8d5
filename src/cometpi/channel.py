"""The framed, counted channel to one peer (``Channel``) and its in-process twin (``MemoryChannel``).

``Channel`` puts frames (``frames``) on a link and checks what comes back: the tag, type, shape and size
of every message from its header, before the payload is read; the receive timeout and a total deadline.
It counts rounds with a Lamport clock: a send advances the sender's clock by one and stamps the frame, a
receive sets the clock to max(own, frame's).  So a simultaneous exchange is one round, a ping-pong two,
and each further frame a party sends before hearing back is one more (batch tensors into one frame with
``send_many``).  Network emulation (``NetProfile``) delays sends by bandwidth and one-way delay.
Subclasses (``transport.TcpChannel``, ``tls.TlsChannel``, ``MemoryChannel``) move the bytes.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .frames import (
    _DTYPE_CODE,
    _DTYPES,
    _ITEMSIZE,
    _TAG_NAMES,
    DEFAULT_MAX_FRAME,
    ERROR_TAG,
    HEADER,
    DeadlineExceeded,
    FrameError,
    PeerDisconnected,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    _parse_fixed,
    _parse_shape,
    _payload,
    encode_header,
    tag_id,
    tag_name,
)
from .meter import Meter

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
