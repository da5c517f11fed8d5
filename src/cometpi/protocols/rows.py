"""Shared tensors that grow by rows and are masked once: a decoder's cached keys and values.

A Beaver product opens both factors' masked differences.  When one factor is a KV cache, which every
decoding step multiplies again with one row more, opening it anew each step re-sends the whole cache
(at context 64 in SmolLM2, 13 MB of a 43 MB step).  Here each cached row is masked once, by a row of a
mask M from the dealer (kind ``kvmask``: both parties' shares of M drawn from their own seeds, no
correction), and its masked difference D = Y - M is opened once, when the row joins the cache; every
later product with the cache opens only the other factor's difference E = X - A, with a fresh A and
a fresh C = A @ M from the dealer (kind ``kvmm``).  This is the same reuse as the server's masked
weights (``linear.prepare_weight``), for a tensor that is shared instead of private, and as the
matrix triples with a fixed operand of SecureML: D is opened once per row, E is fresh at every product,
so the views of either party stay uniform.
"""

from __future__ import annotations

import math

import torch

from ..core import AShare, Role, Session
from ..ring import request_label, ring_matmul
from .arith import _same_session, truncate
from .material import Cost, DealerError, _mm_shape, _shape

#: Mask blocks one cache may span (the first holds ``capacity`` rows; a cache that outgrows its blocks
#: takes one as large as all of them together, or as its new rows if more: at most log2 of the length).
MAX_BLOCKS = 64


