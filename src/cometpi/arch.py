"""A model's architecture (``Arch``: its shape and math, everything that is not a weight), read from a
Hugging Face config, and the fingerprints both parties compare (:meth:`Arch.hash`, :func:`params_hash`).

:func:`arch_from_config` refuses config features cometpi does not implement with :class:`UnsupportedModel`,
naming the config field.  No ``transformers`` import: a config is any object with its attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
HEADS = ("classifier", "lm", "none")
# model_type -> the prefix of its base model's keys in a state dict with a head (the model types supported)
BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}


class UnsupportedModel(ValueError):
    """The model uses an architecture, config feature or weight that cometpi does not implement."""


@dataclass(frozen=True)
class Arch:
    """Everything about a model's shape and math that is not a weight."""

    kind: str  # "bert" | "roberta" | "gpt2"
    hidden: int
    heads: int
    layers: int
    ffn: int  # intermediate size
    vocab: int
    max_positions: int
    type_vocab: int  # 0 for gpt2
    ln_eps: float
    pre_ln: bool  # False: post-LN (bert/roberta); True: pre-LN with a final LayerNorm (gpt2)
    causal: bool
    activation: str  # HF name: "gelu" (erf), "gelu_new"/"gelu_pytorch_tanh" (tanh), "relu"
    head: str  # "classifier" | "lm" | "none" (output = last hidden state)
    num_labels: int  # 0 unless head == "classifier"
    position_offset: int  # roberta: padding_idx + 1; else 0
    pad_token_id: int | None
    # Llama (defaults: the BERT/GPT-2 families)
    norm: str = "layer"  # "layer" (LayerNorm with bias) | "rms" (RMSNorm, weight only)
    kv_heads: int = 0  # grouped-query attention's key/value heads (0: as many as heads)
    rope_theta: float = 0.0  # rotary position embeddings' base (0: a learned position table instead)
    gated: bool = False  # SwiGLU: down(act(gate(x)) * up(x)), gate|up stored as one (hidden, 2 ffn) weight
    bias: bool = True  # linear layers have biases

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.n_kv) * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Arch:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
        if not required <= set(d) <= set(fields):
            raise ValueError(f"Arch fields: missing {sorted(required - set(d))}, "
                             f"unknown {sorted(set(d) - set(fields))}")
        return cls(**d)

    def hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of :meth:`to_dict`."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def params_hash(params: dict[str, torch.Tensor]) -> str:
    """First 16 hex digits of a sha256 over the sorted names, shapes and little-endian float64 bytes."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to(device="cpu", dtype=torch.float64).contiguous()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.numpy().astype("<f8", copy=False).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- config -> Arch


def _require(config: Any, field: str, ok: bool, want: str) -> None:
    if not ok:
        raise UnsupportedModel(f"config.{field}={getattr(config, field, None)!r} is not supported (need {want})")


def _check_common(config: Any, act_field: str, head: str) -> None:
    _require(config, "add_cross_attention", not getattr(config, "add_cross_attention", False), "False")
    act = getattr(config, act_field)
    _require(config, act_field, isinstance(act, str) and act in SUPPORTED_ACTIVATIONS,
             f"one of {SUPPORTED_ACTIVATIONS}")
    if head == "classifier":
        problem = getattr(config, "problem_type", None)
        _require(config, "problem_type", problem in (None, "single_label_classification"),
                 "None or 'single_label_classification'")


def _arch_bert(config: Any, head: str) -> Arch:
    _check_common(config, "hidden_act", head)
    pos = getattr(config, "position_embedding_type", "absolute")
    _require(config, "position_embedding_type", pos == "absolute", "'absolute'")
    _require(config, "is_decoder", not getattr(config, "is_decoder", False), "False")
    roberta = config.model_type == "roberta"
    return Arch(
        kind=config.model_type, hidden=config.hidden_size, heads=config.num_attention_heads,
        layers=config.num_hidden_layers, ffn=config.intermediate_size, vocab=config.vocab_size,
        max_positions=config.max_position_embeddings, type_vocab=config.type_vocab_size,
        ln_eps=float(config.layer_norm_eps), pre_ln=False, causal=False, activation=config.hidden_act, head=head,
        num_labels=config.num_labels if head == "classifier" else 0,
        position_offset=config.pad_token_id + 1 if roberta else 0, pad_token_id=config.pad_token_id)


def _arch_gpt2(config: Any, head: str) -> Arch:
    _check_common(config, "activation_function", head)
    _require(config, "scale_attn_weights", getattr(config, "scale_attn_weights", True), "True")
    for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _require(config, field, not getattr(config, field, False), "False")
    return Arch(
        kind="gpt2", hidden=config.n_embd, heads=config.n_head, layers=config.n_layer,
        ffn=config.n_inner if config.n_inner is not None else 4 * config.n_embd, vocab=config.vocab_size,
        max_positions=config.n_positions, type_vocab=0, ln_eps=float(config.layer_norm_epsilon), pre_ln=True,
        causal=True, activation=config.activation_function, head=head, num_labels=0, position_offset=0,
        pad_token_id=config.pad_token_id)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}  # transformers >= 5
    scaling = getattr(config, "rope_scaling", None) or {}  # 4.x
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise UnsupportedModel(f"config.rope_parameters rope_type={kind!r} is not supported (need 'default')")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UnsupportedModel("config has no rope_theta")
    return float(theta)


def _arch_llama(config: Any, head: str) -> Arch:
    _check_common(config, "hidden_act", head)
    _require(config, "hidden_act", config.hidden_act == "silu", "'silu'")
    for field in ("attention_bias", "mlp_bias"):
        _require(config, field, not getattr(config, field, False), "False")
    hd = getattr(config, "head_dim", None)
    _require(config, "head_dim", hd in (None, config.hidden_size // config.num_attention_heads),
             "hidden_size / num_attention_heads")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    _require(config, "num_key_value_heads", config.num_attention_heads % kv == 0, "a divisor of the heads")
    return Arch(
        kind="llama", hidden=config.hidden_size, heads=config.num_attention_heads, layers=config.num_hidden_layers,
        ffn=config.intermediate_size, vocab=config.vocab_size, max_positions=config.max_position_embeddings,
        type_vocab=0, ln_eps=float(config.rms_norm_eps), pre_ln=True, causal=True, activation="silu", head=head,
        num_labels=0, position_offset=0, pad_token_id=getattr(config, "pad_token_id", None), norm="rms",
        kv_heads=kv, rope_theta=_rope_theta(config), gated=True, bias=False)


def arch_from_config(config: Any, head: str) -> Arch:
    """The :class:`Arch` of an HF config with the given head; raises UnsupportedModel naming the field."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BASE_PREFIX:
        raise UnsupportedModel(f"config.model_type={model_type!r} is not supported (need one of {list(BASE_PREFIX)})")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    arch = {"gpt2": _arch_gpt2, "llama": _arch_llama}.get(model_type, _arch_bert)(config, head)
    if arch.hidden % arch.heads:
        raise UnsupportedModel(f"hidden size {arch.hidden} is not a multiple of the {arch.heads} attention heads")
    return arch
