import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def rng():
    """Test data only (never protocol randomness, which comes from AES-CTR)."""
    return np.random.default_rng(1234)


def uniform(rng, shape, lo=-4.0, hi=4.0):
    return torch.from_numpy(rng.uniform(lo, hi, shape))