class MaskedRows:
    """A shared (B, h, S, d) tensor growing along S (positions), each row masked once.

    ``append(x)`` adds rows (B, h, T, d); their masked differences travel with the next product's
    opening (``matmul_rows``), so the cache costs no round of its own.  The mask comes in blocks of
    ``capacity`` rows (one ``kvmask`` request each, laid out position-major so the first n rows of a
    block are the first n rows of its keystream); this party keeps its share of each block and the
    opened D of every row, and nothing else: its share of the cache is M_p + [p = 0] D."""

    def __init__(self, session: Session, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.session, self.capacity = session, capacity
        self.row_shape: tuple | None = None  # (B, h, d)
        self.blocks: list[tuple[int, int]] = []  # (kvmask request index, rows)
        self.mask: torch.Tensor | None = None  # (B, h, rows of every block, d): this party's share of M
        self.opened: torch.Tensor | None = None  # (B, h, S, d): D of the rows opened so far
        self.new: list[torch.Tensor] = []  # this party's shares of rows appended, not yet opened

    @property
    def length(self) -> int:
        return (0 if self.opened is None else self.opened.shape[2]) + sum(t.shape[2] for t in self.new)

    def append(self, x: AShare) -> MaskedRows:
        """Add the rows of x (B, h, T, d) at the end (their mask rows requested here if not yet)."""
        s = _same_session(x)
        if s is not self.session:
            raise ValueError("the rows belong to another session")
        B, h, T, d = x.shape
        if self.row_shape is None:
            self.row_shape = (B, h, d)
        elif (B, h, d) != self.row_shape:
            raise ValueError(f"rows of shape {(B, h, d)} do not extend a cache of rows {self.row_shape}")
        need = self.length + T - sum(n for _, n in self.blocks)
        if need > 0:
            if len(self.blocks) >= MAX_BLOCKS:
                raise ValueError(f"a cache spans at most {MAX_BLOCKS} mask blocks")
            rows = max(self.capacity, need, sum(n for _, n in self.blocks))
            m = s.provider.get("kvmask", shape=[rows, B, h, d])  # position-major: a prefix is the first rows
            self.blocks.append((s.provider.index - 1, rows))
            m = m.permute(1, 2, 0, 3)
            self.mask = m if self.mask is None else torch.cat([self.mask, m], 2)
        self.new.append(x.data)
        return self

    def parts(self) -> list[list[int]]:
        return [[i, n] for i, n in self.blocks]

    def nbytes(self) -> int:
        """This party's memory for the rows: the opened rows and its mask share (8 B per element each)."""
        return 8 * sum(t.numel() for t in (self.mask, self.opened, *self.new) if t is not None)


def matmul_rows(x: AShare, rows: MaskedRows, *, transpose: bool = False, truncate_result: bool = True) -> AShare:
    """x @ Y (``transpose``: x @ Y^T) for a shared x and the cached rows Y (B, h, S, d): a Beaver product
    whose Y-side is opened once per row (``MaskedRows``).

    1. Dealer (``kvmm``): fresh [A] (x's shape) and [C] = A @ op(M), M the rows' mask.
    2. Open E = x - A, and D = Y - M of the rows appended since the last product, together.
    3. [Z] = [C] + E @ op([M]) + [A] @ op(D) + E @ op(D) (party 0).  4. Truncate by f.
    Cost: 1 round, 16 B x (|x| + the new rows' elements) (plus truncation of |Z|); against ``matmul``'s
    16 B x (|x| + |Y|).  Offline: 8 B x |Z| dealer -> server.
    Ref: SecureML (S&P 2017) matrix triples with a fixed operand; ``linear.prepare_weight``.
    """
    s = _same_session(x)
    if rows.session is not s or rows.row_shape is None:
        raise ValueError("matmul_rows needs rows of this session with at least one row appended")
    with s.span("matmul"):
        A, C = s.provider.get("kvmm", a=list(x.shape), row=list(rows.row_shape), parts=rows.parts(),
                              rows=rows.length, t=int(transpose))
        S0 = 0 if rows.opened is None else rows.opened.shape[2]
        new = torch.cat(rows.new, 2) if rows.new else rows.mask[:, :, :0]
        mine = [x.data - A, new - rows.mask[:, :, S0:rows.length]]
        theirs = s.peer.exchange(mine, "beaver-rows")
        E = theirs[0] + mine[0]
        D_new = theirs[1] + mine[1]
        rows.opened = D_new if rows.opened is None else torch.cat([rows.opened, D_new], 2)
        rows.new = []
        D, M = rows.opened, rows.mask[:, :, :rows.length]
        if transpose:
            D, M = D.transpose(-2, -1), M.transpose(-2, -1)
        z = C + ring_matmul(E, M) + ring_matmul(A, D)
        if s.role == Role.CLIENT:
            z = z + ring_matmul(E, D)
        out = x._wrap(z)
        return truncate(out) if truncate_result else out


class _RowMask:
    """A cache's mask block M (rows, B, h, d), position-major: each party's share from its own seed,
    no correction (no party learns M)."""

    receiver = None

    def own(self, role, prg, stream, p):
        return prg.ring(stream, _shape(p["shape"], "kvmask"))

    def cost(self, p) -> Cost:  # pragma: no cover - never requested from the dealer
        return Cost(0, 0)

    def correct(self, own0, own1, p):  # pragma: no cover - never requested from the dealer
        raise DealerError("kvmask needs no correction")

    def finish(self, role, own, corr, p):
        return own[0]


class _RowsMatmul:
    """``matmul_rows``'s material: client A0, C0; server A1 and the correction C1, with C0 + C1 = A @ op(M)
    for the first ``rows`` rows of the mask blocks ``parts`` ([kvmask request index, rows] each: the
    mask is drawn again under each block's own request label, so a request naming another index, kind
    or shape meets randomness no cache uses)."""

    receiver = Role.SERVER

    @staticmethod
    def _shapes(p):
        a, row = _shape(p["a"], "kvmm a"), _shape(p["row"], "kvmm row")
        parts, n, t = p["parts"], p["rows"], p["t"]
        if len(row) != 3 or len(a) != 4:
            raise DealerError(f"kvmm needs a (B, h, n, k) and rows (B, h, d), got {list(a)} and {list(row)}")
        if (not isinstance(parts, list) or not 0 < len(parts) <= MAX_BLOCKS
                or not all(isinstance(q, list) and len(q) == 2 and all(type(v) is int and v >= 0 for v in q)
                           and q[1] > 0 for q in parts)):
            raise DealerError(f"kvmm parts must be 1..{MAX_BLOCKS} [request index, rows > 0] pairs, got "
                              f"{parts!r:.100}")
        total = sum(q[1] for q in parts)
        if type(n) is not int or not 0 < n <= total or t not in (0, 1):
            raise DealerError(f"kvmm rows must be 1..{total} and t 0 or 1, got rows {n!r}, t {t!r}")
        B, h, d = row
        y = (B, h, d, n) if t else (B, h, n, d)
        _shape([total, B, h, d], "kvmm mask")
        return a, row, parts, n, t, _mm_shape(a, y)

    @staticmethod
    def mask(prg, row, parts, n) -> torch.Tensor:
        """One party's share of the first n rows of the mask, (B, h, n, d)."""
        out, left = [], n
        for idx, rows in parts:
            if left <= 0:
                break
            take = min(rows, left)
            label = request_label(idx, "kvmask", {"shape": [rows, *row]})
            out.append(prg.ring(label, (take, *row))[0])  # the first rows of the block's keystream
            left -= take
        return torch.cat(out, 0).permute(1, 2, 0, 3)

    def own(self, role, prg, stream, p):
        _, row, parts, n, _, _ = self._shapes(p)
        mine = self.own_party(role, prg, stream, p)
        return [*mine, self.mask(prg, row, parts, n)]

    def own_party(self, role, prg, stream, p):
        """A party's own part: it keeps its share of the mask from the ``kvmask`` requests."""
        a, _, _, _, _, c = self._shapes(p)
        return prg.ring(stream, a, c) if role == Role.CLIENT else prg.ring(stream, a)

    def cost(self, p) -> Cost:
        a, row, _, n, _, c = self._shapes(p)
        nc, nm = math.prod(c), n * math.prod(row)
        return Cost(8 * nc, 8 * (3 * math.prod(a) + 2 * nm + 2 * nc), nc * a[-1])

    def correct(self, own0, own1, p):
        (a0, c0, m0), (a1, m1) = own0, own1
        m = m0 + m1
        return ring_matmul(a0 + a1, m.transpose(-2, -1) if p["t"] else m) - c0

    def finish(self, role, own, corr, p):
        return tuple(own) if role == Role.CLIENT else (own[0], corr)


KINDS = {"kvmask": _RowMask(), "kvmm": _RowsMatmul()}
