"""Two parties in one process: every protocol against plaintext, and its Cost line against the counters.

Tolerances are in units of the fixed-point step (ulp = 2^-f).  References are computed in float64
on the *encoded* inputs, so the only error left is the protocol's own (truncation).
"""

from contextlib import nullcontext

import pytest
import torch

from cometpi import protocols as P
from cometpi.core import AShare, Config, Role, TruncMode
from cometpi.dealer import DealerError, LocalDealer
from cometpi.party import local_pair, run_local, run_pair
from cometpi.ring import FixedPoint, wrap_bits
from cometpi.transport import Traffic

from .conftest import uniform

FP = FixedPoint(16)
ULP = FP.ulp
MODES = [TruncMode.EXACT, TruncMode.LOCAL]


def q(x):
    """Round to the fixed-point grid, as the parties see their inputs."""
    return FP.decode(FP.encode(x))


def measured(s, fn):
    """Run fn() and return (its result, online Traffic, offline Traffic) of this party."""
    before = s.meter.snapshot()
    out = fn()
    after = s.meter.snapshot()
    d = {k: after[k] - before[k] for k in after}
    on = sum((t for (lk, ph), t in d.items() if ph == "online"), Traffic())
    off = sum((t for (lk, ph), t in d.items() if ph == "offline"), Traffic())
    return out, on, off


def trunc_cost(n, mode):
    """(bytes, rounds) that truncation of n elements adds, per trunc_exact/trunc_local docstrings."""
    return (16 * n, 1) if mode == TruncMode.EXACT else (0, 0)


def run_binary(op, X, Y, mode, y_owner=Role.SERVER):
    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        y = s.share(Y if s.role == y_owner else None, owner=y_owner, shape=Y.shape)
        z, on, off = measured(s, lambda: op(x, y))
        return s.reveal_float(z, Role.CLIENT), on, off

    (z, on, off), (_, son, soff) = run_local(fn, Config(trunc=mode))
    return z, on, off, soff


@pytest.mark.parametrize("mode", MODES)
def test_mul(mode, rng):
    assert "Cost: 1 round, 32 B/element" in P.mul.__doc__
    X, Y = uniform(rng, (7, 33)), uniform(rng, (7, 33))
    z, on, off, soff = run_binary(P.mul, X, Y, mode)
    assert float((z - q(X) * q(Y)).abs().max()) < ULP
    n = X.numel()
    tb, tr = trunc_cost(n, mode)
    assert on.payload_bytes == 32 * n + tb
    assert on.rounds == 1 + tr
    assert on.msgs_sent == on.msgs_recv == 1 + tr
    # offline: 8 B/element triple correction (+16 B/element trunc pair) dealer -> server
    assert soff.bytes_recv == 8 * n + (tb if mode == TruncMode.EXACT else 0)
    assert off.bytes_recv == 0


@pytest.mark.parametrize("mode", MODES)
def test_square(mode, rng):
    assert "Cost: 1 round, 16 B/element" in P.square.__doc__
    X = uniform(rng, (5, 19))
    z, on, _, soff = run_binary(lambda x, y: P.square(x), X, X, mode)
    assert float((z - q(X) ** 2).abs().max()) < ULP
    tb, tr = trunc_cost(X.numel(), mode)
    assert (on.payload_bytes, on.rounds) == (16 * X.numel() + tb, 1 + tr)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_shared(mode, rng):
    assert "Cost: 1 round, 16 B x (|X| + |Y|)" in P.matmul.__doc__
    X, Y = uniform(rng, (2, 6, 9)), uniform(rng, (2, 9, 5))
    z, on, _, soff = run_binary(P.matmul, X, Y, mode)
    assert float((z - q(X) @ q(Y)).abs().max()) < ULP
    tb, tr = trunc_cost(2 * 6 * 5, mode)
    assert (on.payload_bytes, on.rounds) == (16 * (X.numel() + Y.numel()) + tb, 1 + tr)
    assert soff.bytes_recv == 8 * 2 * 6 * 5 + tb


