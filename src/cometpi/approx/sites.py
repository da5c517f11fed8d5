"""Default domains of the rsqrt call sites, chosen from measured activations.

``cometpi bench ranges`` ran all-MiniLM-L6-v2 (real weights) on 512 real sentences
(bench/results/ranges.json, docs/ranges.md).  Measured, over all layers:

* SMU (GeLU's replacement) sees z = x^2 + mu^2: with mu = 0.363, z in [0.1318, 622.1]
  (p99.9 = 29.8): domain [mu^2, 1024].
* ReLU-softmax sees the row sums S = sum_j relu(s_ij) in [0, 532.8] (p0.1 = 0.95; all-negative rows
  give 0): with the guard eps = 0.01, domain [0.01, 1024].
* LayerNorm sees var + eps in [0.0032, 132.4]: domain [1e-3, 256].

Each domain keeps a margin of about 1.6-2x above the largest value measured.
"""

from __future__ import annotations

from .newton import RsqrtSpec

SMU_MU = 0.363  # the first author's prototype's initial mu
SOFTMAX_EPS = 1e-2
LAYERNORM_EPS = 1e-12  # BERT's

DOMAINS = {
    "smu": (SMU_MU**2 * 0.999, 1024.0),
    "softmax_sum": (SOFTMAX_EPS, 1024.0),
    "layernorm_var": (1e-3, 256.0),
}


def site_spec(site: str, **kw) -> RsqrtSpec:
    """The rsqrt spec of a call site (``smu``, ``softmax_sum``, ``layernorm_var``); keywords override
    the guess (default comet, sigma 40), target (1e-3), form or iterations."""
    if site not in DOMAINS:
        raise ValueError(f"unknown rsqrt call site {site!r}; known: {sorted(DOMAINS)}")
    lo, hi = DOMAINS[site]
    return RsqrtSpec(lo, hi, site=site, **kw)
