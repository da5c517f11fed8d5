"""The narrow comparison (``protocols.compare_many``, ``drelu_narrow``) and the secure informative
rsqrt guess built on it (``thermometer``): against plaintext over their domains, their Cost lines
against the counters, out-of-range behaviour, and what a party receives.

Tolerances: rsqrt |y - ref| <= 1.1e-3 |ref| + 64 ulp (ulp = 2^-16), as the other guesses."""

import math

import numpy as np
import pytest
import torch

from cometpi import protocols as P
from cometpi.approx import FloatOps, RingOps, ShareOps, rsqrt, smu
from cometpi.approx.backends import HeadroomError
from cometpi.approx.guess import newton_t
from cometpi.approx.sites import DOMAINS, SMU_MU, site_spec
from cometpi.core import Role
from cometpi.party import run_local
from cometpi.transport import Traffic

ULP = 2.0**-16


def _online(s, fn):
    before = s.meter.snapshot()
    out = fn()
    after = s.meter.snapshot()
    return out, sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())


def _compare(x: torch.Tensor, k: int, thresholds):
    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape, encoded=True)
        out, on = _online(s, lambda: P.compare_many(xs, k, thresholds))
        return s.open(out), on

    return run_local(job)[0]


def _chunks(k: int) -> int:
    return P.cmp_chunks(k, P.chunk_bits(k))


def _ands(k: int) -> int:
    return P.tree_ands(_chunks(k))


