import numpy as np
import pytest
import torch

from cometpi.ring import (
    AesCtrPrg,
    FixedPoint,
    limbs_needed,
    logical_rshift,
    msb,
    random_ring,
    ring_matmul,
    ring_matmul_reference,
    to_unsigned_float,
)


def test_encode_decode_within_half_ulp(rng):
    fp = FixedPoint(16)
    x = torch.from_numpy(rng.uniform(-1000, 1000, 10_000))
    assert float((fp.decode(fp.encode(x)) - x).abs().max()) <= 0.5 * fp.ulp


@pytest.mark.parametrize("f", [0, 8, 16, 24])
def test_encode_is_exact_on_the_grid(f):
    fp = FixedPoint(f)
    k = torch.arange(-5000, 5000, dtype=torch.int64)
    assert torch.equal(fp.encode(fp.decode(k)), k)


def test_encode_rejects_overflow_and_nan():
    fp = FixedPoint(16)
    with pytest.raises(OverflowError, match="headroom"):
        fp.encode([2.0**47])
    with pytest.raises(ValueError, match="NaN"):
        fp.encode([float("nan")])
    with pytest.raises(ValueError):
        FixedPoint(40)
    with pytest.raises(OverflowError, match="bits before truncation"):
        fp.check_product_headroom(2**16, 2**16)
    fp.check_product_headroom(2**10, 2**10)


def test_ring_wraps_mod_2_64():
    a = torch.tensor([2**63 - 1], dtype=torch.int64)
    assert int(a + 1) == -(2**63)
    assert int(a * 2) == -2


@pytest.mark.parametrize("shape", [((3, 5), (5, 4)), ((1, 17), (17, 1)), ((6, 1), (1, 7))])
def test_limb_matmul_matches_exact_reference(shape):
    a, b = random_ring(*shape)
    assert torch.equal(ring_matmul(a, b, method="limbs"), ring_matmul_reference(a, b))
    assert torch.equal(ring_matmul(a, b, method="int64"), ring_matmul_reference(a, b))


def test_limb_matmul_batched_and_extremes():
    a, b = random_ring((2, 3, 4, 9), (2, 3, 9, 5))
    ref = torch.stack([torch.stack([ring_matmul_reference(a[i, j], b[i, j]) for j in range(3)])
                       for i in range(2)])
    assert torch.equal(ring_matmul(a, b, method="limbs"), ref) and torch.equal(ring_matmul(a, b), ref)
    ext = torch.tensor([[-(2**63), 2**63 - 1], [-1, 2**62]], dtype=torch.int64)
    assert torch.equal(ring_matmul(ext, ext), ring_matmul_reference(ext, ext))


def test_small_weight_limbs_are_exact_within_their_bound(rng):
    (a,) = random_ring((8, 40))
    fp = FixedPoint(16)
    w = fp.encode(torch.from_numpy(rng.uniform(-0.9, 0.9, (40, 6))))
    n = limbs_needed(int(w.abs().max()))
    assert n == 2
    assert torch.equal(ring_matmul(a, w, b_limbs=n, method="limbs"), ring_matmul_reference(a, w))
    # the bound matters for the limb split (off the CPU): a value needing 3 limbs is wrong with 2
    big = torch.full((1, 1), 2**40, dtype=torch.int64)
    assert not torch.equal(ring_matmul(a[:, :1], big, b_limbs=2, method="limbs"), ring_matmul_reference(a[:, :1], big))
    # the CPU default (torch's int64 matmul, which wraps modulo 2^64) needs no bound
    assert torch.equal(ring_matmul(a[:, :1], big, b_limbs=2), ring_matmul_reference(a[:, :1], big))
    assert torch.equal(ring_matmul(a, w), ring_matmul_reference(a, w))


def test_limbs_needed():
    assert limbs_needed(0) == 1
    assert limbs_needed(2**15 - 1) == 1
    assert limbs_needed(2**15) == 2
    assert limbs_needed(2**62) == 4


def test_prg_is_deterministic_per_seed_and_index():
    seed = bytes(range(16))
    a1, b1 = AesCtrPrg(seed).ring(7, (4, 4), (3,))
    a2, b2 = AesCtrPrg(seed).ring(7, (4, 4), (3,))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    (c,) = AesCtrPrg(seed).ring(8, (4, 4))
    assert not torch.equal(a1, c)
    with pytest.raises(ValueError, match="16 bytes"):
        AesCtrPrg(b"short")


def test_prg_ring_is_the_keystream_read_as_little_endian_int64():
    """The ring tensors are AES-CTR's keystream (written in place into the tensors' memory), read as
    little-endian int64, in order over the shapes; an empty shape takes nothing."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(16))
    prg = AesCtrPrg(seed)
    a, e, b = prg.ring(5, (3, 2), (0,), (5,))
    stream = Cipher(algorithms.AES(seed), modes.CTR((5).to_bytes(8, "big") + bytes(8))).encryptor().update(bytes(88))
    want = torch.from_numpy(np.frombuffer(stream, dtype="<i8").copy())
    assert torch.equal(torch.cat([a.flatten(), e, b]), want) and a.shape == (3, 2) and e.numel() == 0
    assert prg.bytes(5, 88) == stream
    (c,) = prg.ring(b"label", (7,))
    assert torch.equal(c, torch.from_numpy(np.frombuffer(prg.bytes(b"label", 56), dtype="<i8").copy()))


def test_prg_output_looks_uniform():
    (x,) = random_ring((1 << 16,))
    bits = ((x.unsqueeze(1) >> torch.arange(64)) & 1).double().mean(0)
    # each bit's mean over 65536 samples: 0.5 +- 6 sigma (sigma = 0.00195)
    assert float((bits - 0.5).abs().max()) < 0.012
    u = to_unsigned_float(x) / 2.0**64
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_shift_helpers():
    x = torch.tensor([-1, 2**40, -(2**63)], dtype=torch.int64)
    assert logical_rshift(x, 16).tolist() == [2**48 - 1, 2**24, 2**47]
    assert msb(x).tolist() == [1, 0, 1]
    assert np.isclose(float(to_unsigned_float(torch.tensor([-1]))[0]), 2.0**64)


def test_limb_matmul_with_a_precomputed_weight_split():
    """``b_stack`` (a constant weight's limbs, split once: the limb path off the CPU) gives the same
    exact product; a stack with the wrong number of limbs is refused."""
    from cometpi.ring import limb_stack

    a, b = random_ring((5, 9), (9, 4))
    ref = ring_matmul_reference(a, b)
    assert torch.equal(ring_matmul(a, b, method="limbs", b_stack=limb_stack(b, 4)), ref)
    small = b >> 40  # |b| < 2^24: 2 limbs
    assert torch.equal(ring_matmul(a, small, method="limbs", b_limbs=2, b_stack=limb_stack(small, 2)),
                       ring_matmul_reference(a, small))
    with pytest.raises(ValueError, match="limbs"):
        ring_matmul(a, b, method="limbs", b_stack=limb_stack(b, 2))
