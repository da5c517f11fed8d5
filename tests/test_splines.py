"""The original functions on shares (``approx.splines``, ``softmax_exp``, ``rmsnorm``, the narrow
maximum): each table against its definition, every backend against torch's own function over the
declared domain (tolerances in ulps, ulp = 2^-16), the Cost lines against the counters, what
happens outside the domain, and what the server receives."""

import math

import pytest
import torch

from cometpi import protocols as P
from cometpi.approx import FloatOps, RingOps, ShareOps, rmsnorm, softmax_exp
from cometpi.approx.backends import HeadroomError
from cometpi.approx.functions import RMS_OUT_BITS
from cometpi.approx.sites import site_spec
from cometpi.approx.splines import REFERENCES, TABLES, activation, exp_neg, fit_table, spline_ref
from cometpi.core import Role
from cometpi.party import run_local

from .test_compare import assert_same_views, server_messages
from .test_segments import _online

ULP = 2.0**-16
TORCH = {"gelu": lambda x: torch.nn.functional.gelu(x),
         "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
         "silu": torch.nn.functional.silu}


def _xs():
    return torch.cat([torch.linspace(-20, 20, 20001, dtype=torch.float64),
                      torch.linspace(-4095, 4095, 1001, dtype=torch.float64),
                      torch.tensor([k * s for t in TABLES.values() for k in t.knots for s in (1, -1)],
                                   dtype=torch.float64)])


@pytest.mark.parametrize("name", list(TABLES))
def test_each_table_is_within_its_error_of_the_function(name):
    """Knots increasing on the 2^-8 grid, one quadratic per segment, the largest error on a dense grid
    within ``max_error`` (3e-5 = 2 ulp), and 0 beyond the last knot within half of it."""
    t = TABLES[name]
    assert list(t.knots) == sorted(set(t.knots)) and all(k * 256 == int(k * 256) for k in t.knots)
    assert t.max_error <= 3e-5
    u = torch.cat([torch.linspace(0, t.knots[-1] + 20, 400001, dtype=torch.float64),
                   torch.tensor(t.knots, dtype=torch.float64)])
    assert float((spline_ref(t, u) - REFERENCES[name](u)).abs().max()) <= t.max_error + 1e-12
    assert float(REFERENCES[name](torch.linspace(t.knots[-1], 4096, 10001, dtype=torch.float64)).abs().max()) \
        <= t.max_error / 2


def test_the_stored_table_is_what_the_fit_gives():
    """``fit_table`` regenerates the stored tables (here the GeLU's: the others take longer)."""
    again = fit_table("gelu")
    assert again.knots == TABLES["gelu"].knots
    for a, b in zip(again.coeffs, TABLES["gelu"].coeffs, strict=True):
        assert a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("name", list(TORCH))
def test_backends_compute_the_activation(name):
    """Float: the table with its coefficients on the 2^-16..2^-28 grids (<= max_error + 1 ulp).  Ring:
    each product's floor on top (<= 6 ulp measured 3.9; 8 allowed)."""
    x = _xs()
    want = TORCH[name](x)
    assert float((activation(FloatOps(), x, name) - want).abs().max()) <= 3e-5 + ULP
    ops = RingOps()
    assert float((ops.output(activation(ops, ops.input(x), name)) - want).abs().max()) <= 8 * ULP


def test_exp_on_the_ring_and_its_cut():
    u = torch.cat([torch.linspace(0, 20, 40001, dtype=torch.float64),
                   torch.linspace(20, 8191, 1001, dtype=torch.float64)])
    ops = RingOps()
    got = ops.output(exp_neg(ops, ops.input(u)))
    assert float((got - torch.exp(-u)).abs().max()) <= 8 * ULP
    assert float(got[u >= TABLES["exp"].knots[-1]].abs().max()) == 0.0  # exactly 0 past the cut
    with pytest.raises(HeadroomError, match="comparison"):
        exp_neg(ops, ops.input(torch.tensor([8200.0], dtype=torch.float64)))


