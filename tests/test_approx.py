"""Nonlinear approximations: each is swept over its documented domain on the ring simulation
(dense) and on shares (in-process, two parties), against float64 plaintext; costs against counters.

Tolerances: |y - ref| <= rel * |ref| + k ulp, with ulp = 2^-16.
"""

import math
import warnings

import pytest
import torch

from cometpi import protocols as P
from cometpi.approx import (
    FloatOps,
    RingOps,
    RsqrtSpec,
    ShareOps,
    crypten_exp,
    crypten_reciprocal,
    crypten_softmax,
    gelu_erf,
    gelu_tanh,
    layernorm,
    quad2_softmax,
    quad_gelu,
    reciprocal,
    relu2_softmax,
    relu_softmax,
    rsqrt,
    smu,
    sqrt,
)
from cometpi.approx.guess import bit_trick_error, iterations_for, local_quarter_factor, newton_t
from cometpi.approx.interface import Ops
from cometpi.core import Role
from cometpi.party import run_local
from cometpi.transport import Traffic

ULP = 2.0**-16
DOMAIN = (0.1, 40.0)


def geom(lo, hi, n):
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)


def within(y, ref, rel, ulps):
    err = (y - ref).abs()
    bound = rel * ref.abs() + ulps * ULP
    return bool((err <= bound).all()), float((err / bound).max())


def on_shares(fn, x, *extra):
    """Run fn(ops, shared x) on two in-process parties; returns (revealed float, online Traffic)."""

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
        before = s.meter.snapshot()
        y = fn(ShareOps(s), xs, *extra)
        after = s.meter.snapshot()
        on = sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())
        return s.reveal_float(y, Role.CLIENT), on

    return run_local(job)[0]


def on_ring(fn, x, *extra):
    ops = RingOps()
    return ops.output(fn(ops, ops.input(x), *extra))


# --------------------------------------------------------------------------------------------------
# rsqrt and its guesses
# --------------------------------------------------------------------------------------------------


def test_bit_trick_factor_error_band():
    lo, hi = bit_trick_error()
    assert 0.96 < lo < 1 < hi < 1.04
    v = torch.tensor([1e-3, 0.7, 3.0, 2.0**45, -5.0], dtype=torch.float64)
    exact = local_quarter_factor(v, False)
    assert torch.allclose(exact, 2**-0.25 * v.abs() ** -0.25)
    ratio = local_quarter_factor(v, True) / exact
    assert bool(((ratio >= lo - 1e-12) & (ratio <= hi + 1e-12)).all())
    # balanced shares: g0 g1 = 1/sqrt(|s0| + |s1|) exactly with pow
    s = torch.tensor([3.0, 50.0])
    assert torch.allclose(local_quarter_factor(s, False) ** 2, 1 / torch.sqrt(2 * s))


def test_iteration_count_is_the_fewest_that_converge():
    n = iterations_for(0.01, 0.7, 1e-4)
    t = newton_t(torch.tensor([0.01, 0.7]).numpy(), n)
    assert abs(1 - t).max() <= 1e-4
    assert abs(1 - newton_t(torch.tensor([0.01]).numpy(), n - 1)).max() > 1e-4
    with pytest.raises(ValueError, match="diverges"):
        iterations_for(0.1, 1.8, 1e-3)


@pytest.mark.parametrize("guess,kw", [("constant", {}), ("crypten", {}), ("comet", {"sigma": 10}),
                                      ("comet", {"sigma": 20}), ("comet", {"sigma": 40}),
                                      ("comet", {"sigma": 40, "bit_trick": False}),
                                      ("comet", {"sigma": 20, "form": "two_round"})])
def test_rsqrt_meets_its_target_over_the_domain_on_the_ring(guess, kw):
    spec = RsqrtSpec(*DOMAIN, guess=guess, target=1e-3, **kw)
    x = torch.cat([geom(*DOMAIN, 4000), torch.tensor(DOMAIN)])
    ok, worst = within(on_ring(rsqrt, x, spec), x.rsqrt(), 1e-3, 0)
    assert ok, f"worst error is {worst:.2f} x the bound"


