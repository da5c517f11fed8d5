"""Three arithmetic backends behind one interface, so each approximation is written once.

* ``FloatOps``: torch float tensors (reference and fine-tuning; differentiable).
* ``RingOps``: a fixed-point simulation in Z_2^64 without network: the same encoding, every product
  truncated (floor), Comet's flood drawn from the CSPRNG exactly as the protocol does.  It differs
  from the secure path only by the truncation's dropped borrow (at most 1 ulp per truncation).
* ``ShareOps``: the secure path on additive shares, through ``cometpi.protocols``.

Values are backend-native (tensor, int64 tensor, AShare).  Public constants are plain numbers or
float tensors.  Only the methods below are used by ``approx``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from .. import protocols as P
from ..core import AShare, Role, Session
from ..ring import DTYPE, FixedPoint, random_ring, ring_matmul, uniform01
from .guess import local_quarter_factor


class _Additive:
    """Local linear operations, the same on every backend (tensors and AShares alike)."""

    #: fractional bits of the backend's grid (floats: the grid the protocols would use, for their thresholds)
    frac_bits = 16
    #: a ``newton.DomainMonitor`` recording each call site's range (``bench sites``), or None
    monitor = None
    #: floats only: rsqrt and the reciprocals exact (fine-tuning trains the functions the protocols approximate)
    ideal = False

    def sign_mask(self, a, k):
        """(a, b, a b) with b = [a >= 0] for |a| < 2^k: the sign test and the select (ReLU) together (a is
        returned for the secure backend, which may receive a not yet truncated product)."""
        b = self.sign(a, k)
        return a, b, self.mask(a, b)

    def thermometer(self, a, thresholds, k, weight_sets):
        """For each weight list w: sum_j w_j [a >= t_j] for public thresholds t (``compare_thresholds``
        at width k, then ``weighted_bits``: one comparison serves every weight list)."""
        bits = self.compare_thresholds(a, thresholds, k)
        return [self.weighted_bits(bits, w) for w in weight_sets]

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def neg(self, a):
        return -a

    def sum(self, a, dim, keepdim=False):
        return a.sum(dim, keepdim)

    def cat(self, values, dim):
        """Concatenation (local on every backend)."""
        if isinstance(values[0], AShare):
            return values[0]._wrap(torch.cat([v.data for v in values], dim))
        return torch.cat(values, dim)

    def argmax_onehot(self, a, dim=-1, k=None):
        """0/1 marks of the maximum along ``dim`` (ties: every maximum): [a - max >= 0], with the max
        tree and the test at width k (narrow) or over the full ring."""
        m = self.maximum(a, dim, k=k)
        d = self.sub(a, m)
        return self.drelu(d) if k is None else self.sign(d, k)


class FloatOps(_Additive):
    """Plain float arithmetic; ``dtype`` float64 for analysis, float32 for training.

    ``ideal``: rsqrt (and 2Quad's reciprocal, the pooler's tanh) are computed exactly instead of by
    their guesses and Newton steps: fine-tuning trains the functions the protocols approximate; the
    protocols' own error is measured at evaluation by the plaintext simulation (``ideal`` off).
    """

    name = "float"
    frac_bits = 16  # nominal: the guess scaling mirrors the fixed-point backends

    def __init__(self, dtype=torch.float64, ideal: bool = False):
        self.dtype = dtype
        self.ideal = ideal

    def input(self, x):
        return torch.as_tensor(x, dtype=self.dtype)

    def output(self, v):
        return v

    def add_const(self, a, c):
        return a + torch.as_tensor(c, dtype=a.dtype)

    def mul_const(self, a, c):
        return a * torch.as_tensor(c, dtype=a.dtype)

    def mul(self, a, b, extra: int = 0):
        return a * b * 2.0**-extra if extra else a * b

    def square(self, a, extra: int = 0):
        return a * a * 2.0**-extra if extra else a * a

    def square_and_halve(self, a):
        """(a^2, a/2): on shares both truncations share one round."""
        return a * a, a * 0.5

    def const_like(self, a, c):
        return torch.full_like(a, float(c))

    def scale_pow2(self, a, k):
        return a * 2.0**-k

    def truncate(self, a, k):
        return a * 2.0**-k

    def truncate_keep(self, a, k):
        """(a / 2^k, a handle for one later ``mul_kept`` with a): here a itself."""
        return self.truncate(a, k), a

    def mul_kept(self, a, kept, extra: int = 0):
        return self.mul(a, kept, extra)

    def mul_pending(self, a, b, extra: int = 0):
        """a b where b may be a product the secure backend has not yet truncated (``protocols.Pending``)."""
        return self.mul(a, b, extra)

    def truncate_poly(self, a, k):
        """(a / 2^k, a handle for one later ``poly_kept`` in a): here a itself."""
        return self.truncate(a, k), a

    def poly_kept(self, u, c0, c1, c2, extra, keep=False):
        """c0 / 2^e0 + c1 u / 2^e1 + c2 u^2 / 2^e2 (``protocols.poly_kept``; ``keep``: with a handle for one
        later ``mul_kept`` by a row's statistic, here the value)."""
        e0, e1, e2 = extra
        y = c0 * 2.0**-e0 + c1 * u * 2.0**-e1 + c2 * u * u * 2.0**-e2
        return (y, y) if keep else y

    def square_keep(self, a, extra: int = 0):
        """(a^2, a handle for one later ``mul_kept`` of a by a row's statistic): here a itself."""
        return self.square(a, extra), a

    def mul_pow2(self, a, k):
        return a * 2.0**k

    def mul_many(self, pairs, extra: int = 0):
        return [self.mul(a, b, extra) for a, b in pairs]

    def mask(self, a, m):
        """a * m for a 0/1 mask m broadcastable to a."""
        return a * torch.as_tensor(m).to(a.dtype)

    def span(self, name):
        return nullcontext()

    def flood_guess(self, x, flood: float, bit_trick: bool, scale: int = 0):
        """Comet's guess (times 2^scale) on simulated flooded shares; no gradient flows through it."""
        with torch.no_grad():
            r = flood * (1.0 + uniform01(x.shape))
            g0 = local_quarter_factor(r, bit_trick)
            g1 = local_quarter_factor(x.detach().double() - r, bit_trick)
            return (g0 * g1 * 2.0**scale).to(x.dtype)

    def add_client_value(self, x, v):
        """x + v for a value v that only the client knows (on shares: local, the server adds nothing)."""
        return x + torch.as_tensor(v, dtype=x.dtype)

    def drelu(self, a):
        return (a >= 0).to(a.dtype)

    def sign(self, a, k):
        """[a >= 0] (0/1) for |a| < 2^k ring units (the narrow comparison's range)."""
        return (a.detach() >= 0).to(a.dtype)

    def compare_thresholds(self, a, thresholds, k, table_bytes=None):
        """[a >= t] for public reals t, stacked on a new last axis (0/1)."""
        return (a.detach()[..., None] >= torch.as_tensor(thresholds, dtype=a.dtype)).to(a.dtype)

    def weighted_bits(self, bits, weights):
        """sum_i bits_i w_i over the last axis, for 0/1 bits and public real weights."""
        return (bits * torch.as_tensor(weights, dtype=bits.dtype)).sum(-1)

    def thermometer(self, a, thresholds, k, weight_sets):
        """For each weight list w: sum_j w_j [a >= t_j] over increasing public thresholds t (no gradient
        through the bits).  Here by counting the thresholds passed (the same sums, without the
        (..., t) bit tensor that fine-tuning would otherwise carry)."""
        thr = torch.as_tensor(thresholds, dtype=torch.float64)
        idx = torch.bucketize(a.detach().to(torch.float64), thr, right=True)
        out = []
        for w in weight_sets:
            steps = torch.as_tensor(w, dtype=torch.float64)
            cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
            out.append(cum[idx].to(a.dtype))
        return out

    def relu(self, a):
        return torch.relu(a)

    def maximum(self, a, dim, k=None):
        return a.amax(dim, keepdim=True)

    def select(self, d, a, b):
        """d ? a : b for d in {0, 1} (as from ``drelu``)."""
        return b + d * (a - b)


class RingOps(_Additive):
    """Fixed-point simulation: int64 ring values, products truncated by floor (no network)."""

    name = "ring"

    def __init__(self, fp: FixedPoint | None = None, count_local_odds: bool = False):
        self.fp = fp or FixedPoint(16)
        self.frac_bits = self.fp.frac_bits
        #: with ``count_local_odds``: sum over every truncated element of |v| / 2^64, the expected number
        #: of wrong elements had each truncation been a local shift (``--trunc local``; exact never
        #: fails).  Off by default: it costs a pass over every truncated tensor.
        self.local_trunc_failures = 0.0 if count_local_odds else None

    def shift(self, v, k):
        """v / 2^k by floor, as every truncation of the simulation (counting its local-shift odds
        when asked to)."""
        if self.local_trunc_failures is not None:
            self.local_trunc_failures += float(v.abs().to(torch.float64).sum()) * 2.0**-64
        return v >> k

    def input(self, x):
        return self.fp.encode(x)

    def output(self, v):
        return self.fp.decode(v)

    def _trunc(self, v):
        return self.shift(v, self.fp.frac_bits)

    def add_const(self, a, c):
        return a + self.fp.encode(c)

    def mul_const(self, a, c):
        enc, bits = self.fp.encode_const(c)
        return self.shift(checked_product(a, enc), bits)

    def mul(self, a, b, extra: int = 0):
        return self.shift(checked_product(a, b), self.fp.frac_bits + extra)

    def square(self, a, extra: int = 0):
        return self.shift(checked_product(a, a), self.fp.frac_bits + extra)

    def square_and_halve(self, a):
        return self.square(a), self.shift(a, 1)

    def const_like(self, a, c):
        return torch.full_like(a, int(self.fp.encode(float(c))))

    def scale_pow2(self, a, k):
        return self.shift(a, k)

    def truncate(self, a, k):
        return self.shift(a, k)

    def truncate_keep(self, a, k):
        return self.truncate(a, k), a

    def mul_kept(self, a, kept, extra: int = 0):
        return self.mul(a, kept, extra)

    def mul_pending(self, a, b, extra: int = 0):
        return self.mul(a, b, extra)

    def truncate_poly(self, a, k):
        return self.truncate(a, k), a

    def square_keep(self, a, extra: int = 0):
        return self.square(a, extra), a

    def poly_kept(self, u, c0, c1, c2, extra, keep=False):
        """The three terms summed exactly at 3f + e2 bits, then one floor truncation, as on shares."""
        e0, e1, e2 = extra
        f = self.frac_bits
        t = (c0 << (2 * f + e2 - e0)) + ((c1 * u) << (f + e2 - e1)) + c2 * u * u  # wraps as the ring does
        if t.numel():
            top = lambda v: float(v.abs().max())  # noqa: E731
            _check_headroom(top(c0) * 2.0 ** (2 * f + e2 - e0) + top(c1) * top(u) * 2.0 ** (f + e2 - e1)
                            + top(c2) * top(u) ** 2, lambda: top(c0.double() * 2.0 ** (2 * f + e2 - e0)
                                                             + c1.double() * u.double() * 2.0 ** (f + e2 - e1)
                                                             + c2.double() * u.double() ** 2), "polynomial")
        y = self.shift(t, 2 * f + e2)
        return (y, y) if keep else y

    def mul_pow2(self, a, k):
        return a * (1 << k)

    def mul_many(self, pairs, extra: int = 0):
        return [self.mul(a, b, extra) for a, b in pairs]

    def mask(self, a, m):
        return a * torch.as_tensor(m).to(DTYPE)

    def span(self, name):
        return nullcontext()

    def flood_guess(self, x, flood: float, bit_trick: bool, scale: int = 0):
        r = flood_share(x.shape, flood, self.fp)
        gp = FixedPoint(self.fp.frac_bits + GUESS_EXTRA_BITS)
        g0 = gp.encode(local_quarter_factor(self.fp.decode(r), bit_trick))
        g1 = gp.encode(local_quarter_factor(self.fp.decode(x - r), bit_trick))
        return self.shift(g0 * g1, guess_shift(self.fp, scale))

    def add_client_value(self, x, v):
        return x + self.fp.encode(v)

    def drelu(self, a):
        return (a >= 0).to(DTYPE)

    def sign(self, a, k):
        """As ``protocols.drelu_narrow``, raising ``HeadroomError`` where |a| >= 2^k."""
        return self.compare_thresholds(a, [0.0], k)[..., 0]

    def compare_thresholds(self, a, thresholds, k, table_bytes=None):
        """As ``protocols.compare_many`` (integer 0/1), raising ``HeadroomError`` where some
        |a - t| >= 2^k: the secure comparison would wrap there."""
        thr = self.fp.encode(torch.as_tensor(thresholds, dtype=torch.float64))
        diff = a[..., None] - thr
        top = int(diff.abs().max()) if diff.numel() else 0
        if top >= 1 << k:
            raise HeadroomError(f"a comparison input reaches 2^{math.log2(top):.1f} ring units, "
                                f"beyond its 2^{k} range: the secure comparison would return a wrong bit here")
        return (diff >= 0).to(DTYPE)

    def weighted_bits(self, bits, weights):
        return (bits * self.fp.encode(torch.as_tensor(weights, dtype=torch.float64))).sum(-1)

    def relu(self, a):
        return torch.where(a >= 0, a, torch.zeros_like(a))

    def maximum(self, a, dim, k=None):
        """The max along ``dim`` (kept); with ``k``, as the narrow tree, raising ``HeadroomError`` where
        two values of a row differ by 2^k or more (the narrow comparisons would wrap)."""
        top = a.amax(dim, keepdim=True)
        if k is not None and a.numel():
            spread = int((top - a.amin(dim, keepdim=True)).max())
            if spread >= 1 << k:
                raise HeadroomError(f"values to compare differ by 2^{math.log2(spread):.1f} ring units, beyond the "
                                    f"narrow maximum's 2^{k} range: the secure max would be wrong here")
        return top

    def select(self, d, a, b):
        """d ? a : b for d in {0, 1} (as from ``drelu``)."""
        return b + d * (a - b)


#: The exact truncation (``protocols.trunc_exact``) is correct only for |v| < 2^62 before truncation.
TRUNC_HEADROOM = 1 << 62


class HeadroomError(OverflowError):
    """A value would leave the ring's headroom: the secure path would silently compute garbage here."""


def _check_headroom(bound: float, exact_top, what: str) -> None:
    """Raise ``HeadroomError`` if values before truncation reach 2^62: ``bound`` is a cheap upper
    bound; only when it reaches 2^62 is ``exact_top()`` (the float64 maximum) computed."""
    if bound < TRUNC_HEADROOM:
        return
    top = exact_top()
    if top >= TRUNC_HEADROOM:
        raise HeadroomError(
            f"a fixed-point {what} reaches 2^{math.log2(top):.1f} before truncation, beyond the 2^62 headroom of "
            f"the exact truncation: the secure path would return a wrong value here (an input outside the declared "
            f"domains)")


def checked_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ring_matmul(a, b)``, raising ``HeadroomError`` where an output before truncation could reach
    2^62: a bound max|a| max_j sum_i |b_ij| first, the outputs in float64 only when it is exceeded."""
    if a.numel() and b.numel():
        _check_headroom(float(a.abs().max()) * float(b.abs().to(torch.float64).sum(-2).max()),
                        lambda: float(torch.matmul(a.to(torch.float64), b.to(torch.float64)).abs().max()),
                        "matrix product")
    return ring_matmul(a, b)


def checked_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b in the ring, raising ``HeadroomError`` where the product before truncation reaches 2^62
    (int64 products wrap silently; so would the secure protocol).  A cheap bound first: only when
    max|a| max|b| reaches 2^62 are the products checked one by one, in float64."""
    b = torch.as_tensor(b, dtype=DTYPE)
    if a.numel() and b.numel():
        _check_headroom(float(a.abs().max()) * float(b.abs().max()),
                        lambda: float((a.to(torch.float64) * b.to(torch.float64)).abs().max()), "product")
    return a * b


#: The two local factors g_j ~ |s_j|^(-1/4) are encoded with this many extra fractional bits, so a
#: large flood (g_j ~ 2^-11 at F = 2^45) keeps its precision; their product is shifted back.
GUESS_EXTRA_BITS = 14


def guess_shift(fp: FixedPoint, scale: int) -> int:
    """Truncation after g_0 g_1 so the guess comes out as y0 * 2^scale at f fractional bits."""
    return fp.frac_bits + 2 * GUESS_EXTRA_BITS - scale


def flood_share(shape, flood: float, fp: FixedPoint) -> torch.Tensor:
    """R ~ U[F, 2F) on the fixed-point grid, from the CSPRNG (modulo bias below 2^-16)."""
    f_enc = int(round(flood * fp.scale))
    if not 0 < f_enc < 1 << 62:
        raise OverflowError(f"flood F = {flood:.3g} does not fit the ring at f = {fp.frac_bits}: "
                            f"2F * 2^f must stay below 2^63, so sigma <= {62 - fp.frac_bits} - log2(x_max)")
    (u,) = random_ring(tuple(shape))
    return torch.remainder(u, f_enc) + f_enc


class ShareOps(_Additive):
    """The secure path: values are AShares of ``session``; products are interactive protocols."""

    name = "share"

    def __init__(self, session: Session):
        self.s = session
        self.fp = session.fp
        self.frac_bits = self.fp.frac_bits

    def input(self, x):
        raise TypeError("ShareOps values are created with session.share")

    def output(self, v):
        return v

    def add_const(self, a, c):
        return a + c

    def mul_const(self, a, c):
        return P.mul_public(a, c)

    def mul(self, a, b, extra: int = 0):
        return P.mul(a, b, extra_bits=extra)

    def square(self, a, extra: int = 0):
        return P.square(a, extra_bits=extra)

    def square_and_halve(self, a):
        """(a^2, a/2) with both truncations in one round.  Cost: as ``square`` plus 16 B/element."""
        sq = P.square(a, truncate_result=False)
        return tuple(P.truncate_many([(sq, self.fp.frac_bits), (a, 1)]))

    def const_like(self, a, c):
        return self.s.zeros(a.shape) + float(c)

    def scale_pow2(self, a, k):
        """a / 2^k in the session's truncation mode (exact by default: 1 round, 16 B/element).  Local
        shifts would fail with probability |a|/2^64 per element, which is not negligible at the scale
        of a Transformer (issue 15); call sites fold their halvings into products where they can."""
        return P.truncate(a, k)

    def truncate(self, a, k):
        """a / 2^k in the session's truncation mode."""
        return P.truncate(a, k)

    def truncate_keep(self, a, k):
        """``protocols.truncate_keep``: the truncation whose opening serves one later product with a."""
        return P.truncate_keep(a, k)

    def mul_kept(self, a, kept, extra: int = 0):
        """``protocols.mul_kept`` (``mul_truncated`` for a kept truncation): a times the kept factor, opening
        only a's masked difference."""
        if isinstance(kept, P.KeptTrunc):
            return P.mul_truncated(a, kept, extra_bits=extra)
        return P.mul_kept(a, kept, extra_bits=extra)

    def square_keep(self, a, extra: int = 0):
        """``protocols.square_keep``: a^2 whose opening serves one later product of a by a row's statistic."""
        return P.square_keep(a, (*a.shape[:-1], 1), extra_bits=extra)

    def mul_pending(self, a, b, extra: int = 0):
        """a b; for a ``protocols.Pending`` b, its truncation's opening is b's side of the product
        (``protocols.truncate_for_mul``, ``mul_truncated``): 16 B per element less than truncating first."""
        if isinstance(b, P.Pending):
            _, kept = P.truncate_for_mul(b.z, b.bits)
            return P.mul_truncated(a, kept, extra_bits=extra)
        return P.mul(a, b, extra_bits=extra)

    def truncate_poly(self, a, k):
        """``protocols.truncate_poly``: the truncation whose opening serves one later polynomial in a."""
        return P.truncate_poly(a, k)

    def poly_kept(self, u, c0, c1, c2, extra, keep=False):
        """``protocols.poly_kept``: c0 + c1 u + c2 u^2 in one round of openings and one truncation."""
        return P.poly_kept(u, c0, c1, c2, extra, keep_rows=keep)

    def mul_pow2(self, a, k):
        return a.mul_int(1 << k)

    def mul_many(self, pairs, extra: int = 0):
        return P.mul_many(pairs, extra_bits=extra)

    def mask(self, a, m):
        """a * m for a public 0/1 mask (local), or for a shared integer 0/1 mask (one product,
        no truncation: 1 round, 32 B/element)."""
        if isinstance(m, AShare):
            a, m = P._broadcast(a, m)
            return P.mul(a, m, truncate_result=False)
        return a.mul_int(torch.broadcast_to(torch.as_tensor(m), a.shape).to(DTYPE))

    def span(self, name):
        return self.s.span(name)

    def flood_guess(self, x: AShare, flood: float, bit_trick: bool, scale: int = 0) -> AShare:
        """Flood-reshare x so the client holds R ~ U[F, 2F), compute each party's factor locally,
        and multiply the two private factors (see ``approx.guess``).

        Cost: 2 rounds, 24 B/element (reshare 8 + private product 16), plus one truncation.
        """
        s = self.s
        with s.span("comet_guess"):
            r = flood_share(x.shape, flood, self.fp) if s.role == Role.CLIENT else None
            flooded = P.reshare(x, r)
            gp = FixedPoint(self.fp.frac_bits + GUESS_EXTRA_BITS)
            g = gp.encode(local_quarter_factor(self.fp.decode(flooded.data), bit_trick))
            return P.mul_private_pair(g, s, trunc_bits=guess_shift(self.fp, scale))

    def add_client_value(self, x, v):
        """x + v for a value v the client alone knows: added to the client's own share (local); the
        server, which has no v (None), adds nothing."""
        if not self.s.is_client:
            return x
        return x._wrap(x.data + self.fp.encode(v).to(x.data.device))

    def drelu(self, a):
        return P.drelu(a)

    def sign(self, a, k):
        """``protocols.drelu_narrow``: [a >= 0] for |a| < 2^k."""
        return P.drelu_narrow(a, k)

    def sign_mask(self, a, k):
        """``protocols.drelu_select``: (a, b, a b) in the sign test's rounds; for a ``protocols.Pending``
        product, ``protocols.trunc_select``: its truncation's opening is the sign test's."""
        if isinstance(a, P.Pending):
            return P.trunc_select(a.z, a.bits, k)
        return (a, *P.drelu_select(a, k))

    def compare_thresholds(self, a, thresholds, k, table_bytes=None):
        """``protocols.compare_many`` against the encoded thresholds (its tables within ``table_bytes`` per
        element, default ``protocols.compare.TABLE_BYTES``)."""
        return P.compare_many(a, k, self.fp.encode(torch.as_tensor(thresholds, dtype=torch.float64)),
                              table_bytes or P.compare.TABLE_BYTES)

    def weighted_bits(self, bits, weights):
        """Local: integer 0/1 shares times public encoded weights, summed."""
        enc = self.fp.encode(torch.as_tensor(weights, dtype=torch.float64))
        return bits.mul_int(torch.broadcast_to(enc, bits.shape).contiguous()).sum(-1)

    def relu(self, a):
        return P.relu(a)

    def maximum(self, a, dim, k=None):
        """``protocols.maximum``; with ``k``, by narrow comparisons (values of a row within 2^k)."""
        return P.maximum(a, dim, k=k)

    def select(self, d, a, b):
        """d ? a : b with d an integer 0/1 share: one product, no truncation (1 round, 32 B)."""
        return b + P.mul(d, a - b, truncate_result=False)

