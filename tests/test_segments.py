"""SMU by segments (``approx.segments``) and ReLU-softmax's narrow ReLU: the table against its
definition, every backend against the float64 reference over the declared domain (tolerances in
ulps, ulp = 2^-16), the Cost lines against the counters, out-of-range behaviour, the mu fold, and
what the server receives."""


import pytest
import torch

from cometpi.approx import FloatOps, RingOps, ShareOps, relu_softmax
from cometpi.approx.backends import HeadroomError
from cometpi.approx.functions import SCORE_BITS
from cometpi.approx.segments import ALPHA, BETA, KNOTS, MAX_ERROR, V_BITS, fold_mu, g, segments_ref, smu1_segments
from cometpi.approx.sites import site_spec
from cometpi.core import Role
from cometpi.party import run_local
from cometpi.ring import FixedPoint
from cometpi.transport import Traffic

from .test_compare import assert_same_views, server_messages, tree_padding

ULP = 2.0**-16
V_MAX = 2.0 ** (V_BITS - 16)  # |v| < 4096


def _online(s, fn):
    before = s.meter.snapshot()
    out = fn()
    after = s.meter.snapshot()
    return out, sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())


def _grid():
    return torch.cat([torch.linspace(-40, 40, 16001, dtype=torch.float64),
                      torch.tensor(KNOTS, dtype=torch.float64), -torch.tensor(KNOTS, dtype=torch.float64),
                      torch.linspace(-V_MAX + 1, V_MAX - 1, 2001, dtype=torch.float64)])


def test_the_table_is_the_minimax_cover_it_claims():
    """Knots on the 2^-8 grid, each segment's line within MAX_ERROR of g, its chord lowered by half
    the chord's gap (so the error is +-gap/2 at most), and the constant above the last knot."""
    assert all(k * 256 == int(k * 256) for k in KNOTS) and list(KNOTS) == sorted(KNOTS)
    for j, (a, b) in enumerate(zip(KNOTS[:-1], KNOTS[1:], strict=True)):
        u = torch.linspace(a, b, 2001, dtype=torch.float64)
        err = ALPHA[j] + BETA[j] * u - g(u)
        assert float(err.abs().max()) <= MAX_ERROR
        ga, gb = (float(g(torch.tensor(e, dtype=torch.float64))) for e in (a, b))
        chord = (gb - ga) / (b - a)
        assert BETA[j] == pytest.approx(chord, rel=1e-8)
    tail = torch.tensor([2048.0, 4096.0, 1e6], dtype=torch.float64)
    assert float((ALPHA[-1] - g(tail)).abs().max()) <= MAX_ERROR and BETA[-1] == 0.0
    v = _grid()
    exact = torch.relu(v) + g(v.abs())
    assert float((segments_ref(v) - exact).abs().max()) <= MAX_ERROR + 1e-12


@pytest.mark.parametrize("backend", ["float", "ring"])
def test_backends_compute_the_segments(backend):
    """Float: the same segments (coefficients on the 2^-16 grid: <= 1 ulp).  Ring and shares: each
    truncation's floor (the ring's is exact; the secure exact truncation may round up by 1 ulp, which
    next to a knot can pick the neighbouring line, |dBETA| 2^-8 <= 16 ulp away): <= 20 ulp."""
    v = _grid()
    ref = segments_ref(v)
    if backend == "float":
        assert float((smu1_segments(FloatOps(), v) - ref).abs().max()) <= 1 * ULP
    else:
        ops = RingOps()
        assert float((ops.output(smu1_segments(ops, ops.input(v))) - ref).abs().max()) <= 20 * ULP


def test_shares_match_the_reference_and_the_cost_line():
    v = _grid()
    ref = segments_ref(v)

    def job(s):
        xs = s.share(v if s.is_client else None, owner=Role.CLIENT, shape=v.shape)
        y, on = _online(s, lambda: smu1_segments(ShareOps(s), xs))
        return s.reveal_float(y, Role.CLIENT), on

    y, on = run_local(job)[0]
    assert float((y - ref).abs().max()) <= 20 * ULP
    doc = smu1_segments.__doc__
    assert "11 rounds, 104.25 B/element" in doc
    assert on.rounds == 11
    want = v.numel() * 104.25
    # the two comparisons' packed rows and b2a messages round up to whole bytes
    assert want <= on.payload_bytes <= want + tree_padding(4) + tree_padding(3) + 4


