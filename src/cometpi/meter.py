"""Always-on counters of one party: payload and header bytes, messages and rounds per (link, phase),
nested named spans with their wall time (``Meter``), and ``Traffic``, one link's counters in one
phase.  Every channel counts into a ``Meter``; spans are what the cost breakdowns and the protocols'
tested ``Cost:`` lines read."""

from __future__ import annotations

import operator
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields


@dataclass
class Traffic:
    """Traffic of one party on one link in one phase. ``*_bytes`` are payload bytes; headers apart."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    header_bytes_sent: int = 0
    header_bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0
    rounds: int = 0

    def __add__(self, o: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f) + getattr(o, f) for f in _TRAFFIC_FIELDS))

    def __sub__(self, o: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f) - getattr(o, f) for f in _TRAFFIC_FIELDS))

    def copy(self) -> Traffic:
        return Traffic(*(getattr(self, f) for f in _TRAFFIC_FIELDS))

    @property
    def payload_bytes(self) -> int:
        return self.bytes_sent + self.bytes_recv

    @property
    def wire_bytes(self) -> int:
        return self.payload_bytes + self.header_bytes_sent + self.header_bytes_recv

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in _TRAFFIC_FIELDS}


_TRAFFIC_FIELDS = tuple(f.name for f in fields(Traffic))  # spans add and subtract these on every protocol call
PHASES = ("online", "offline")
LINKS = ("peer", "dealer")


class Meter:
    """Always-on counters of one party: traffic per (link, phase), nested named spans, wall time.

    Traffic on the dealer link is always offline.  Peer traffic is online unless sent inside
    ``with meter.offline():`` (e.g. the server's masked weights, which depend only on the model).

    The counters are one flat list of ints (``_KEYS`` x ``_TRAFFIC_FIELDS``): a span, entered about
    10,000 times per SmolLM2 token, copies it twice and adds the difference with ``map``, and
    ``Traffic`` objects are made only when asked for (``snapshot``, ``total``, ``report``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._c = [0] * (len(_KEYS) * _NF)
        self.spans: dict[str, dict] = {}
        self._stack: list[str] = []

    @property
    def phase(self) -> str:
        return getattr(self._local, "phase", "online")

    @contextmanager
    def offline(self):
        prev = self.phase
        self._local.phase = "offline"
        try:
            yield
        finally:
            self._local.phase = prev

    def count(self, link: str, phase: str, sent: bool, payload: int, header: int, rounds: int) -> None:
        """One frame sent (or received): its payload and header bytes, one message, the rounds it ends."""
        base, o = _BASE[(link, phase)], 0 if sent else 1  # fields: bytes, header bytes, msgs (sent, recv), rounds
        with self._lock:
            c = self._c
            c[base + o] += payload
            c[base + 2 + o] += header
            c[base + 4 + o] += 1
            c[base + 6] += rounds

    def total(self, phase: str | None = None, link: str | None = None) -> Traffic:
        out = Traffic()
        for (l, p), t in self.snapshot().items():
            if (phase is None or p == phase) and (link is None or l == link):
                out = out + t
        return out

    def snapshot(self) -> dict[tuple[str, str], Traffic]:
        with self._lock:
            c = self._c.copy()
        return {k: Traffic(*c[i * _NF:(i + 1) * _NF]) for i, k in enumerate(_KEYS)}

    @contextmanager
    def span(self, name: str):
        """Attribute the traffic and time of the block to ``name`` (nested spans join with '/')."""
        self._stack.append(name)
        path = "/".join(self._stack)
        before, t0 = self._c.copy(), time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            after = self._c.copy()
            self._stack.pop()
            rec = self.spans.get(path)
            if rec is None:
                rec = self.spans[path] = {"calls": 0, "seconds": 0.0, "counts": [0] * len(after)}
            rec["calls"] += 1
            rec["seconds"] += dt
            rec["counts"] = list(map(operator.add, rec["counts"], map(operator.sub, after, before)))

    def report(self) -> dict:
        """Totals and spans as plain JSON-able dicts."""
        out = {p: self.total(p).as_dict() for p in PHASES}
        out["by_link"] = {f"{l}/{p}": t.as_dict() for (l, p), t in self.snapshot().items()}
        out["spans"] = {k: {"calls": v["calls"], "seconds": v["seconds"], **_by_phase(v["counts"])}
                        for k, v in self.spans.items()}
        return out


_KEYS = tuple((l, p) for l in LINKS for p in PHASES)
_NF = len(_TRAFFIC_FIELDS)
_BASE = {k: i * _NF for i, k in enumerate(_KEYS)}


def _by_phase(counts: list[int]) -> dict:
    """A span's flat counters as one ``Traffic`` dict per phase (the links added)."""
    out = {}
    for phase in PHASES:
        t = Traffic()
        for (_link, p), base in _BASE.items():
            if p == phase:
                t = t + Traffic(*counts[base:base + _NF])
        out[phase] = t.as_dict()
    return out
