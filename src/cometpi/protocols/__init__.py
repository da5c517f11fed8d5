"""Interactive protocols on additive shares: products, truncation, private-weight matmul, re-sharing.

Every protocol runs SPMD: both parties call the same function with their own shares.  Each docstring
has a ``Cost:`` line (online rounds and payload bytes on the wire, both directions together, for n
elements of output unless stated) and a ``Ref:`` line.  ``tests/test_protocols.py`` asserts every
Cost line against the transport counters.  Dealer traffic is offline and listed separately.

The package by family: ``arith`` (truncation, products, shared matmul, re-sharing), ``linear`` (private
weights, lift, embedding), ``boolean`` (AND, the comparison tree, b2a), ``narrow`` (the narrow comparison,
its select, a truncation's sign test), ``compare`` (full-ring DReLU, ReLU, max, argmax), ``rows`` (a KV
cache masked once per row); ``material`` holds the interface of the dealer material kinds, each defined
beside the protocol that consumes it and collected in ``KINDS`` below (adding a protocol touches its
family module only).
"""

from __future__ import annotations

from . import arith, compare, linear, rows
from .arith import (  # noqa: F401 - re-exported
    Kept,
    KeptPoly,
    KeptTrunc,
    Pending,
    matmul,
    matmul_public,
    mul,
    mul_kept,
    mul_many,
    mul_private_pair,
    mul_public,
    mul_truncated,
    poly_kept,
    reshare,
    square,
    square_keep,
    trunc_exact,
    trunc_local,
    truncate,
    truncate_for_mul,
    truncate_keep,
    truncate_many,
    truncate_poly,
)
from .arith import (
    _broadcast as _broadcast,
)
from .compare import (
    and_packed,
    argmax_onehot,
    b2a,
    chunk_bits,
    cmp_chunks,
    compare_bytes,
    compare_many,
    compare_rounds,
    drelu,
    drelu_narrow,
    drelu_select,
    maximum,
    relu,
    tree_ands,
    trunc_select,
)
from .linear import PrivateWeight, embedding_lookup, lift, matmul_private, prepare_weight
from .material import DealerError
from .rows import MaskedRows, matmul_rows  # noqa: F401 - re-exported

#: Every kind of dealer material, by name (the dealer serves these).
KINDS = {**arith.KINDS, **linear.KINDS, **compare.KINDS, **rows.KINDS}

__all__ = [
    "KINDS", "DealerError", "Kept", "Pending", "PrivateWeight", "and_packed", "argmax_onehot", "b2a", "chunk_bits",
    "cmp_chunks", "compare_bytes", "compare_many", "compare_rounds", "tree_ands", "drelu", "drelu_narrow",
    "drelu_select", "embedding_lookup", "lift", "matmul", "matmul_private", "matmul_public", "maximum",
    "mul", "mul_kept", "mul_many", "mul_private_pair", "mul_public", "prepare_weight", "relu", "reshare", "square",
    "trunc_exact", "trunc_local", "trunc_select", "truncate", "truncate_keep", "truncate_many",
]