def test_rsqrt_on_shares_error_and_cost():
    x = geom(*DOMAIN, 64)
    n = x.numel()
    # constant guess: no round for the guess; each Newton step 3 products with exact truncation
    spec = RsqrtSpec(*DOMAIN, guess="constant")
    k = spec.n_iterations()
    y, on = on_shares(rsqrt, x, spec)
    assert within(y, x.rsqrt(), 1e-3, 0)[0]
    assert (on.payload_bytes, on.rounds) == (144 * n * k, 6 * k)
    # comet guess: + flood reshare (8 B) + private product (16 B) + its truncation (16 B), 3 rounds
    spec = RsqrtSpec(*DOMAIN, guess="comet", sigma=30)
    assert spec.prescale_bits(16) == 0
    k = spec.n_iterations()
    y, on = on_shares(rsqrt, x, spec)
    assert within(y, x.rsqrt(), 1e-3, 0)[0]
    assert (on.payload_bytes, on.rounds) == (40 * n + 144 * n * k, 3 + 6 * k)
    assert spec.security_bits() == pytest.approx(30)


def test_two_round_newton_form_costs_four_rounds_per_step():
    x = geom(*DOMAIN, 32)
    spec = RsqrtSpec(*DOMAIN, guess="constant", form="two_round")
    k = spec.n_iterations()
    y, on = on_shares(rsqrt, x, spec)
    assert within(y, x.rsqrt(), 1e-3, 0)[0]
    assert (on.payload_bytes, on.rounds) == (144 * x.numel() * k, 4 * k)