def test_beyond_the_sign_range_the_simulation_raises_and_the_secure_path_wraps():
    """|v| >= 4096 (beyond the declared range; 452 is the largest measured): the ring simulation raises
    ``HeadroomError``; on shares the sign test wraps (a wrong branch), as documented."""
    v = torch.tensor([V_MAX + 8.0, -(V_MAX + 8.0)], dtype=torch.float64)
    ops = RingOps()
    with pytest.raises(HeadroomError, match="comparison"):
        smu1_segments(ops, ops.input(v))

    def job(s):
        xs = s.share(v if s.is_client else None, owner=Role.CLIENT, shape=v.shape)
        return s.reveal_float(smu1_segments(ShareOps(s), xs), Role.CLIENT)

    y = run_local(job)[0]
    assert float((y - segments_ref(v)).abs().max()) > 1.0


def test_mu_folds_into_the_ffn_weights():
    """down(SMU(up(h); mu)) = (down mu)(SMU1(up(h) / mu)) for per-channel and scalar mu, with SMU1 exact."""
    torch.manual_seed(0)
    d, ff = 8, 12
    h = torch.randn(5, d, dtype=torch.float64)
    w1, b1, w2 = torch.randn(d, ff, dtype=torch.float64), torch.randn(ff, dtype=torch.float64), torch.randn(
        ff, d, dtype=torch.float64)
    for mu in (0.1 + torch.rand(ff, dtype=torch.float64), 0.363):
        x = h @ w1 + b1
        m = mu if isinstance(mu, torch.Tensor) else torch.tensor(mu, dtype=torch.float64)
        want = ((x + torch.sqrt(x * x + m * m)) / 2) @ w2
        f1, fb, f2 = fold_mu(w1, b1, w2, mu)
        v = h @ f1 + fb
        got = (torch.relu(v) + g(v.abs())) @ f2
        assert torch.allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        fold_mu(w1, b1, w2, torch.zeros(ff))


def test_narrow_relu_softmax_on_shares():
    """ReLU-softmax with the exact ReLU by the narrow comparison: against the float64 definition
    (1/S by the thermometer rsqrt: 1.1e-3 relative), and its ReLU's cost: drelu_select at k = 28
    (4 rounds, 18.25 B: the sign test's opening is the full masked score, its b2a opening selects it)."""
    torch.manual_seed(1)
    s_ = torch.randn(2, 3, 4, 16, dtype=torch.float64) * 4
    mask = torch.ones(2, 1, 1, 16, dtype=torch.int64)
    mask[1, ..., 12:] = 0
    spec = site_spec("softmax_sum", guess="thermometer")
    r = torch.relu(s_) * mask
    ref = r / (r.sum(-1, keepdim=True) + 1e-2)

    def job(s):
        xs = s.share(s_ if s.is_client else None, owner=Role.CLIENT, shape=s_.shape)
        ops = ShareOps(s)
        bits, on = _online(s, lambda: ops.sign_mask(xs, SCORE_BITS)[2])
        y = relu_softmax(ops, xs, mask, spec, relu="narrow")
        return s.reveal_float(bits, Role.CLIENT), on, s.reveal_float(y, Role.CLIENT)

    relu_out, on, y = run_local(job)[0]
    assert float((relu_out - torch.relu(s_)).abs().max()) <= ULP
    assert on.rounds == 4
    n = s_.numel()
    assert n * 18.25 <= on.payload_bytes <= n * 18.25 + tree_padding(4) + 2
    assert float((y - ref).abs().max()) <= 1.1e-3 * float(ref.abs().max()) + 64 * ULP
    with pytest.raises(ValueError, match="unknown ReLU"):
        relu_softmax(FloatOps(), s_, mask, spec, relu="bogus")


def test_the_server_view_of_the_segments_does_not_depend_on_v():
    """Every opening of SMU1 (the sign test's and the knots' narrow openings, the products' masked
    differences, the truncation's, the AND and b2a openings) is masked by fresh dealer randomness: the
    server's bytes for v = 0 and for v spread over the domain have the same distribution, message by
    message (low byte, and for the int32 narrow openings also their top byte)."""
    n = 6000

    def body(s, vs):
        smu1_segments(ShareOps(s), vs)

    a = server_messages(body, torch.zeros(n, dtype=torch.float64))
    v = torch.linspace(-450, 450, n, dtype=torch.float64)
    b = server_messages(body, v)
    assert len(a) == len(b) >= 8
    assert_same_views(a, b)
    # the check has power: |v| in the clear in place of the sign test's masked opening fails it
    leaky = list(b)
    i = next(j for j, t in enumerate(leaky) if t.dtype == torch.int64)
    leaky[i] = FixedPoint(16).encode(v.abs())
    with pytest.raises(AssertionError):
        assert_same_views(a, leaky)