def test_activations_on_shares_match_the_ring_and_the_cost_line():
    """GeLU and SiLU on shares against torch (the secure exact truncation may drop a borrow: a grid step
    low next to a knot picks the neighbouring quadratic, which was fitted one step wider: <= 10 ulp),
    and the documented 11 rounds, 90.25 B + 1.25 B per knot (padding of packed rows aside)."""
    x = _xs()

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
        out = {}
        for name in ("gelu", "silu"):
            y, on = _online(s, lambda name=name: activation(ShareOps(s), xs, name))
            out[name] = s.reveal_float(y, Role.CLIENT), on
        return out

    res = run_local(job)[0]
    assert "11 rounds, 90.25 B + 1.25 B per knot" in " ".join(activation.__doc__.split())
    for name, table in (("gelu", TABLES["gelu"]), ("silu", TABLES["silu"])):
        y, on = res[name]
        assert float((y - TORCH[name](x)).abs().max()) <= 10 * ULP
        assert on.rounds == 11
        want = x.numel() * (90.25 + 1.25 * (len(table.knots) - 1))
        assert want <= on.payload_bytes <= want + 64


def test_beyond_the_activation_range():
    """|x| >= 4096: the simulation raises; on shares the sign test wraps (documented as wrong, not leaked)."""
    x = torch.tensor([4100.0, -4100.0], dtype=torch.float64)
    ops = RingOps()
    with pytest.raises(HeadroomError):
        activation(ops, ops.input(x), "gelu")
    with pytest.raises(ValueError, match="no spline"):
        activation(FloatOps(), x, "gelu_fast")


def test_softmax_exp_matches_torch_with_public_and_shared_masks():
    """Against torch's softmax with -inf on masked keys, including a row whose scores are all near -1900
    (max subtraction keeps it exact) and large spreads; 1/S by the thermometer rsqrt (1e-5 relative)."""
    torch.manual_seed(2)
    s_ = torch.randn(2, 3, 5, 24, dtype=torch.float64) * 8
    s_[0, 0] -= 1900.0
    s_[0, 1, 0, 3] = 900.0
    mask = torch.ones(2, 1, 1, 24, dtype=torch.int64)
    mask[1, ..., 17:] = 0
    want = torch.softmax(s_.masked_fill(mask == 0, float("-inf")), -1)
    spec = site_spec("softmax_exp_sum", guess="thermometer")
    for ops in (FloatOps(), RingOps()):
        got = ops.output(softmax_exp(ops, ops.input(s_), mask, spec))
        assert float((got - want).abs().max()) <= 16 * ULP, ops.name

    def job(s):
        xs = s.share(s_ if s.is_client else None, owner=Role.CLIENT, shape=s_.shape)
        shared = s.share(mask if s.is_client else None, owner=Role.CLIENT, shape=mask.shape, encoded=True)
        ops = ShareOps(s)
        a = softmax_exp(ops, xs, mask, spec)
        b = softmax_exp(ops, xs, shared, spec)
        return s.reveal_float(a, Role.CLIENT), s.reveal_float(b, Role.CLIENT)

    a, b = run_local(job)[0]
    assert float((a - want).abs().max()) <= 24 * ULP
    assert float((b - want).abs().max()) <= 24 * ULP


