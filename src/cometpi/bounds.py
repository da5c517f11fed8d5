"""Worst-case bounds of every rsqrt input and every headroom-limited value, from the weights alone.

For a post-LN encoder (BERT, RoBERTa) every LayerNorm output is bounded whatever the input:
|c_i| / sqrt(var) <= sqrt(d) for the centred value c, so |h_i| <= |gamma_i| sqrt(d) + |beta_i|.  Each
linear map then bounds its outputs by |x|_bound @ |W| + |b|, ReLU-softmax weights are non-negative
and sum to below 1 (so the attention context is bounded by the values), and SMU(x) <= |x| + mu/2.
The server, who holds the weights, can compute these; they are provable for any token sequence of
any length up to ``length`` (it only enters the row sums).  ``worst_case`` returns them per call
site; docs/correctness.md compares them with the headroom bounds.
"""

from __future__ import annotations

import math

import torch


def _lin(xb: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = xb @ w.abs()
    return out + b.abs() if b is not None else out


def _ln(xb: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(output bound per channel, max |x - mean|, max var) for an input bounded by xb per channel."""
    d = xb.numel()
    centred = xb + xb.mean()  # |x_i - mean| <= |x_i| + |mean|
    return gamma.abs() * math.sqrt(d) + beta.abs(), float(centred.max()), float((centred**2).mean())


def worst_case(arch, params: dict, *, length: int, smu_mu: float | torch.Tensor = 0.363,
               relu_mu: float = 0.1, softmax_eps: float = 1e-2) -> dict:
    """Provable maxima per site for a post-LN encoder: ``smu`` (z = x^2 + mu^2), ``softmax_relu``
    (z = s^2 + mu^2), ``softmax_sum`` (S + eps), ``layernorm_var``, ``layernorm_centred`` (|x - mean|)
    and ``pooler`` (|input|).  ``params`` as ``convert.from_hf`` returns them (float)."""
    if arch.pre_ln or arch.kind not in ("bert", "roberta"):
        raise ValueError(f"worst-case bounds are derived for post-LN encoders (BERT, RoBERTa), not {arch.kind}")
    p = {k: v.to(torch.float64) for k, v in params.items()}
    d, nh = arch.hidden, arch.heads
    hs = d // nh
    out = {k: 0.0 for k in ("smu", "softmax_relu", "softmax_sum", "layernorm_var", "layernorm_centred", "pooler")}

    def ln(xb, name):
        h, c, v = _ln(xb, p[name + ".weight"], p[name + ".bias"])
        out["layernorm_centred"] = max(out["layernorm_centred"], c)
        out["layernorm_var"] = max(out["layernorm_var"], v)
        return h

    emb = p["embeddings.word"].abs().amax(0) + p["embeddings.position"].abs().amax(0)
    if "embeddings.token_type" in p:
        emb = emb + p["embeddings.token_type"].abs().amax(0)
    h = ln(emb, "embeddings.ln")
    for i in range(arch.layers):
        qkv = _lin(h, p[f"layers.{i}.attn.qkv.weight"], p[f"layers.{i}.attn.qkv.bias"])
        q, k, v = qkv[:d] / math.sqrt(hs), qkv[d:2 * d], qkv[2 * d:]
        s = max(float((q[j * hs:(j + 1) * hs] * k[j * hs:(j + 1) * hs]).sum()) for j in range(nh))
        out["softmax_relu"] = max(out["softmax_relu"], s * s + relu_mu**2)
        out["softmax_sum"] = max(out["softmax_sum"], length * (s + relu_mu / 2) + softmax_eps)
        a = _lin(v, p[f"layers.{i}.attn.out.weight"], p[f"layers.{i}.attn.out.bias"])
        h = ln(h + a, f"layers.{i}.ln1")
        u = _lin(h, p[f"layers.{i}.ffn.up.weight"], p[f"layers.{i}.ffn.up.bias"])
        mu = p.get(f"layers.{i}.ffn.smu_mu", torch.as_tensor(smu_mu, dtype=torch.float64)).abs()
        out["smu"] = max(out["smu"], float((u * u + mu * mu).max()))
        f = _lin(u + mu / 2, p[f"layers.{i}.ffn.down.weight"], p[f"layers.{i}.ffn.down.bias"])
        h = ln(h + f, f"layers.{i}.ln2")
    if "pooler.weight" in p:
        out["pooler"] = float(_lin(h, p["pooler.weight"], p["pooler.bias"]).max())
    return out