@pytest.mark.parametrize("mode", MODES)
def test_matmul_private(mode, rng):
    assert "Cost: 1 round, 8 B x |X| client -> server" in P.matmul_private.__doc__
    X, W = uniform(rng, (11, 24)), uniform(rng, (24, 13), -0.7, 0.7)

    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        pw, pon, poff = measured(s, lambda: P.prepare_weight(s, None if s.is_client else W, shape=W.shape))
        y, on, off = measured(s, lambda: P.matmul_private(x, pw))
        return s.reveal_float(y, Role.CLIENT), (pon, poff), (on, off)

    (y, (pon, poff), (on, off)), (_, _, (son, soff)) = run_local(fn, Config(trunc=mode))
    assert float((y - q(X) @ q(W)).abs().max()) < ULP
    tb, tr = trunc_cost(11 * 13, mode)
    assert on.bytes_sent == 8 * X.numel() + tb // 2 and son.bytes_sent == tb // 2
    assert (on.payload_bytes, on.rounds) == (8 * X.numel() + tb, 1 + tr)
    # the weight mask travels once, offline, server -> client; online traffic of prepare is zero
    assert pon.payload_bytes == 0 and poff.bytes_recv == 8 * W.numel() and poff.rounds == 1
    assert off.bytes_recv == 8 * 11 * 13  # C0 from the dealer


def test_public_ops_and_open_reveal(rng):
    X, C, W = uniform(rng, (4, 8)), uniform(rng, (4, 8)), uniform(rng, (8, 3))

    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        a = P.mul_public(x, C)
        b = P.matmul_public(x, W)
        c = (x + 1.5) - x.mul_int(3)
        opened, on, _ = measured(s, lambda: s.open(c))
        return s.reveal_float(a, Role.SERVER), s.reveal_float(b, Role.CLIENT), FP.decode(opened), on

    (_, b, c, on), (a, _, c2, _) = run_local(fn)
    assert a is not None and float((a - q(X) * q(C)).abs().max()) < ULP
    assert float((b - q(X) @ q(W)).abs().max()) < ULP
    assert torch.equal(c, c2) and float((c - (1.5 - 2 * q(X))).abs().max()) == 0
    assert (on.payload_bytes, on.rounds) == (16 * X.numel(), 1)


@pytest.mark.parametrize("mode", MODES)
def test_truncation_over_its_domain(mode):
    """Values across the whole headroom |x| < 2^62 (ring integers), both signs."""
    k = torch.arange(0, 62, dtype=torch.float64)
    vals = torch.cat([2**k - 1, -(2**k), torch.tensor([0.0, 2**62 - 2**40, -(2**62)])]).to(torch.int64)

    def fn(s):
        x = s.share(vals, owner=Role.CLIENT, shape=vals.shape, encoded=True)
        y, on, _ = measured(s, lambda: P.truncate(x))
        return s.reveal(y, Role.CLIENT), on

    (y, on), _ = run_local(fn, Config(trunc=mode))
    floor = torch.div(vals, 2**16, rounding_mode="floor")
    err = (y - floor).abs()
    if mode == TruncMode.EXACT:
        assert int(err.max()) <= 1  # floor or floor + 1: below one ulp, never a large error
        assert (on.payload_bytes, on.rounds) == (16 * vals.numel(), 1)
        assert "Cost: 1 round, 16 B/element" in P.trunc_exact.__doc__
    else:
        assert (on.payload_bytes, on.rounds) == (0, 0)
        assert "Cost: 0 rounds, 0 B" in P.trunc_local.__doc__


def test_local_truncation_failure_rate_matches_its_documentation():
    """trunc_local fails with probability ~|x|/2^64; trunc_exact never does (same values)."""
    n, k = 1 << 15, 56
    vals = torch.full((n,), 1 << k, dtype=torch.int64)
    expect = n * 2.0**k / 2.0**64  # 128

    def fn(mode):
        def go(s):
            x = s.share(vals, owner=Role.CLIENT, shape=vals.shape, encoded=True)
            return s.reveal(P.truncate(x, mode=mode), Role.CLIENT)
        return go

    y, _ = run_local(fn(TruncMode.LOCAL))
    fails = int(((y - (vals >> 16)).abs() > 1).sum())
    assert 0.5 * expect < fails < 1.6 * expect  # Poisson(128): far outside 5 sigma otherwise
    y, _ = run_local(fn(TruncMode.EXACT))
    assert int(((y - (vals >> 16)).abs() > 1).sum()) == 0


