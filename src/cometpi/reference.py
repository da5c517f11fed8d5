"""The plaintext oracle of the secure layers: :func:`reference_forward`, a float64 torch forward pass that
reads cometpi's ``params`` only (no ``transformers``) with exact GeLU, softmax and LayerNorm, following the
Hugging Face model exactly; and the rotary tables the private layers share with it."""

from __future__ import annotations

import math

import torch

from .arch import Arch


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


def _lin(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ p[f"{name}.weight"]
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def rotary_tables(arch: Arch, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama's rotary cos and sin (T, head_dim) for the given positions (float64, public)."""
    hs = arch.head_dim
    inv = 1.0 / arch.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # (T, hs/2)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rotate_half_index(hs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_half(x) = x[..., idx] * sign: (-x2, x1) of the two halves."""
    h = hs // 2
    idx = torch.cat([torch.arange(h, hs), torch.arange(0, h)])
    sign = torch.cat([-torch.ones(h, dtype=torch.float64), torch.ones(h, dtype=torch.float64)])
    return idx, sign


def _rope(arch: Arch, t: torch.Tensor) -> torch.Tensor:  # t (B, h, T, hs)
    cos, sin = rotary_tables(arch, torch.arange(t.shape[2]))
    idx, sign = rotate_half_index(arch.head_dim)
    return t * cos + t[..., idx] * sign * sin


def _layer_norm(p: dict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    if f"{name}.bias" not in p:  # RMSNorm (Llama)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * p[f"{name}.weight"]
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)  # biased, as torch's LayerNorm
    return (x - mu) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _positions(arch: Arch, ids: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T); RoBERTa counts non-pad tokens from padding_idx + 1 (HF's
    ``create_position_ids_from_input_ids``), pad tokens get padding_idx."""
    if arch.kind != "roberta":
        return torch.arange(ids.shape[1]).expand_as(ids)
    not_pad = ids.ne(arch.pad_token_id).long()
    return torch.cumsum(not_pad, dim=1) * not_pad + (arch.position_offset - 1)


def _embed(arch: Arch, p: dict, ids: torch.Tensor) -> torch.Tensor:
    pos = _positions(arch, ids)
    if int(pos.max()) >= arch.max_positions:
        raise ValueError(f"sequence needs position {int(pos.max())}, the model has {arch.max_positions}")
    if arch.rope_theta:
        return p["embeddings.word"][ids]  # (B, T, C): positions enter by rotation
    x = p["embeddings.word"][ids] + p["embeddings.position"][pos]  # (B, T, C)
    if arch.kind == "gpt2":
        return x
    x = x + p["embeddings.token_type"][0]  # token_type_ids are all 0
    return _layer_norm(p, "embeddings.ln", x, arch.ln_eps)


def _attention_bias(arch: Arch, mask: torch.Tensor) -> torch.Tensor:
    """Additive (B, 1, T, T) bias: 0 where a query may see a key, float64 min (HF's value) elsewhere."""
    T = mask.shape[1]
    keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T) padded keys
    if arch.causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool).tril()
    zeros = torch.zeros(keep.shape, dtype=torch.float64)
    return zeros.masked_fill(~keep, torch.finfo(torch.float64).min)


def _attention(arch: Arch, p: dict, name: str, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    B, T, C = x.shape
    nh, hs, nkv = arch.heads, arch.head_dim, arch.n_kv
    q, k, v = _lin(p, f"{name}.qkv", x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k, v = (t.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, 1) for t in (k, v))
    if arch.rope_theta:
        q, k = _rope(arch, q), _rope(arch, k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs) + bias  # (B, nh, T, T)
    y = torch.softmax(scores, dim=-1) @ v  # (B, nh, T, hs)
    y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return _lin(p, f"{name}.out", y)


def _ffn(arch: Arch, p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    up = _lin(p, f"{name}.up", x)
    if arch.gated:  # SwiGLU
        gate, up = up.split(arch.ffn, dim=-1)
        return _lin(p, f"{name}.down", ACTIVATIONS[arch.activation](gate) * up)
    return _lin(p, f"{name}.down", ACTIVATIONS[arch.activation](up))


def _block(arch: Arch, p: dict, i: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    pre, eps = f"layers.{i}", arch.ln_eps
    if arch.pre_ln:  # GPT-2, Llama
        x = x + _attention(arch, p, f"{pre}.attn", _layer_norm(p, f"{pre}.ln1", x, eps), bias)
        return x + _ffn(arch, p, f"{pre}.ffn", _layer_norm(p, f"{pre}.ln2", x, eps))
    x = _layer_norm(p, f"{pre}.ln1", x + _attention(arch, p, f"{pre}.attn", x, bias), eps)  # BERT / RoBERTa
    return _layer_norm(p, f"{pre}.ln2", x + _ffn(arch, p, f"{pre}.ffn", x), eps)


def _head(arch: Arch, p: dict, x: torch.Tensor) -> torch.Tensor:
    if arch.pre_ln:
        x = _layer_norm(p, "final_ln", x, arch.ln_eps)
    if arch.head == "none":
        return x  # (B, T, C)
    if arch.head == "lm":
        return x @ p["lm_head.weight"]  # (B, T, vocab)
    if arch.kind == "bert":
        return _lin(p, "classifier", torch.tanh(_lin(p, "pooler", x[:, 0])))  # (B, num_labels)
    return _lin(p, "head.out", torch.tanh(_lin(p, "head.dense", x[:, 0])))  # RoBERTa: (B, num_labels)


def reference_forward(arch: Arch, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plaintext float64 forward pass from ``params`` only, following the HF model exactly (eval mode).

    Returns logits (B, num_labels) for head "classifier", (B, T, vocab) for "lm", the last hidden state
    (B, T, hidden) for "none".  ``attention_mask`` (B, T) is 1 for real tokens, 0 for padding (default all 1).
    """
    p = {k: v.to(torch.float64) for k, v in params.items()}
    ids = input_ids.long()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    x = _embed(arch, p, ids)  # (B, T, C)
    bias = _attention_bias(arch, mask)
    for i in range(arch.layers):
        x = _block(arch, p, i, x, bias)
    return _head(arch, p, x)
