"""Nonlinear functions built from protocols, written once for float, ring-simulation and shares.

``rsqrt`` (Newton with the ``comet``, ``constant``, ``crypten`` or ``insecure_comet_small_flood``
initial guess), and from it ``sqrt``, ``reciprocal``, ``smu``, ``relu_softmax``, ``layernorm``;
baselines ``crypten_*``, ``quad_gelu``, ``quad2_softmax``, ``gelu_erf``, ``gelu_tanh``,
``relu2_softmax``; the original functions by splines (``approx.splines``: ``activation`` for GeLU/SiLU,
``softmax_exp``) and ``rmsnorm``.  Backends: ``FloatOps``, ``RingOps``, ``ShareOps``.
"""

from .backends import FloatOps, RingOps, ShareOps
from .functions import (
    crypten_exp,
    crypten_inv_sqrt,
    crypten_reciprocal,
    crypten_sigmoid,
    crypten_softmax,
    gelu_erf,
    gelu_tanh,
    layernorm,
    quad2_softmax,
    quad_gelu,
    reciprocal,
    relu2_softmax,
    relu_softmax,
    rmsnorm,
    sigmoid,
    smooth_relu,
    smu,
    softmax_exp,
    sqrt,
)
from .newton import Guess, NewtonForm, RsqrtSpec, rsqrt
from .splines import activation, exp_neg

__all__ = [
    "FloatOps", "RingOps", "ShareOps", "Guess", "NewtonForm", "RsqrtSpec", "rsqrt", "sqrt", "reciprocal", "smu",
    "smooth_relu", "relu_softmax", "layernorm", "crypten_exp", "crypten_reciprocal", "crypten_sigmoid", "sigmoid",
    "crypten_inv_sqrt", "crypten_softmax", "quad_gelu", "quad2_softmax", "gelu_erf", "gelu_tanh", "relu2_softmax",
    "rmsnorm", "softmax_exp", "activation", "exp_neg",
]