def tree_padding(chunks: int) -> int:
    """Most bytes the AND tree's packing adds over 4 bits per AND: each level of h pairs sends its packed
    rows (2h - 1 of each AND operand) each rounded up to whole bytes, each way."""
    rows, c = 0, chunks
    while c > 1:
        rows += 2 * (2 * (c // 2) - 1)
        c = c // 2 + c % 2
    return 2 * rows


def test_tree_padding_counts_the_rows():
    assert tree_padding(1) == 0 and tree_padding(2) == 4 and tree_padding(7) == 2 * (10 + 6 + 2)


def test_the_tree_and_the_chunk_widths_are_as_documented():
    """ANDs of the lt-only tree (the lowest node of each level skips eq) and the default chunk widths."""
    assert [P.tree_ands(c) for c in (1, 2, 3, 4, 5, 7, 64)] == [0, 1, 2, 4, 5, 9, 120]
    assert {k: (P.chunk_bits(k), _chunks(k)) for k in (3, 8, 12, 20, 24, 28, 29, 61)} == {
        3: (3, 1), 8: (8, 1), 12: (6, 2), 20: (7, 3), 24: (8, 3), 28: (7, 4), 29: (8, 4), 61: (6, 11)}
    assert P.chunk_bits(33, P.compare.ROW_TABLE_BYTES) == 11
    for k in range(1, 62):  # the tables fit the budget and cover the k low bits
        m = P.chunk_bits(k)
        assert P.compare.MIN_CHUNK <= m <= P.compare.MAX_CHUNK
        assert P.cmp_chunks(k, m) * P.compare.table_bytes(m) <= P.compare.TABLE_BYTES


@pytest.mark.parametrize("k", [3, 5, 12, 24, 25, 27, 30, 31, 32, 40, 61])
def test_compare_many_is_exact_over_its_domain(k):
    top = (1 << k) - 1
    thr = torch.tensor([0, 1, -1, top // 3, -(top // 5)])
    # edges: |x - t| up to 2^k - 1 for every threshold
    x = torch.cat([torch.tensor([0, 1, -1, top // 3, top // 3 - 1, -(top // 5), -(top // 5) - 1]),
                   torch.linspace(-(top // 2), top // 2, 200).round().to(torch.int64)])
    x = x[((x[:, None] - thr[None]).abs() <= top).all(1)]
    got, _ = _compare(x, k, thr)
    assert torch.equal(got, (x[:, None] >= thr[None]).to(torch.int64))


def test_drelu_narrow_meets_its_cost_line():
    """k = 24: 4 rounds, 8 B opening + 2 ANDs (8 bits) + 2 bits b2a = 9.25 B/element."""
    x = torch.arange(-4000, 4000, 3, dtype=torch.int64) * 1000
    n = x.numel()

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape, encoded=True)
        out, on = _online(s, lambda: P.drelu_narrow(xs, 24))
        return s.open(out), on

    d, on = run_local(job)[0]
    assert torch.equal(d, (x >= 0).to(torch.int64))
    assert "4 rounds, 8 B + 2 ANDs (8 bits) + 2 bits = 9.25 B/element" in " ".join(P.drelu_narrow.__doc__.split())
    assert on.rounds == 4 == P.compare_rounds(24) and P.compare_bytes(24, 1) == 9.25
    packing = tree_padding(3) + 2  # packed rows of the AND tree and the b2a message round up to bytes
    assert n * 9.25 <= on.payload_bytes <= n * 9.25 + packing


@pytest.mark.parametrize("k,t", [(12, 1), (24, 3), (33, 5), (61, 2)])
def test_compare_many_cost_line(k, t):
    """2 + ceil(log2 C) rounds; 2 x 4 B opening (8 B above 32 bits), per threshold ``tree_ands(C)`` ANDs of
    4 bits and 2 bits of b2a."""
    x = torch.arange(-300, 300, dtype=torch.int64)
    n, c = x.numel(), _chunks(k)
    _, on = _compare(x, k, list(range(t)))
    assert on.rounds == 2 + math.ceil(math.log2(c)) == P.compare_rounds(k)
    bits = n * t * (4 * _ands(k) + 2)
    opening = n * (8 if k + 1 <= 32 else 16)
    assert opening + bits / 8 <= on.payload_bytes <= opening + bits / 8 + tree_padding(c) + 2
    assert opening + bits / 8 == n * P.compare_bytes(k, t)


def test_out_of_range_wraps_as_documented_and_the_simulation_raises():
    """|x - t| >= 2^k: the bit is that of x - t + 2^k reduced mod 2^(k+1): wrong, and predictable."""
    k = 10
    x = torch.tensor([1 << 10, 3000, -(1 << 10) - 1, -3000], dtype=torch.int64)
    got, _ = _compare(x, k, [0])
    wrapped = (((x + (1 << k)) % (1 << (k + 1))) >= (1 << k)).to(torch.int64)
    assert torch.equal(got[:, 0], wrapped)
    assert not torch.equal(got[:, 0], (x >= 0).to(torch.int64))
    ops = RingOps()
    with pytest.raises(HeadroomError, match="comparison"):
        ops.compare_thresholds(x, [0.0], k)


def server_messages(body, x: torch.Tensor, *, encoded: bool = False) -> list[torch.Tensor]:
    """Every tensor the server receives (``recv`` and the narrow openings' ``exchange_wire``) while both
    parties run ``body(session, shares of x)``, x owned by the client."""
    got = []

    def job(s):
        if s.role == Role.SERVER:
            recv, ex = s.peer.recv, s.peer.exchange_wire

            def rec(*a, **kw):
                out = recv(*a, **kw)
                got.append(out.reshape(-1).clone())
                return out

            def rec_wire(t, tag):
                out = ex(t, tag)
                got.append(out.reshape(-1).clone())
                return out

            s.peer.recv, s.peer.exchange_wire = rec, rec_wire
        body(s, s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape, encoded=encoded))

    run_local(job)
    return got


def assert_same_views(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Message by message, the low-byte histograms (and the top byte: of the ring for int64 messages, within
    their ring for int32 narrow openings) of two views pass a chi-square homogeneity test at about 1e-6."""
    assert len(a) == len(b)
    for ta, tb in zip(a, b, strict=True):
        ha = torch.bincount((ta.to(torch.int64) & 0xFF), minlength=256).double()
        hb = torch.bincount((tb.to(torch.int64) & 0xFF), minlength=256).double()
        if ta.dtype == torch.int64:  # a full-ring opening: its top byte too
            ha = torch.cat([ha, torch.bincount((ta >> 56) & 0xFF, minlength=256).double()])
            hb = torch.cat([hb, torch.bincount((tb >> 56) & 0xFF, minlength=256).double()])
        if ta.dtype == torch.int32:  # a narrow opening: its top byte too
            top = max(int(ta.max()), int(tb.max())).bit_length() - 8
            ha = torch.cat([ha, torch.bincount((ta.to(torch.int64) >> top) & 0xFF, minlength=256).double()])
            hb = torch.cat([hb, torch.bincount((tb.to(torch.int64) >> top) & 0xFF, minlength=256).double()])
        keep = (ha + hb) > 0
        ea = (ha + hb)[keep] / 2
        stat = float((((ha[keep] - ea) ** 2 + (hb[keep] - ea) ** 2) / ea).sum())
        dof = max(1, int(keep.sum()) - 1)
        limit = dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3
        assert stat < limit, (ta.dtype, stat, limit)


def test_what_the_server_receives_does_not_depend_on_x():
    """The opening is uniform modulo 2^n and the AND/b2a openings are masked by fresh triples: the
    server's bytes for x = 0 and for x spread over the domain have the same distribution."""
    n = 20_000

    def body(s, xs):
        P.compare_many(xs, 24, [0, 1 << 20])

    a = server_messages(body, torch.zeros(n, dtype=torch.int64), encoded=True)
    b = server_messages(body, torch.linspace(-(2**22), 2**22, n).to(torch.int64), encoded=True)
    assert len(a) == len(b) >= 3
    assert_same_views(a, b)


# --------------------------------------------------------------------------------------------------
# The thermometer guess
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_octave,steps", [(4, 2), (1, 3), (64, 1)])
@pytest.mark.parametrize("site", sorted(DOMAINS))
def test_thermometer_rsqrt_over_each_site_domain(site, per_octave, steps):
    """Four thresholds per octave (the default) save a Newton step (6 rounds) over one per octave, and
    end closer: the derived bound after 2 steps from 2^(+-1/16) is 1.3e-5, after 3 from 2^(+-1/4) 4.4e-5."""
    spec = site_spec(site, guess="thermometer").with_(per_octave=per_octave)
    if site in ("layernorm_var", "rmsnorm_ms"):  # as layernorm() / rmsnorm() call it: on values scaled by 2^8
        spec = spec.with_(lo=spec.lo * 256, hi=spec.hi * 256, unit=256.0)
    assert spec.n_iterations() == steps and spec.describe()["sigma"] is None
    bound = 1 - min(float(t) for t in newton_t(np.array(spec.t0_bounds()), steps))
    assert bound < 5e-5
    x = torch.logspace(math.log10(spec.lo), math.log10(spec.hi), 300, dtype=torch.float64)
    x = torch.round(x / ULP) * ULP  # on the grid: the error below is the method's and the rounding's, not x's
    ref = x.rsqrt()
    ops = RingOps()
    # the method's error (float backend: exactly the derived bound) plus the fixed-point rounding of its
    # products on the ring: up to 97 ulp measured where y = 1/sqrt(0.005) = 14 (softmax_relu), with 2 or 3 steps
    assert ((rsqrt(FloatOps(), x, spec) - ref).abs() <= bound * ref + 2 * ULP).all()
    tol = bound * ref + 128 * ULP
    assert ((ops.output(rsqrt(ops, ops.input(x), spec)) - ref).abs() <= tol).all()

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
        y, on = _online(s, lambda: rsqrt(ShareOps(s), xs, spec))
        return s.reveal_float(y, Role.CLIENT), on

    y, on = run_local(job)[0]
    assert ((y - ref).abs() <= tol).all()
    thresholds, _, _, k = spec.thermometer()
    assert len(thresholds) == per_octave * (spec.octaves()[1] + 1 - spec.octaves()[0]) - 1
    c = P.cmp_chunks(k, P.chunk_bits(k, spec.table_bytes))
    assert on.rounds == (2 + math.ceil(math.log2(c))) + 6 * steps == P.compare_rounds(k, spec.table_bytes) + 6 * steps
    guess_bytes = (8 if k < 32 else 16) + len(thresholds) * (4 * P.tree_ands(c) + 2) / 8
    # packed rows round up to whole bytes: a few bytes per message
    assert 0 <= on.payload_bytes / x.numel() - (guess_bytes + steps * 144) <= 8 * on.msgs_sent / x.numel()


def test_thermometer_guess_beyond_the_domain():
    """Below lo the guess undershoots (still converging, with more error); up to 2^(e_max+1) it is as
    good as inside; beyond, the comparisons wrap: the simulation raises."""
    spec = site_spec("smu", guess="thermometer")
    top = spec.headroom_max()
    x = torch.tensor([spec.hi * 1.5, top * 0.99], dtype=torch.float64)
    ops = RingOps()
    y = ops.output(rsqrt(ops, ops.input(x), spec))
    assert ((y - x.rsqrt()).abs() <= 1.1e-3 * x.rsqrt() + 64 * ULP).all()
    with pytest.raises(HeadroomError):
        rsqrt(ops, ops.input(torch.tensor([top * 1.01])), spec)


def test_smu_with_the_thermometer_guess_on_shares():
    x = torch.linspace(-20, 20, 81, dtype=torch.float64)
    spec = site_spec("smu", guess="thermometer")

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
        return s.reveal_float(smu(ShareOps(s), xs, SMU_MU, spec), Role.CLIENT)

    y = run_local(job)[0]
    root = (x * x + SMU_MU**2).sqrt()
    ref = (x + root) / 2
    # rsqrt's relative error reaches the output through sqrt(z)/2 (which cancels x/2 for x < 0)
    assert ((y - ref).abs() <= 1.1e-3 * root / 2 + 64 * ULP).all()


def test_sigmoid_with_the_unit_interval_reciprocal():
    """approx.sigmoid (the pooler's tanh): |error| <= 1.2e-3 over |v| <= 256 on every backend (the limit
    exp's own error, (1 + x/256)^256 against exp(x): 8.6e-4 at v = -2.5; the reciprocal adds < 64 ulp), and its
    Cost line: drelu (8 rounds, 76.25 B) + 2 selects (2 x (1 round, 32 B)) + exp (17 rounds, 272 B)
    + 4 reciprocal steps (16 rounds, 384 B)."""
    from cometpi.approx import sigmoid

    v = torch.cat([torch.linspace(-12, 12, 97, dtype=torch.float64), torch.tensor([-256.0, -40.0, 40.0, 256.0])])
    ref = torch.sigmoid(v)
    ops = RingOps()
    tol = 1.2e-3
    assert ((ops.output(sigmoid(ops, ops.input(v))) - ref).abs() <= tol).all()
    assert ((sigmoid(FloatOps(), v) - ref).abs() <= tol).all()

    def job(s):
        xs = s.share(v if s.is_client else None, owner=Role.CLIENT, shape=v.shape)
        y, on = _online(s, lambda: sigmoid(ShareOps(s), xs))
        return s.reveal_float(y, Role.CLIENT), on

    y, on = run_local(job)[0]
    assert ((y - ref).abs() <= tol).all()
    assert on.rounds == 8 + 2 + 17 + 16
    want = v.numel() * (76.25 + 64 + 272 + 384)
    # the full-ring drelu's tree over 64 bit positions and its b2a: packed rows round up to bytes
    assert want <= on.payload_bytes <= want + tree_padding(64) + 2


def test_compare_many_far_from_zero():
    """Only |x - t| < 2^k matters: thresholds and inputs far beyond 2^31 (int32 lookups reduce modulo 2^n)."""
    k, base = 12, 1 << 40
    thr = torch.tensor([base, base + 100, -base])
    x = torch.cat([base + torch.arange(-2000, 2000, 7), -base + torch.arange(-2000, 2000, 7)])
    keep = ((x[:, None] - thr[None]).abs() < (1 << k)).any(1)
    got, _ = _compare(x[keep], k, thr)
    sel = (x[keep][:, None] - thr[None]).abs() < (1 << k)
    assert torch.equal(got[sel], (x[keep][:, None] >= thr[None]).to(torch.int64)[sel])


def _assert_select_cost(on, n: int, k: int) -> float:
    """A select's (``drelu_select``, ``trunc_select``) rounds and bytes: ``compare_rounds(k)``; 2 x 8 B opening,
    the tree's ANDs (4 bits each) and 2 bits of b2a per element (packed rows round up to bytes)."""
    assert on.rounds == P.compare_rounds(k)
    c = _chunks(k)
    want = n * (16 + (4 * P.tree_ands(c) + 2) / 8)
    assert want <= on.payload_bytes <= want + tree_padding(c) + 2
    return want


@pytest.mark.parametrize("k", [8, 20, 28, 40])
def test_drelu_select_is_the_sign_and_the_relu_with_its_cost_line(k):
    """([x >= 0], x [x >= 0]) exactly over |x| < 2^k, edges included; rounds ``compare_rounds(k)``; online
    2 x 8 B + the tree's ANDs + 2 bits per element (at k = 28 the documented 18.25 B)."""
    top = (1 << k) - 1
    x = torch.cat([torch.tensor([0, 1, -1, top, -top, top - 1, -top + 1]),
                   torch.linspace(-top, top, 997, dtype=torch.float64).round().to(torch.int64)])

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape, encoded=True)
        (b, bx), on = _online(s, lambda: P.drelu_select(xs, k))
        return s.open(b), s.open(bx), on

    b, bx, on = run_local(job)[0]
    assert torch.equal(b, (x >= 0).to(torch.int64)) and torch.equal(bx, torch.relu(x))
    want = _assert_select_cost(on, x.numel(), k)
    if k == 28:
        assert "at k = 28, 16 B + 4 ANDs + 2 bits = 18.25 B" in " ".join(P.drelu_select.__doc__.split())
        assert want == 18.25 * x.numel()


def test_drelu_select_beyond_its_range_wraps_and_the_server_view_is_uniform():
    """|x| >= 2^k: the bit of the wrapped value and x or 0 accordingly (wrong, as documented); what the server
    receives for x = 0 and for x spread over the domain has the same distribution."""
    k = 10
    x = torch.tensor([1 << 10, 3000, -(1 << 10) - 1, -3000], dtype=torch.int64)

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape, encoded=True)
        b, bx = P.drelu_select(xs, k)
        return s.open(b), s.open(bx)

    b, bx = run_local(job)[0]
    wrapped = (((x + (1 << k)) % (1 << (k + 1))) >= (1 << k)).to(torch.int64)
    assert torch.equal(b, wrapped) and torch.equal(bx, x * wrapped)
    n = 20_000
    a = server_messages(lambda s, xs: P.drelu_select(xs, 28), torch.zeros(n, dtype=torch.int64), encoded=True)
    v = server_messages(lambda s, xs: P.drelu_select(xs, 28), torch.linspace(-(2**27), 2**27, n).to(torch.int64),
                        encoded=True)
    assert len(a) == len(v) >= 3
    assert_same_views(a, v)


@pytest.mark.parametrize("bits,k", [(16, 28), (24, 20)])
def test_trunc_select_truncates_tests_and_selects_in_one_opening(bits, k):
    """(y, [y >= 0], y [y >= 0]) for y = z / 2^bits (the exact truncation: floor or one more) over |y| < 2^k - 1;
    rounds ``compare_rounds(k)``: the truncation's opening is the sign test's (18.25 B at k = 28, against
    16 B and one round more for ``truncate`` then ``drelu_select``)."""
    top = (1 << k) - 2
    y0 = torch.cat([torch.tensor([0, 1, -1, top, -top]),
                    torch.linspace(-top, top, 999, dtype=torch.float64).round().long()])
    z = y0 * (1 << bits) + torch.randint(0, 1 << bits, y0.shape)

    def job(s):
        zs = s.share(z if s.is_client else None, owner=Role.CLIENT, shape=z.shape, encoded=True)
        (y, b, by), on = _online(s, lambda: P.trunc_select(zs, bits, k))
        return s.open(y), s.open(b), s.open(by), on

    y, b, by, on = run_local(job)[0]
    assert ((y - torch.div(z, 1 << bits, rounding_mode="floor")).abs() <= 1).all()
    assert torch.equal(b, (y >= 0).to(torch.int64)) and torch.equal(by, torch.relu(y))
    want = _assert_select_cost(on, y0.numel(), k)
    if k == 28:
        assert "at k = 28, 18.25 B" in " ".join(P.trunc_select.__doc__.split())
        assert want == 18.25 * y0.numel()
    with pytest.raises(ValueError, match="k \\+ 1 <= 64 - bits"):
        run_local(lambda s: P.trunc_select(s.zeros((2,)), 40, 28))


def test_trunc_select_server_view_is_uniform():
    n = 20_000
    z0 = torch.zeros(n, dtype=torch.int64)
    z1 = torch.linspace(-(2**43), 2**43, n, dtype=torch.float64).long()
    a = server_messages(lambda s, xs: P.trunc_select(xs, 16, 28), z0, encoded=True)
    b = server_messages(lambda s, xs: P.trunc_select(xs, 16, 28), z1, encoded=True)
    assert len(a) == len(b) >= 3
    assert_same_views(a, b)


def test_select_bits_multiplies_by_xor_shared_bits_in_one_round():
    """b v for XOR-shared bits and shared values: exact (no truncation), 1 round, 16 B + 2 bits per element
    (the bits ride in the values' frame, padded to whole 8-byte words)."""
    from cometpi.protocols import boolean

    assert "Cost: 1 round, 16 B + 2 bits per element" in " ".join(boolean.select_bits.__doc__.split())
    n = 1000
    V = torch.round((torch.rand(n, dtype=torch.float64) * 100 - 50) * 2**16) / 2**16
    B = torch.randint(0, 2, (n,), dtype=torch.uint8)

    def fn(s):
        v = s.share(V if s.is_client else None, owner=Role.CLIENT, shape=V.shape)
        mine = B if s.is_client else torch.zeros(n, dtype=torch.uint8)  # XOR shares: the client holds b
        z, on = _online(s, lambda: boolean.select_bits(s, mine, v))
        return s.reveal_float(z, Role.CLIENT), on

    (z, on), _ = run_local(fn)
    assert torch.equal(z, V * B.double())
    assert on.rounds == 1
    assert 16 * n + 2 * n / 8 <= on.payload_bytes <= 16 * n + 2 * (n / 8 + 8)