def test_reshare_moves_shares_and_costs_8_bytes(rng):
    assert "Cost: 1 round, 8 B/element party 0 -> party 1" in P.reshare.__doc__
    X = uniform(rng, (3, 10))

    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        r0 = torch.full(X.shape, 12345, dtype=torch.int64)
        y, on, _ = measured(s, lambda: P.reshare(x, r0 if s.is_client else None))
        z = P.reshare(y)  # uniform new share
        return y.data, s.reveal_float(z, Role.CLIENT), on

    (y0, z, on), _ = run_local(fn)
    assert torch.equal(y0, torch.full(X.shape, 12345, dtype=torch.int64))
    assert torch.equal(z, q(X))
    assert (on.payload_bytes, on.rounds, on.msgs_sent) == (8 * X.numel(), 1, 1)


def test_two_sessions_in_one_process_are_independent(rng):
    X = uniform(rng, (4, 4))
    dealer = LocalDealer()
    a, b = local_pair(dealer=dealer), local_pair(dealer=dealer)

    def fn(scale):
        def go(s):
            x = s.share(X * scale if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
            return s.reveal_float(P.mul(x, x), Role.CLIENT)
        return go

    ra, rb = {}, {}
    import threading

    t = threading.Thread(target=lambda: ra.setdefault("r", run_pair(fn(1), fn(1), a)))
    t.start()
    rb["r"] = run_pair(fn(2), fn(2), b)
    t.join()
    assert float((ra["r"][0] - q(X) ** 2).abs().max()) < ULP
    assert float((rb["r"][0] - q(2 * X) ** 2).abs().max()) < ULP
    for s in (*a, *b):
        s.close()


def test_prefetched_plan_keeps_the_dealer_off_the_online_path(rng):
    X, Y = uniform(rng, (8, 8)), uniform(rng, (8, 8))

    def work(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        y = s.share(None if s.is_client else Y, owner=Role.SERVER, shape=Y.shape)
        return P.matmul(P.mul(x, y), y)

    def record(s):
        return s.reveal_float(work(s), Role.CLIENT), list(s.provider.plan)

    (ref, plan), _ = run_local(record)

    def replay(s):
        n = s.provider.prefetch(plan)
        s.provider.wait_prefetched(10)
        before = s.meter.total(link="dealer")
        z = work(s)
        after = s.meter.total(link="dealer")
        return s.reveal_float(z, Role.CLIENT), n, after - before

    (z, n_client, d_client), (_, n_server, d_server) = run_local(replay)
    assert n_server == 4 and n_client == 0  # mul, trunc, matmul, trunc corrections go to the server
    assert d_server.msgs_sent == 0 and d_server.msgs_recv == 0  # nothing asked or received online
    # mul errs by < 1 ulp; matmul by Y spreads that by at most sum_k |Y_kj|, plus its own truncation
    plain = (q(X) * q(Y)) @ q(Y)
    tol = ULP * (1 + float(q(Y).abs().sum(0).max()))
    assert float((z - plain).abs().max()) < tol and float((ref - plain).abs().max()) < tol


def test_plan_mismatch_is_an_error():
    def fn(s):
        s.provider.prefetch([[0, "mul", {"shape": [3]}]])
        x = s.zeros((4,))
        return P.mul(x, x)

    with pytest.raises(DealerError, match="prefetched plan"):
        run_local(fn)


def test_a_wrong_speculation_is_abandoned_at_fresh_indices(rng):
    """A speculated plan that the run does not follow is no error: both parties drop the guessed
    indices (the dealer answered them once; none is asked again) and continue past them."""
    X, Y = uniform(rng, (4, 4)), uniform(rng, (4, 4))

    def work(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        y = s.share(None if s.is_client else Y, owner=Role.SERVER, shape=Y.shape)
        return P.mul(x, y)

    _, (_, wrong) = run_local(lambda s: (P.mul(s.zeros((3,)), s.zeros((3,))), s.provider.plan_since(0)))

    def fn(s):
        s.provider.speculate(wrong)  # the requests of a product of another shape
        z = work(s)
        return s.reveal_float(z, Role.CLIENT), s.provider.mispredictions, [i for i, *_ in s.provider.plan]

    (z, miss, idx), (_, smiss, sidx) = run_local(fn)
    assert miss == smiss == 1 and idx == sidx
    assert not set(range(len(wrong))) & set(idx) and idx == sorted(set(idx))  # skipped, each index once
    assert float((z - q(X) * q(Y)).abs().max()) <= ULP


def test_a_right_speculation_is_fetched_ahead(rng):
    X = uniform(rng, (6, 6))

    def work(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        return P.mul(x, x)

    (_, plan), _ = run_local(lambda s: (work(s), s.provider.plan_since(0)))

    def fn(s):
        P.mul(s.zeros((2,)), s.zeros((2,)))  # the speculated requests start at a later index
        n = s.provider.speculate(plan)
        s.provider.wait_prefetched(10)
        before = s.meter.total(link="dealer")
        z = work(s)
        after = s.meter.total(link="dealer")
        return s.reveal_float(z, Role.CLIENT), n, (after - before).msgs_sent, s.provider.mispredictions

    (z, n, _, miss), (_, sn, smsgs, smiss) = run_local(fn)
    assert miss == smiss == 0 and n == 0 and sn == len(plan) and smsgs == 0  # the server asked for nothing
    assert float((z - q(X) * q(X)).abs().max()) <= ULP


def test_a_replayed_plan_after_an_unused_guess_starts_at_fresh_indices(rng):
    X = uniform(rng, (5,))

    def work(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        return P.mul(x, x)

    (_, plan), _ = run_local(lambda s: (work(s), s.provider.plan_since(0)))

    def fn(s):
        s.provider.speculate(plan)  # a guess nothing uses (as a decoding tail before another query)
        s.provider.prefetch_relative(plan)
        start = s.provider.index
        s.provider.wait_prefetched(10)
        z = work(s)
        return s.reveal_float(z, Role.CLIENT), start, s.provider.mispredictions

    (z, start, miss), (_, sstart, _) = run_local(fn)
    assert start == sstart == len(plan) and miss == 1  # the guessed indices were skipped, not reused
    assert float((z - q(X) * q(X)).abs().max()) <= ULP


def test_embedding_lookup_in_a_32_bit_ring_is_exact_and_costs_as_documented(rng):
    assert "Cost: 2 rounds; 4 B x T x V client -> server" in P.embedding_lookup.__doc__
    V, d, T = 37, 6, 5
    W = uniform(rng, (V, d), -3, 3)
    ids = torch.tensor([0, 36, 5, 5, 17])

    def fn(s):
        tab = P.prepare_weight(s, None if s.is_client else W, shape=(V, d), bits=32)
        e, on, _ = measured(s, lambda: P.embedding_lookup(ids if s.is_client else None, tab, n_tokens=T))
        return s.reveal_float(e, Role.CLIENT), on

    (e, on), _ = run_local(fn)
    assert torch.equal(e, q(W)[ids])  # a lookup: no rounding at all
    assert (on.payload_bytes, on.rounds) == (4 * T * V + 8 * T * d, 2)
    with pytest.raises(ValueError, match="token ids must lie"):
        run_local(lambda s: P.embedding_lookup(torch.tensor([V]) if s.is_client else None,
                                               P.prepare_weight(s, None if s.is_client else W, shape=(V, d),
                                                                bits=32), n_tokens=1))


def test_lift_from_32_bits_over_its_domain():
    vals = torch.tensor([0, 1, -1, 2**29, -(2**29), 2**30 - 1, -(2**30), 12345], dtype=torch.int64)

    def fn(s):
        (r,) = s.pair_random(vals.shape)  # a 32-bit sharing of vals
        mine = wrap_bits(vals - r, 32) if s.is_client else wrap_bits(r, 32)
        y, on, _ = measured(s, lambda: P.lift(AShare(s, mine), 32))
        return s.reveal(y, Role.CLIENT), on

    (y, on), _ = run_local(fn)
    assert torch.equal(y, vals)
    assert (on.payload_bytes, on.rounds) == (8 * vals.numel(), 1)


@pytest.mark.parametrize("mode", MODES)
def test_mul_private_vector(mode, rng):
    X, g = uniform(rng, (4, 3, 10)), uniform(rng, (10,), -2, 2)

    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        pv = P.prepare_weight(s, None if s.is_client else g, shape=(10,))
        y, on, _ = measured(s, lambda: P.matmul_private(x, pv))
        return s.reveal_float(y, Role.CLIENT), on

    (y, on), _ = run_local(fn, Config(trunc=mode))
    assert float((y - q(X) * q(g)).abs().max()) < ULP
    tb, tr = trunc_cost(X.numel(), mode)
    assert (on.payload_bytes, on.rounds) == (8 * X.numel() + tb, 1 + tr)


@pytest.mark.parametrize("mode", MODES)
def test_poly_kept_equals_plaintext_and_its_cost_line(mode, rng):
    """c0 + c1 u + c2 u^2 with shared coefficients at f + (0, 8, 12) bits, u's truncation's opening reused:
    within 1 ulp of the float64 value on the encoded inputs (one truncation: the exact sum's floor), the
    truncation of u as ``trunc_exact``; 1 round of 32 B/element + 1 truncation (exact mode; local: Horner)."""
    assert "Cost: 1 round, 32 B/element + the truncation (1 round, 16 B/element)" in " ".join(
        P.poly_kept.__doc__.split())
    n = 300
    U = uniform(rng, (n,), 0, 11)
    C = [uniform(rng, (n,), -1, 1), uniform(rng, (n,), -0.2, 0.2), uniform(rng, (n,), -0.01, 0.01)]
    extra = (0, 8, 12)

    def fn(s):
        u = s.share(U if s.is_client else None, owner=Role.CLIENT, shape=U.shape)
        cs = [s.share(c * 2.0**e if s.is_client else None, owner=Role.CLIENT, shape=c.shape)
              for c, e in zip(C, extra, strict=True)]
        (coarse, kept), on1, _ = measured(s, lambda: P.truncate_poly(u, 8))
        y, on2, off2 = measured(s, lambda: P.poly_kept(kept, *cs, extra))
        with pytest.raises(ValueError, match="one polynomial only") if mode == TruncMode.EXACT else nullcontext():
            P.poly_kept(kept, *cs, extra)
        return s.reveal_float(coarse, Role.CLIENT), s.reveal_float(y, Role.CLIENT), on1, on2

    (coarse, y, on1, on2), _ = run_local(fn, Config(trunc=mode))
    u = q(U)
    c = [FP.decode(FP.encode(cj * 2.0**e)) * 2.0**-e for cj, e in zip(C, extra, strict=True)]  # as encoded
    want = c[0] + c[1] * u + c[2] * u * u
    assert float((coarse - torch.floor(FP.encode(U).double() / 2**8) * ULP).abs().max()) <= ULP  # u / 2^8
    tol = 1 if mode == TruncMode.EXACT else 3  # Horner in local mode: two truncations, each 1 ulp
    assert float((y - want).abs().max()) <= tol * ULP
    tb, tr = trunc_cost(n, mode)
    assert (on1.payload_bytes, on1.rounds) == (tb, tr)
    if mode == TruncMode.EXACT:
        assert (on2.payload_bytes, on2.rounds) == (32 * n + 16 * n, 2)


def test_poly_kept_outside_its_domain():
    """|y| >= 2^(62 - 3f - e2) = 4: the simulation raises HeadroomError (on shares the one truncation would
    wrap, documented as a wrong value); an order of the extra bits other than e0 <= e1 <= e2 is refused."""
    from cometpi.approx.backends import HeadroomError, RingOps

    ops = RingOps()
    u = ops.input(torch.tensor([2.0, 3.0], dtype=torch.float64))
    zero = ops.input(torch.zeros(2, dtype=torch.float64))
    inside = ops.input(torch.tensor([0.1, 0.4], dtype=torch.float64) * 2.0**12)  # y = 0.4, 3.6
    y = ops.output(ops.poly_kept(u, zero, zero, inside, (0, 8, 12)))
    assert float((y - torch.tensor([0.4, 3.6], dtype=torch.float64)).abs().max()) <= ULP
    beyond = ops.input(torch.tensor([0.1, 0.5], dtype=torch.float64) * 2.0**12)  # y = 0.4, 4.5
    with pytest.raises(HeadroomError, match="polynomial"):
        ops.poly_kept(u, zero, zero, beyond, (0, 8, 12))

    def fn(s):
        x = s.share(torch.ones(2) if s.is_client else None, owner=Role.CLIENT, shape=(2,))
        _, kept = P.truncate_poly(x, 8)
        with pytest.raises(ValueError, match="e0 <= e1 <= e2"):
            P.poly_kept(kept, x, x, x, (0, 12, 8))
        return True

    assert run_local(fn) == (True, True)


@pytest.mark.parametrize("mode", MODES)
def test_mul_truncated_reuses_the_truncations_opening(mode, rng):
    """a y for y = trunc(x, f) of a not yet truncated product x: the truncation's opening is y's side of
    the Beaver product, so only a's masked difference travels (16 B instead of 32 B per element); within
    1 ulp of plaintext as truncate-then-mul; a kept truncation serves one product."""
    assert "Cost: 1 round, 16 B per element of a + the truncation" in " ".join(P.mul_truncated.__doc__.split())
    n = 400
    X, A = uniform(rng, (n,), -30, 30), uniform(rng, (n,), -3, 3)

    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        a = s.share(A if s.is_client else None, owner=Role.CLIENT, shape=A.shape)
        z = x._wrap(x.data << 16)  # x 2^f: a product before its truncation
        (y, kept), on1, _ = measured(s, lambda: P.truncate_for_mul(z, 16))
        p, on2, _ = measured(s, lambda: P.mul_truncated(a, kept))
        if mode == TruncMode.EXACT:
            with pytest.raises(ValueError, match="one product only"):
                P.mul_truncated(a, kept)
        return s.reveal_float(y, Role.CLIENT), s.reveal_float(p, Role.CLIENT), on1, on2

    (y, p, on1, on2), _ = run_local(fn, Config(trunc=mode))
    assert float((y - q(X)).abs().max()) <= ULP
    assert float((p - q(A) * q(X)).abs().max()) <= 2 * ULP + 30 * ULP * (mode == TruncMode.LOCAL)
    tb, tr = trunc_cost(n, mode)
    assert (on1.payload_bytes, on1.rounds) == (tb, tr)
    want = (16 * n + tb, 1 + tr) if mode == TruncMode.EXACT else (32 * n, 1)
    assert (on2.payload_bytes, on2.rounds) == want


def test_a_square_and_a_truncation_keep_their_opening_for_a_rows_statistic(rng):
    """x^2 (``square_keep``) and y = trunc(z) (``truncate_for_mul`` with a row-shaped other factor): the later
    product by a (rows, 1) statistic opens only the statistic, 16 B per row, plus the product's truncation;
    within 2 ulp of plaintext."""
    R, C = 6, 40
    X, Rw = uniform(rng, (R, C), -4, 4), uniform(rng, (R, 1), 0.2, 2)

    def fn(s):
        x = s.share(X if s.is_client else None, owner=Role.CLIENT, shape=X.shape)
        r = s.share(Rw if s.is_client else None, owner=Role.CLIENT, shape=Rw.shape)
        sq, kept = P.square_keep(x, (R, 1))
        xr, on1, _ = measured(s, lambda: P.mul_kept(r, kept))
        _, kt = P.truncate_for_mul(x._wrap(x.data << 16), 16, other=(R, 1))
        yr, on2, _ = measured(s, lambda: P.mul_truncated(r, kt))
        with pytest.raises(ValueError, match="where the opening kept material"):
            P.mul_kept(x, P.square_keep(x, (R, 1))[1])
        return [s.reveal_float(t, Role.CLIENT) for t in (sq, xr, yr)], on1, on2

    ((sq, xr, yr), on1, on2), _ = run_local(fn)
    assert float((sq - q(X) ** 2).abs().max()) <= ULP
    assert float((xr - q(X) * q(Rw)).abs().max()) <= 2 * ULP
    assert float((yr - q(X) * q(Rw)).abs().max()) <= 2 * ULP
    for on in (on1, on2):
        assert (on.payload_bytes, on.rounds) == (16 * R + 16 * R * C, 2)
