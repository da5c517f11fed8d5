"""Default domains of the rsqrt call sites, chosen from measured activations at full length.

``cometpi bench sites`` (bench/results/sites.md, docs/ranges.md) ran the fine-tuned demo model
(MiniLM-L6 with SMU and ReLU-softmax) and a random-weight BERT-base on real sentences and on long
and adversarial texts (a complaint repeated, one token repeated, punctuation, very long words,
random word pieces, digits) at 128, 256 and 512 tokens.  Largest inputs measured:

* SMU z = x^2 + mu^2: 631 (real sentences), 554 (adversarial, 128-512 tokens): domain [mu^2, 2048].
* the smooth ReLU inside ReLU-softmax, z = s^2 + mu_relu^2: 9,533 on real sentences, 12,960 at 512
  adversarial tokens (attention scores up to |s| ~ 114): domain [mu_relu^2 / 2, 2^15].
* the ReLU-softmax row sums S + eps: 418 (real), 1,250 / 4,307 / 8,089 at 128 / 256 / 512 adversarial
  tokens: domain [0.01, 2^14].
* LayerNorm var + eps: 133 (MiniLM), 1.4 (random BERT-base): domain [1e-3, 256].
* the original softmax's row sums exp(s - max): in [1, T] by construction: domain [0.5, 2^14].
* RMSNorm mean(x^2) + eps in SmolLM2-135M: 6e-3 to 1.1e6 (its residual stream holds massive
  activations, |x| up to 2.5e4): domain [1e-3, 2^22] (the rsqrt keeps 12 extra bits).

The first sweep (512 short sentences, the base model) had set 1024 for all three of the first;
longer inputs exceeded it (issue 15).  Each domain now keeps a margin of about 2x above the
largest value measured; an input beyond it is not corrupted (Newton undershoots) until
``RsqrtSpec.headroom_max``, which ``RingOps`` enforces in simulation.
"""

from __future__ import annotations

from ..protocols.compare import ROW_TABLE_BYTES
from .newton import RsqrtSpec

SMU_MU = 0.363  # the first author's prototype's initial mu
RELU_MU = 0.1  # the smooth ReLU of ReLU-softmax
SOFTMAX_EPS = 1e-2
LAYERNORM_EPS = 1e-12  # BERT's

DOMAINS = {
    "smu": (SMU_MU**2 * 0.999, 2048.0),
    "softmax_relu": (RELU_MU**2 / 2, 2.0**15),
    "softmax_sum": (SOFTMAX_EPS, 2.0**14),
    "layernorm_var": (1e-3, 256.0),
    "softmax_exp_sum": (0.5, 2.0**14),
    "rmsnorm_ms": (1e-3, 2.0**22),
}

#: Sites with one rsqrt per row (a norm's statistic, a softmax row's sum): few values, so the thermometer
#: guess may use bigger comparison tables for fewer rounds.
ROW_SITES = frozenset({"softmax_sum", "layernorm_var", "softmax_exp_sum", "rmsnorm_ms"})
#: Thermometer thresholds per octave at those sites: t0 within 2^(+-1/256), so one Newton step reaches 1.1e-5
#: (derived), the precision two steps gave from 4 per octave (1.3e-5), for 16x the thresholds of one row value:
#: about 2 KB online per row instead of 6 rounds.
ROW_PER_OCTAVE = 64


def site_spec(site: str, **kw) -> RsqrtSpec:
    """The rsqrt spec of a call site (``smu``, ``softmax_relu``, ``softmax_sum``, ``layernorm_var``); keywords override
    the guess (default comet, sigma 40), target (1e-3), form or iterations."""
    if site not in DOMAINS:
        raise ValueError(f"unknown rsqrt call site {site!r}; known: {sorted(DOMAINS)}")
    lo, hi = DOMAINS[site]
    if site in ROW_SITES:  # few values: bigger tables, 64 thresholds per octave (t0 within 2^(+-1/256): 1 Newton step)
        kw.setdefault("table_bytes", ROW_TABLE_BYTES)
        kw.setdefault("per_octave", ROW_PER_OCTAVE)
    return RsqrtSpec(lo, hi, site=site, **kw)
