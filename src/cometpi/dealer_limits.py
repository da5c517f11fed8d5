"""What a party can make the dealer spend, and what the dealer keeps per session.

``DealerLimits`` (the bounds, checked before anything is allocated for a request), ``SessionBudget``
(one session's requests, correction bytes and answered indices, ``ServedIndices``) and ``KeptMasks``
(the weight masks kept between requests within a byte bound).  ``dealer.DealerCore`` applies them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .protocols.material import Cost, DealerError


@dataclass(frozen=True)
class DealerLimits:
    """Bounds on what anyone who can connect can make the dealer spend (docs/robustness.md).  A
    request beyond them is refused with a ``DealerError`` naming the bound, before anything is
    allocated for it, and the party's dealer link ends with that error (the other sessions go on)."""

    #: Party links served at once (one thread each); more are refused at once.
    max_connections: int = 64
    #: Seconds from accepting a link to a complete registration (TLS handshake and hello together).
    handshake_timeout: float = 10.0
    #: Bytes of one correction (one frame).
    max_correction_bytes: int = 1 << 30
    #: Bytes the dealer computes with for one request (both parties' parts and the correction).
    max_work_bytes: int = 1 << 33
    #: Multiply-accumulates of one request's product (a BERT-base/128 embedding is 3.0e9, SmolLM2's at 2,048
    #: tokens 5.8e10).
    max_request_macs: int = 1 << 37
    #: Requests answered per session (a SmolLM2 decoding step makes about 2,000).
    max_session_requests: int = 1 << 26
    #: Bytes of corrections sent per session (a BERT-base/128 query with the defaults takes 2.2 GB).
    max_session_bytes: int = 1 << 38
    #: How far a request index may lie beyond the highest one answered, or behind it.
    index_window: int = 1 << 22
    #: Bytes of weight masks the dealer keeps between requests, all sessions together (``KeptMasks``):
    #: a kept mask is not expanded again for every token (SmolLM2's are 1.2 GB, BERT-base's 0.9 GB).
    kept_mask_bytes: int = 1 << 32


class ServedIndices:
    """The request indices of a session the dealer has answered, one bit each, within a sliding
    window: an index must lie within ``window`` of the highest one answered (ahead or behind), so
    the bitmap never covers more than 2 x window indices (1 MiB at the default 2^22) however the
    indices are chosen.  The parties guess a few layers ahead and prefetch one query's plan, never
    millions of requests."""

    CHUNK = 1 << 16  # indices per bitmap chunk (8 KiB)

    def __init__(self, window: int = DealerLimits.index_window):
        self.window = window
        self.chunks: dict[int, bytearray] = {}
        self.top = -1

    def _check(self, idx: int) -> None:
        low, high = max(self.top - self.window, 0), max(self.top, 0) + self.window
        if not low <= idx <= high:
            raise DealerError(f"request index {idx} is outside this session's range ({low}..{high}: "
                              f"within {self.window:,} of the highest index answered)")

    def add(self, idx: int) -> bool:
        """Mark ``idx`` answered; False if it already was."""
        self._check(idx)
        c, off = divmod(idx, self.CHUNK)
        chunk = self.chunks.get(c)
        if chunk is None:
            chunk = self.chunks[c] = bytearray(self.CHUNK // 8)
        byte, bit = divmod(off, 8)
        if chunk[byte] >> bit & 1:
            return False
        chunk[byte] |= 1 << bit
        if idx > self.top:
            self.top = idx
            first = max(self.top - self.window, 0) // self.CHUNK
            for old in [k for k in self.chunks if k < first]:
                del self.chunks[old]
        return True

    def discard(self, idx: int) -> None:
        chunk = self.chunks.get(idx // self.CHUNK)
        if chunk is not None:
            byte, bit = divmod(idx % self.CHUNK, 8)
            chunk[byte] &= ~(1 << bit) & 0xFF

    @property
    def nbytes(self) -> int:
        return len(self.chunks) * self.CHUNK // 8


class SessionBudget:
    """What one session has had from the dealer: answered indices, requests and correction bytes."""

    def __init__(self, limits: DealerLimits):
        self.limits = limits
        self.served = ServedIndices(limits.index_window)
        self.requests = 0
        self.bytes = 0

    def admit(self, session: str, idx: int, kind: str, cost: Cost) -> None:
        """Check one request against the limits and charge it (call with the dealer's lock held)."""
        lim = self.limits
        for what, value, bound in (("correction", cost.corr_bytes, lim.max_correction_bytes),
                                   ("working memory", cost.work_bytes, lim.max_work_bytes)):
            if value > bound:
                raise DealerError(f"request {idx} ({kind}) needs {value:,} bytes of {what}, over this dealer's "
                                  f"limit of {bound:,}")
        if cost.macs > lim.max_request_macs:
            raise DealerError(f"request {idx} ({kind}) needs {cost.macs:,} multiply-accumulates, over this "
                              f"dealer's limit of {lim.max_request_macs:,}")
        if self.requests >= lim.max_session_requests:
            raise DealerError(f"session {session} has had its {lim.max_session_requests:,} requests")
        if self.bytes + cost.corr_bytes > lim.max_session_bytes:
            raise DealerError(f"session {session} would exceed its budget of {lim.max_session_bytes:,} bytes "
                              "of dealer material")
        if not self.served.add(idx):
            raise DealerError(f"request {idx} of session {session} was already answered: an index is used once")
        self.requests += 1
        self.bytes += cost.corr_bytes

    def refund(self, idx: int, cost: Cost) -> None:
        """Nothing was sent for request ``idx`` (it failed): uncharge it."""
        self.served.discard(idx)
        self.requests -= 1
        self.bytes -= cost.corr_bytes


class KeptMasks:
    """The weight masks B the dealer keeps between requests, so that a private product (``mulpriv``,
    one per linear layer per token) does not expand its weight's mask from the server's seed again.

    A mask is a deterministic function of the session's server seed and its request label (which
    names the weight's request index, shape and ring), so keeping it changes no correction: it is
    memoisation, keyed by session and the server's seed with the label (a server that registers
    again gets a new seed, and so new masks).  At most ``max_bytes`` are kept, all sessions together,
    first come first kept (a session that finds the store full expands its masks each time, as
    without it); a session's masks are dropped when it ends."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()
        self._masks: dict[str, dict[bytes, torch.Tensor]] = {}

    def get(self, session: str, key: bytes, make) -> torch.Tensor:
        """The mask under ``key`` (seed and label) of ``session``: kept, or made by ``make()`` (and kept
        if it fits)."""
        with self._lock:
            kept = self._masks.get(session, {}).get(key)
        if kept is not None:
            return kept
        mask = make()
        size = mask.numel() * mask.element_size()
        with self._lock:
            if self.used + size <= self.max_bytes and key not in self._masks.get(session, {}):
                self._masks.setdefault(session, {})[key] = mask
                self.used += size
        return mask

    def drop(self, session: str) -> None:
        with self._lock:
            for m in self._masks.pop(session, {}).values():
                self.used -= m.numel() * m.element_size()