@pytest.mark.parametrize("arity", [2, 8, 4])
def test_narrow_maximum_cost_and_range(arity):
    """The max with narrow comparisons (at k = 29: 4 rounds) is exact whatever the arity, with ties (the
    first maximum wins a group: one winner).  Arity 2: ``drelu_select``, 4 rounds per level, 18.25 B per
    pair.  Arity a: levels of 4 + ceil(log2(a - 1)) rounds, each group's a(a - 1)/2 sign tests without
    their b2a (10 B), a(a - 2) ANDs of 4 bits and a selects of 16 B + 2 bits.  The simulation raises where
    values differ by 2^k or more."""
    torch.manual_seed(3)
    v = torch.randn(6, 32, dtype=torch.float64) * 1000
    v[1, 3:9] = v[1].max()  # ties, within and across groups

    def job(s):
        xs = s.share(v if s.is_client else None, owner=Role.CLIENT, shape=v.shape)
        m, on = _online(s, lambda: P.maximum(xs, -1, k=29, arity=arity))
        return s.reveal_float(m, Role.CLIENT), on

    m, on = run_local(job)[0]
    assert torch.equal(m, (torch.round(v * 2**16) / 2**16).amax(-1, keepdim=True))
    if arity == 2:
        assert on.rounds == 5 * 4
        pairs = 6 * 31
        assert pairs * 18.25 <= on.payload_bytes <= pairs * 18.25 + 5 * 16
    else:
        levels = _arities(32, arity)  # 8 then 4; or 4, 4, 2
        assert on.rounds == sum(4 + math.ceil(math.log2(a - 1)) if a > 2 else 4 for a in levels)
        want, n = 0.0, 32
        for a in levels:  # 6 rows; a binary level's pair is one drelu_select, an a-fold group's pairs sign tests
            g = -(-n // a)
            if a > 2:
                want += 6 * g * (a * (a - 1) // 2 * 10 + a * (a - 2) * 0.5 + a * 16.25)
            else:
                want += 6 * g * 18.25
            n = g
        assert want <= on.payload_bytes <= want + on.msgs_sent * 16  # packed bits round up per message
    ops = RingOps()
    with pytest.raises(HeadroomError, match="narrow maximum"):
        ops.maximum(ops.input(torch.tensor([[-5000.0, 5000.0]], dtype=torch.float64)), -1, k=29)


def _arities(n: int, arity: int) -> list[int]:
    """The group size of each level of ``maximum(arity=)`` on a row of n."""
    out = []
    while n > 1:
        a = min(arity, n)
        out.append(a)
        n = -(-n // a)
    return out


def test_rmsnorm_keeps_precision_on_massive_activations():
    """Rows from 0.05 to 1500 in scale, one with a channel at 2.4e4 (SmolLM2's residual stream reaches 2.5e4
    in its attention-sink rows; its smallest mean square is 6e-3): error <= 1e-4 of each row's largest
    output (the mean square keeps 8 extra bits, the rsqrt 12; x's own encoding is 5e-5 of the 0.05
    row); |x| >= 32768 raises."""
    torch.manual_seed(4)
    scales = torch.tensor([0.05, 0.1, 1.0, 30.0, 600.0, 1500.0], dtype=torch.float64)
    x = torch.randn(6, 576, dtype=torch.float64) * scales[:, None]
    x[4, 5] = 24000.0
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    spec = site_spec("rmsnorm_ms", guess="thermometer")
    assert RMS_OUT_BITS == 12
    for ops in (RingOps(), FloatOps()):
        got = ops.output(rmsnorm(ops, ops.input(x), spec, 1e-5))
        rel = (got - want).abs().amax(-1) / want.abs().amax(-1)
        assert float(rel.max()) <= 1e-4, ops.name
    ops = RingOps()
    with pytest.raises(HeadroomError):
        rmsnorm(ops, ops.input(torch.full((1, 8), 40000.0, dtype=torch.float64)), spec, 1e-5)


def test_the_server_view_of_an_activation_does_not_depend_on_x():
    n = 4000

    def body(s, xs):
        activation(ShareOps(s), xs, "silu")

    a = server_messages(body, torch.zeros(n, dtype=torch.float64))
    b = server_messages(body, torch.linspace(-40, 40, n, dtype=torch.float64))
    assert len(a) == len(b) >= 8
    assert_same_views(a, b)


def test_softmax_exp_domain_edge():
    """|s| < 2048 with masked keys at MASKED_SCORE = -2048: a row at 2000 with a masked key is computed (the
    masked key gets 0); at 2100 the max's comparisons would see a difference beyond 2^12 and the simulation
    raises (the secure path would return a wrong max there, never a leak)."""
    from cometpi.approx.functions import MASKED_SCORE

    assert MASKED_SCORE == -2048.0
    mask = torch.tensor([[[[1, 1, 0]]]])
    spec = site_spec("softmax_exp_sum", guess="thermometer")
    ops = RingOps()
    ok = torch.tensor([[[[2000.0, 1999.0, 0.0]]]], dtype=torch.float64)
    got = ops.output(softmax_exp(ops, ops.input(ok), mask, spec))
    want = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), -1)
    assert float((got[..., :2] - want).abs().max()) <= 16 * ULP and float(got[..., 2]) == 0.0
    with pytest.raises(HeadroomError, match="narrow maximum"):
        softmax_exp(ops, ops.input(ok + 100.0), mask, spec)
