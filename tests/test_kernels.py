"""Kernels chosen by measurement (``cometpi.kernels``): whichever ring-matmul method wins, the product is
exact (equal, bit for bit, to Python integers), the choice is kept per shape class, a fixed policy is
obeyed, and two methods that disagree raise instead of passing silently."""

import pytest
import torch

from cometpi import kernels, ring
from cometpi.ring import random_ring, ring_matmul, ring_matmul_reference


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.set_policy(None)
    yield
    kernels.set_policy(None)


@pytest.mark.parametrize("diagonals", [4, 2])
def test_auto_measures_once_per_class_and_is_exact(diagonals):
    a, b = random_ring((48, 96), (96, 40))
    out = ring_matmul(a, b, diagonals=diagonals)
    ref = ring.wrap_bits(ring_matmul_reference(a, b), 16 * diagonals)
    assert torch.equal(out, ref)
    rep = kernels.report()
    assert rep["policy"] == "auto" and sum(rep["classes_by_kernel"].values()) == 1
    (cls,) = rep["classes"].values()
    assert cls["kernel"] in ("int64", "limbs") and cls["int64"] > 0 and cls["limbs"] > 0
    a2, b2 = random_ring((40, 90), (90, 33))  # the same class (48->64, 96->128, 40->64): not measured again
    assert torch.equal(ring_matmul(a2, b2, diagonals=diagonals),
                       ring.wrap_bits(ring_matmul_reference(a2, b2), 16 * diagonals))
    assert len(kernels.report()["classes"]) == 1
    assert kernels.kernel_label() == cls["kernel"]


def test_small_weights_and_batches_stay_exact_under_auto():
    a = random_ring((2, 3, 64, 64))[0]
    w = torch.randint(-(2**14), 2**14, (64, 64), dtype=torch.int64)
    ref = torch.stack([torch.stack([ring_matmul_reference(a[i, j], w) for j in range(3)]) for i in range(2)])
    assert torch.equal(ring_matmul(a, w, b_limbs=1), ref)


@pytest.mark.parametrize("fixed", ["int64", "limbs"])
def test_a_fixed_policy_is_obeyed(monkeypatch, fixed):
    monkeypatch.setenv(kernels.ENV, fixed)
    calls = []
    real = ring._balanced_limbs
    monkeypatch.setattr(ring, "_balanced_limbs", lambda x, n: calls.append(n) or real(x, n))
    a, b = random_ring((64, 64), (64, 64))
    assert torch.equal(ring_matmul(a, b), ring_matmul_reference(a, b))
    assert bool(calls) == (fixed == "limbs")
    assert kernels.report()["classes"] == {} and kernels.kernel_label() == fixed


def test_an_unknown_policy_names_itself(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="COMETPI_RING_MATMUL='fast'"):
        ring_matmul(*random_ring((64, 64), (64, 64)))
    with pytest.raises(ValueError, match="unknown ring-matmul policy"):
        kernels.set_policy("gpu")


def test_methods_that_disagree_raise(monkeypatch):
    real = ring._balanced_limbs
    monkeypatch.setattr(ring, "_balanced_limbs", lambda x, n: [l + (i == 0) for i, l in enumerate(real(x, n))])
    with pytest.raises(kernels.KernelMismatch, match="differ"):
        ring_matmul(*random_ring((64, 64), (64, 64)))


def test_tiny_products_are_not_measured():
    a, b = random_ring((4, 8), (8, 4))
    assert torch.equal(ring_matmul(a, b), ring_matmul_reference(a, b))
    assert kernels.report()["classes"] == {}


def test_a_large_product_is_measured_on_a_corner(monkeypatch):
    """Above PROBE_MACS the choice is measured on a corner of the product (the largest dimension halved
    until it fits), not on the full product twice; the full product is then computed once, by the
    winner, and is exact."""
    monkeypatch.setattr(kernels, "PROBE_MACS", 1 << 17)
    a, b = random_ring((64, 512), (512, 64))  # 2^21 multiply-adds: probed on 64 x 64 @ 64 x 64 (no side below 64)
    assert kernels.probe_dims(a, b) == (64, 64, 64)
    seen = []
    real = kernels._best
    monkeypatch.setattr(kernels, "_best", lambda fn, rep: seen.append(fn()) or real(fn, rep))
    assert torch.equal(ring_matmul(a, b), ring_matmul_reference(a, b))
    assert seen and all(t.shape == (64, 64) for t in seen)
    assert kernels.probe_dims(*random_ring((4, 8), (8, 4))) is None


def test_an_inner_dimension_beyond_the_limb_split_takes_int64():
    """k >= 2^21 is outside the limb split's exact range: auto takes int64 (no probe that would raise)."""
    k = kernels.LIMB_MAX_INNER
    a, b = random_ring((1, k), (k, 1))
    assert torch.equal(ring_matmul(a, b), (a.reshape(-1) * b.reshape(-1)).sum().reshape(1, 1))
    assert kernels.report()["classes"] == {}


def test_a_wide_right_operand_is_cut_for_the_probe(monkeypatch):
    """A one-row product with a wide b (a vocabulary head) is probed on a slice of b's columns."""
    monkeypatch.setattr(kernels, "PROBE_B_ELEMENTS", 1 << 12)
    a, b = random_ring((1, 64), (64, 1024))
    assert kernels.probe_dims(a, b) == (1, 64, 64)
    assert torch.equal(ring_matmul(a, b), ring_matmul_reference(a, b))
