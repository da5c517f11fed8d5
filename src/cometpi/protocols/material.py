"""Correlated randomness kinds: the interface each protocol's dealer material implements, and helpers.

A kind (one class per kind, defined beside the protocol that consumes it, registered in that module's
``KINDS``) has ``receiver`` (the party that gets the dealer's correction, or None) and three methods:
``own(role, prg, stream, p)`` (a party's seed-derived part of a request, drawn from keystream ``stream``:
the request's ``ring.request_label`` (index, kind, parameters), so a party's material is bound to the
request it was made for), ``correct(own0, own1, p)``
(the dealer's correction, from both parties' parts) and ``finish(role, own, corr, p)`` (the party's final
material); optionally ``own_party`` when a party needs less of its own part than the dealer does.
``cometpi.dealer`` serves and fetches them (see its docstring for the protocol).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

#: Elements of any one tensor of a request: a static sanity bound; the dealer's configurable limits
#: (``dealer.DealerLimits``) apply to each request's ``Cost``.
MAX_REQUEST_ELEMENTS = 1 << 28


class Cost(NamedTuple):
    """What answering a request costs the dealer, from its parameters alone (checked before any
    allocation): the correction's bytes on the wire, the bytes of the tensors it computes with
    (both parties' parts and the correction) and the multiply-accumulates of its products."""

    corr_bytes: int
    work_bytes: int
    macs: int = 0


def elementwise_cost(n: int, client_words: int, server_words: int, corr_words: int) -> Cost:
    """The cost of an element-wise kind of n elements: each party's part and the correction in
    8-byte words per element."""
    return Cost(8 * corr_words * n, 8 * (client_words + server_words + corr_words) * n)


class DealerError(RuntimeError):
    """The dealer refused a request or could not be reached."""


def _shape(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in x) or len(x) > 8:
        raise DealerError(f"invalid shape for {what}: {x!r}")
    if math.prod(x) > MAX_REQUEST_ELEMENTS:
        raise DealerError(f"request for {what} of shape {tuple(x)} exceeds {MAX_REQUEST_ELEMENTS} elements")
    return tuple(x)


def _broadcast_to(x, y, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes x and y (request parameters) where y broadcasts to x, or a ``DealerError`` naming the kind."""
    x, y = _shape(x, f"{kind} x"), _shape(y, f"{kind} y")
    try:
        ok = torch.broadcast_shapes(x, y) == torch.Size(x)
    except RuntimeError:
        ok = False
    if not ok:
        raise DealerError(f"{kind}: shape {list(y)} does not broadcast to {list(x)}")
    return x, y


def _mm_shape(a, b) -> tuple[int, ...]:
    try:
        return tuple(torch.matmul(torch.empty(a, device="meta"), torch.empty(b, device="meta")).shape)
    except RuntimeError as e:
        raise DealerError(f"matmul shapes {a} and {b} do not match: {e}") from None


def _bits(prg, stream, *shapes):
    """Uniform bit tensors (uint8 0/1) from keystream ``stream``."""
    sizes = [math.prod(s) for s in shapes]
    raw = np.unpackbits(np.frombuffer(prg.bytes(stream, (sum(sizes) + 7) // 8), dtype=np.uint8))
    out, off = [], 0
    for shape, n in zip(shapes, sizes, strict=True):
        out.append(torch.from_numpy(raw[off : off + n].copy()).reshape(shape))
        off += n
    return out


def _bits_param(p) -> int:
    bits = int(p.get("bits", 64))
    if bits not in (32, 64):
        raise DealerError(f"ring size must be 32 or 64 bits, got {bits}")
    return bits