def test_insecure_small_flood_warns_once_and_reports_its_sigma():
    from cometpi.approx import newton as R

    R._WARNED.discard("insecure_comet_small_flood")
    spec = RsqrtSpec(0.5, 8.0, guess="insecure_comet_small_flood", flood=50)
    assert spec.security_bits() == pytest.approx(math.log2(50 / 8))
    x = torch.linspace(0.5, 8, 100, dtype=torch.float64)
    with pytest.warns(UserWarning, match="insecure_comet_small_flood"):
        on_ring(rsqrt, x, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = on_ring(rsqrt, x, spec)  # second time: silent
    assert within(y, x.rsqrt(), 1e-3, 0)[0]
    # it converges in fewer steps than the secure flood
    assert spec.n_iterations() < RsqrtSpec(0.5, 8.0, guess="comet", sigma=40).n_iterations()


def test_large_floods_are_prescaled_to_fit_the_ring():
    """sigma = 40 over [0.13, 1024] needs F = 2^50 > 2^(62 - f): x is scaled by 2^-k first."""
    spec = RsqrtSpec(0.13, 1024.0, guess="comet", sigma=40)
    k = spec.prescale_bits(16)
    assert k >= 6 and k % 2 == 0
    x = torch.cat([geom(0.13, 1024.0, 500), torch.tensor([0.13, 1024.0])])
    assert within(on_ring(rsqrt, x, spec), x.rsqrt(), 1e-3, 0)[0]
    xs = x[::20].contiguous()
    y, on = on_shares(rsqrt, xs, spec)
    assert within(y, xs.rsqrt(), 1e-3, 0)[0]
    n = spec.n_iterations()  # + one exact truncation of x before flooding
    assert (on.payload_bytes, on.rounds) == ((16 + 40 + 144 * n) * xs.numel(), 1 + 3 + 6 * n)
    with pytest.raises(OverflowError, match="too large"):
        RsqrtSpec(*DOMAIN, guess="comet", sigma=120).prescale_bits(16)


def test_bad_domains_are_refused():
    with pytest.raises(ValueError, match="domain"):
        RsqrtSpec(5.0, 1.0)
    with pytest.raises(ValueError, match="diverges"):
        RsqrtSpec(0.1, 500.0, guess="crypten").n_iterations()


# --------------------------------------------------------------------------------------------------
# Built from rsqrt
# --------------------------------------------------------------------------------------------------


def test_sqrt_and_reciprocal():
    x = geom(*DOMAIN, 3000)
    spec = RsqrtSpec(*DOMAIN, guess="constant")
    assert within(on_ring(sqrt, x, spec), x.sqrt(), 1.1e-3, 8)[0]
    assert within(on_ring(reciprocal, x, spec), 1 / x, 2.1e-3, 8)[0]
    xs = x[::100].contiguous()
    assert within(on_shares(reciprocal, xs, spec)[0], 1 / xs, 2.1e-3, 8)[0]


SMU_SPEC = RsqrtSpec(0.1, 40.0, guess="constant")


def smu_ref(x, mu, alpha=0.0):
    return ((1 + alpha) * x + torch.sqrt(((1 - alpha) * x) ** 2 + mu**2)) / 2


def smu_bound(x, mu, alpha=0.0, target=1e-3):
    """The rsqrt target (relative) applies to sqrt(z), which SMU halves; plus 8 ulp of rounding."""
    return target * torch.sqrt(((1 - alpha) * x) ** 2 + mu**2) / 2 + 8 * ULP


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_smu_over_its_domain(alpha):
    """x in [-6, 6], mu = 0.363 -> z in [0.13, 36.1] inside SMU_SPEC's domain."""
    mu = 0.363
    x = torch.linspace(-6, 6, 4001, dtype=torch.float64)
    bound = smu_bound(x, mu, alpha)
    assert bool(((on_ring(smu, x, mu, SMU_SPEC, alpha) - smu_ref(x, mu, alpha)).abs() <= bound).all())
    xs = x[::80].contiguous()
    y, on = on_shares(smu, xs, mu, SMU_SPEC, alpha)
    assert bool(((y - smu_ref(xs, mu, alpha)).abs() <= bound[::80]).all())


def test_smu_per_channel_mu_and_float_ring_share_agree():
    mu = torch.tensor([0.4, 0.7, 1.0], dtype=torch.float64)
    x = torch.linspace(-5, 5, 60, dtype=torch.float64).reshape(20, 3)
    ref = smu_ref(x, mu)
    yf = smu(FloatOps(), x, mu, SMU_SPEC)
    yr = on_ring(smu, x, mu, SMU_SPEC)
    ys, _ = on_shares(smu, x, mu, SMU_SPEC)
    for y in (yf, yr, ys):
        assert bool(((y - ref).abs() <= smu_bound(x, mu)).all())
    assert float((yr - ys).abs().max()) < 64 * ULP  # same math, same fixed point


def softmax_inputs(rows=6, keys=10, valid=7):
    g = torch.linspace(-4, 6, rows * keys, dtype=torch.float64).reshape(rows, keys)
    scores = torch.sin(g * 3.1) * 4 + 1  # deterministic mix of signs
    mask = torch.zeros(keys, dtype=torch.int64)
    mask[:valid] = 1
    return scores, mask


def test_relu_softmax_masks_and_normalises():
    s, mask = softmax_inputs()
    spec = RsqrtSpec(0.01, 64.0, guess="constant")
    mu, eps = 0.1, 1e-2
    r = smu_ref(s, mu) * mask
    ref = r / (r.sum(-1, keepdim=True) + eps)
    y, _ = on_shares(relu_softmax, s, mask, spec)
    assert within(y, ref, 3e-3, 16)[0]
    assert torch.equal(y[:, 7:], torch.zeros(6, 3, dtype=torch.float64))
    assert within(on_ring(relu_softmax, s, mask, spec), ref, 3e-3, 16)[0]


def test_layernorm_matches_torch():
    x = torch.sin(torch.linspace(0, 40, 6 * 48, dtype=torch.float64)).reshape(6, 48) * 3 + 0.5
    gamma = torch.linspace(0.5, 1.5, 48, dtype=torch.float64)
    beta = torch.linspace(-0.2, 0.2, 48, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(x, (48,), gamma, beta, eps=1e-5)
    spec = RsqrtSpec(0.05, 20.0, guess="constant")
    y, _ = on_shares(layernorm, x, spec, gamma, beta, 1e-5)
    assert within(y, ref, 2e-3, 32)[0]


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def test_crypten_exp_and_reciprocal_over_their_domains():
    x = torch.linspace(-8, 2, 2001, dtype=torch.float64)
    # the limit (1 + x/256)^256 itself errs by about x^2/512 relative
    assert within(on_ring(crypten_exp, x), x.exp(), 0.13, 16)[0]
    x = geom(0.1, 100, 2001)
    assert within(on_ring(crypten_reciprocal, x), 1 / x, 1e-3, 16)[0]


def test_quad_gelu_is_exact_polynomial():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    y, on = on_shares(quad_gelu, x)
    assert within(y, 0.125 * x * x + 0.25 * x + 0.5, 0, 4)[0]
    assert on.rounds == 2  # one square with exact truncation


def test_gelu_approximations_over_their_domains():
    gelu = torch.nn.functional.gelu
    x = torch.linspace(-2, 2, 1201, dtype=torch.float64)
    assert within(on_ring(gelu_erf, x), gelu(x), 0, 1e-3 / ULP)[0]
    x = torch.linspace(-12, 12, 2401, dtype=torch.float64)
    assert within(on_ring(gelu_tanh, x), gelu(x, approximate="tanh"), 0, 2e-3 / ULP)[0]
    xs = x[::100].contiguous()
    assert within(on_shares(gelu_tanh, xs)[0], gelu(xs, approximate="tanh"), 0, 2e-3 / ULP)[0]


def test_softmax_baselines_on_shares():
    s, mask = softmax_inputs(rows=3, keys=8, valid=6)
    ref = torch.softmax(s.masked_fill(mask == 0, -1e9), -1)
    y, _ = on_shares(crypten_softmax, s, mask)
    assert within(y, ref, 2e-2, 64)[0]
    q = ((s + 5) ** 2) * mask
    y, _ = on_shares(quad2_softmax, s, mask)
    assert within(y, q / q.sum(-1, keepdim=True), 2e-2, 64)[0]
    spec = RsqrtSpec(0.01, 64.0, guess="constant")
    r = torch.relu(s) * mask
    y, _ = on_shares(relu2_softmax, s, mask, spec)
    assert within(y, r / (r.sum(-1, keepdim=True) + 1e-2), 3e-3, 16)[0]


# --------------------------------------------------------------------------------------------------
# Secure comparison
# --------------------------------------------------------------------------------------------------


def test_drelu_relu_over_the_ring_domain_and_cost():
    k = torch.arange(0, 61, dtype=torch.float64)
    ints = torch.cat([2**k, -(2**k), 2**k - 1, 1 - 2**k, torch.tensor([0.0, 2**61, -(2**61), -1.0])])
    ints = ints.to(torch.int64)[:248]  # a multiple of 8 elements: bits pack exactly
    n = ints.numel()

    def job(s):
        x = s.share(ints, owner=Role.CLIENT, shape=ints.shape, encoded=True)
        before = s.meter.snapshot()
        d = P.drelu(x)
        after = s.meter.snapshot()
        on = sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())
        r = P.relu(x)
        return s.reveal(d, Role.CLIENT), s.reveal(r, Role.CLIENT), on

    (d, r, on), _ = run_local(job)
    assert torch.equal(d, (ints >= 0).to(torch.int64))
    assert torch.equal(r, torch.where(ints >= 0, ints, 0))
    assert "Cost: 8 rounds, 16 B + 480 bits + 2 bits = 76.25 B/element" in P.drelu.__doc__
    assert on.rounds == 8 and on.payload_bytes == int(76.25 * n)


def test_max_and_argmax():
    x = torch.tensor([[0.5, -2.0, 3.25, 3.0, -7.0], [-1.0, -0.5, -3.0, -0.75, -9.0]], dtype=torch.float64)

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
        return s.reveal_float(P.maximum(xs), Role.CLIENT), s.reveal(P.argmax_onehot(xs), Role.CLIENT)

    (m, am), _ = run_local(job)
    assert torch.equal(m, x.amax(-1, keepdim=True))
    assert torch.equal(am, torch.nn.functional.one_hot(x.argmax(-1), 5))


def test_composite_costs_match_their_docstrings():
    """Each composite's cost is the sum of its documented parts (exact truncation: a product is
    48 B/element and 2 rounds, a square 32 B and 2 rounds)."""
    x = torch.linspace(-3, 3, 40, dtype=torch.float64)
    n = x.numel()
    spec = RsqrtSpec(0.1, 40.0, guess="constant")
    k = spec.n_iterations()
    rs_b, rs_r = 144 * k, 6 * k
    # square (its truncation round also halves x: +16 B) + rsqrt + product (truncated by f + 1)
    _, on = on_shares(smu, x, 0.5, spec)
    assert (on.payload_bytes, on.rounds) == (n * (32 + 16 + rs_b + 48), 2 + rs_r + 2)
    _, on = on_shares(crypten_exp, x)  # an exact truncation by 2^8, then 8 squarings
    assert (on.payload_bytes, on.rounds) == (n * (16 + 8 * 32), 1 + 16)
    xr = torch.linspace(0.5, 30, 40, dtype=torch.float64)
    _, on = on_shares(reciprocal, xr, spec)  # rsqrt + square
    assert (on.payload_bytes, on.rounds) == (n * (rs_b + 32), rs_r + 2)
    # layernorm over rows of 8: 2 means (a public product: 1 truncation, 16 B/row, 1 round each),
    # square (32 B/elt), rsqrt per row, product by the row's rsqrt (the square's opening is its other side:
    # 16 B/row and the truncation's 16 B/elt)
    rows = torch.sin(torch.arange(40, dtype=torch.float64)).reshape(5, 8) * 2
    lspec = RsqrtSpec(0.05, 20.0, guess="constant")
    kl = lspec.with_(lo=0.05 * 256, hi=20.0 * 256).n_iterations()
    _, on = on_shares(layernorm, rows, lspec)
    assert (on.payload_bytes, on.rounds) == (5 * 16 + 40 * 32 + 5 * 16 + 5 * 144 * kl + 40 * 16 + 5 * 16,
                                             1 + 2 + 1 + 6 * kl + 2)


def test_softmax_and_root_costs_match_their_docstrings():
    spec = RsqrtSpec(0.1, 40.0, guess="constant")
    k = spec.n_iterations()
    x = torch.linspace(0.5, 30, 16, dtype=torch.float64)
    _, on = on_shares(sqrt, x, spec)  # rsqrt + 1 product
    assert (on.payload_bytes, on.rounds) == (16 * (144 * k + 48), 6 * k + 2)
    # 2Quad over rows of 8: square (32 B/elt), an exact 6-bit truncation of the row sums (16 B/row,
    # 1 round), CrypTen's reciprocal on them (exp: a truncation and 8 squarings; 10 steps of 2
    # products), the final product by the row's reciprocal (32 B/elt + 16 B/row, its truncation also divides
    # by 64)
    s, mask = softmax_inputs(rows=2, keys=8, valid=8)
    _, on = on_shares(quad2_softmax, s, mask)
    recip = 16 + 8 * 32 + 16 + 10 * 96  # exp, the public product by 3, Newton
    assert (on.payload_bytes, on.rounds) == (16 * 32 + 2 * 16 + 2 * recip + 16 * 32 + 2 * 16,
                                             2 + 1 + (17 + 1 + 40) + 2)


def test_every_backend_implements_the_declared_interface():
    """``approx.interface``: the backend interface declared once; the three arithmetic backends and the
    three model backends implement every method with its parameters (and the check can fail)."""
    from cometpi.approx.interface import ModelOps, missing
    from cometpi.weights import FloatModel, RingModel, ShareModel

    for cls in (FloatOps, RingOps, ShareOps, FloatModel, RingModel, ShareModel):
        assert missing(cls, ModelOps if cls.__name__.endswith("Model") else Ops) == [], cls.__name__

    class Partial(FloatOps):
        def mul(self, a, c, extra=0):  # another parameter name
            return a * c

        sign = None

    assert missing(Partial) == ["mul('self', 'a', 'c', 'extra'): expected ('self', 'a', 'b', 'extra')",
                                "sign: missing"]
