"""Import Hugging Face BERT, RoBERTa, GPT-2 and Llama weights into cometpi's own parameter names.

This is the only module of cometpi that imports ``transformers`` (lazily, inside :func:`from_hf`).

* :func:`from_hf` -- a ``PreTrainedModel`` or a checkpoint directory -> ``(Arch, params)``.  Weights are mapped
  by explicit key tables (nanoGPT's ``from_pretrained``): every key of the HF state dict must be consumed, except
  known buffers, else :class:`UnsupportedModel` names the key.  Config features cometpi does not implement are
  refused the same way, naming the config field.
* :func:`reference_forward` -- a plain float64 torch forward pass that reads ``params`` only (no
  ``transformers``), with exact GeLU, softmax and LayerNorm: the plaintext oracle for the secure layers.
* :func:`params_hash` and :meth:`Arch.hash` -- short fingerprints both parties can compare.

Parameter names (float64; every linear weight is stored ``(in, out)`` so that ``y = x @ W + b``)::

    embeddings.word (vocab, hidden)   embeddings.position (max_positions, hidden)
    embeddings.token_type (type_vocab, hidden), embeddings.ln.{weight,bias}       bert/roberta
    layers.{i}.attn.qkv.{weight (hidden, 3*hidden), bias}   query|key|value concatenated along out
    layers.{i}.attn.out, layers.{i}.ffn.up, layers.{i}.ffn.down                 .{weight,bias}
    layers.{i}.ln1, layers.{i}.ln2  .{weight,bias}    post-LN (bert/roberta) or pre-LN (gpt2)
    final_ln.{weight,bias}                                                      gpt2
    pooler.{weight,bias}, classifier.{weight,bias}                              bert classifier
    head.dense.{weight,bias}, head.out.{weight,bias}                            roberta classifier
    lm_head.weight (hidden, vocab)                                  gpt2/llama lm (tied: the embedding's .T stored)

Llama (RMSNorm, SwiGLU, rotary positions, grouped-query attention; no biases, no position table)::

    layers.{i}.attn.qkv.weight (hidden, (heads + 2 kv_heads) head_dim)   q|k|v concatenated along out
    layers.{i}.ffn.up.weight (hidden, 2 ffn)                              gate|up concatenated along out
    layers.{i}.ln1.weight, layers.{i}.ln2.weight, final_ln.weight         RMSNorm weights only
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
HEADS = ("classifier", "lm", "none")

# HF class name -> (model_type, head); a directory's config.architectures[0] is looked up here too
ARCHITECTURES = {
    "BertModel": ("bert", "none"),
    "BertForSequenceClassification": ("bert", "classifier"),
    "RobertaModel": ("roberta", "none"),
    "RobertaForSequenceClassification": ("roberta", "classifier"),
    "GPT2Model": ("gpt2", "none"),
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "LlamaModel": ("llama", "none"),
    "LlamaForCausalLM": ("llama", "lm"),
}
AUTO_CLASS = {"none": "AutoModel", "classifier": "AutoModelForSequenceClassification", "lm": "AutoModelForCausalLM"}
BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}

# Keys of HF state dicts that hold no weights cometpi needs: position/token-type id buffers, GPT-2's causal-mask
# buffers (persistent in checkpoints written by older transformers versions).
BUFFER_KEYS = re.compile(r"(^|\.)(embeddings\.(position_ids|token_type_ids)|h\.\d+\.attn\.(bias|masked_bias)|"
                         r"rotary_emb\.inv_freq)$")
POOLER_KEYS = re.compile(r"(^|\.)pooler\.dense\.(weight|bias)$")  # a bare BertModel's unused pooler


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


# ------------------------------------------------------------------------------------------------- key tables
# An entry is (our name, HF names, transpose): the HF tensors (transposed first if asked) are concatenated along
# the last (out) axis; a single HF name is copied.  torch nn.Linear stores (out, in) and is transposed; GPT-2's
# Conv1D already stores (in, out) and is not.


def _linear(ours: str, *hf: str, transpose: bool = True) -> list[tuple[str, tuple[str, ...], bool]]:
    return [(f"{ours}.weight", tuple(f"{h}.weight" for h in hf), transpose),
            (f"{ours}.bias", tuple(f"{h}.bias" for h in hf), False)]


def _norm(ours: str, hf: str) -> list[tuple[str, tuple[str, ...], bool]]:
    return _linear(ours, hf, transpose=False)


BERT_EMBEDDINGS = [
    ("embeddings.word", ("embeddings.word_embeddings.weight",), False),
    ("embeddings.position", ("embeddings.position_embeddings.weight",), False),
    ("embeddings.token_type", ("embeddings.token_type_embeddings.weight",), False),
    *_norm("embeddings.ln", "embeddings.LayerNorm"),
]
BERT_LAYER = [  # relative to "encoder.layer.{i}." / "layers.{i}."
    *_linear("attn.qkv", "attention.self.query", "attention.self.key", "attention.self.value"),
    *_linear("attn.out", "attention.output.dense"),
    *_norm("ln1", "attention.output.LayerNorm"),
    *_linear("ffn.up", "intermediate.dense"),
    *_linear("ffn.down", "output.dense"),
    *_norm("ln2", "output.LayerNorm"),
]
GPT2_EMBEDDINGS = [("embeddings.word", ("wte.weight",), False), ("embeddings.position", ("wpe.weight",), False)]
GPT2_LAYER = [  # relative to "h.{i}." / "layers.{i}."
    *_norm("ln1", "ln_1"),
    *_linear("attn.qkv", "attn.c_attn", transpose=False),
    *_linear("attn.out", "attn.c_proj", transpose=False),
    *_norm("ln2", "ln_2"),
    *_linear("ffn.up", "mlp.c_fc", transpose=False),
    *_linear("ffn.down", "mlp.c_proj", transpose=False),
]
GPT2_FINAL = _norm("final_ln", "ln_f")
LLAMA_EMBEDDINGS = [("embeddings.word", ("embed_tokens.weight",), False)]
LLAMA_LAYER = [  # relative to "layers.{i}."
    ("ln1.weight", ("input_layernorm.weight",), False),
    ("attn.qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), True),
    ("attn.out.weight", ("self_attn.o_proj.weight",), True),
    ("ln2.weight", ("post_attention_layernorm.weight",), False),
    ("ffn.up.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), True),
    ("ffn.down.weight", ("mlp.down_proj.weight",), True),
]
LLAMA_FINAL = [("final_ln.weight", ("norm.weight",), False)]
BERT_POOLER = _linear("pooler", "pooler.dense")  # inside the base model (prefixed)
BERT_CLASSIFIER = _linear("classifier", "classifier")  # outside the base model (never prefixed)
ROBERTA_CLASSIFIER = [*_linear("head.dense", "classifier.dense"), *_linear("head.out", "classifier.out_proj")]
GPT2_LM_HEAD = [("lm_head.weight", ("lm_head.weight",), True)]


def _key_table(arch: Arch, base: str) -> list[tuple[str, tuple[str, ...], bool]]:
    """Full (our name, HF names, transpose) table; ``base`` prefixes the base model's keys."""
    emb, layer, stack, final = {"gpt2": (GPT2_EMBEDDINGS, GPT2_LAYER, "h", GPT2_FINAL),
                                "llama": (LLAMA_EMBEDDINGS, LLAMA_LAYER, "layers", LLAMA_FINAL)}.get(
        arch.kind, (BERT_EMBEDDINGS, BERT_LAYER, "encoder.layer", []))
    table = [(o, tuple(base + h for h in hf), t) for o, hf, t in emb]
    for i in range(arch.layers):
        table += [(f"layers.{i}.{o}", tuple(f"{base}{stack}.{i}.{h}" for h in hf), t) for o, hf, t in layer]
    table += [(o, tuple(base + h for h in hf), t) for o, hf, t in final]
    if arch.head == "classifier" and arch.kind == "bert":
        table += [(o, tuple(base + h for h in hf), t) for o, hf, t in BERT_POOLER] + BERT_CLASSIFIER
    elif arch.head == "classifier":
        table += ROBERTA_CLASSIFIER
    elif arch.head == "lm":
        table += GPT2_LM_HEAD
    return table


def _map_state_dict(arch: Arch, state_dict: dict[str, torch.Tensor],
                    tie_word_embeddings: bool = True) -> dict[str, torch.Tensor]:
    """cometpi params from an HF state dict (prefixed like ``bert.``/``roberta.``/``transformer.`` or bare).

    Raises UnsupportedModel naming any key that is missing, or present and neither consumed nor a known buffer.
    """
    sd = dict(state_dict)
    prefix = BASE_PREFIX[arch.kind]
    base = prefix if any(k.startswith(prefix) for k in sd) else ""
    if arch.head == "lm" and "lm_head.weight" not in sd and tie_word_embeddings:
        # safetensors drops the tied duplicate; lm_head is (vocab, hidden) like the embedding
        sd["lm_head.weight"] = sd.get(base + ("embed_tokens.weight" if arch.kind == "llama" else "wte.weight"))
    params, used = {}, set()
    for ours, hf_names, transpose in _key_table(arch, base):
        missing = [h for h in hf_names if sd.get(h) is None]
        if missing:
            raise UnsupportedModel(f"state dict lacks {missing} (needed for {ours!r} of a {arch.kind}/{arch.head})")
        parts = [sd[h].detach().to(torch.float64) for h in hf_names]
        parts = [p.T for p in parts] if transpose else parts
        params[ours] = torch.cat(parts, dim=-1).contiguous() if len(parts) > 1 else parts[0].clone().contiguous()
        used.update(hf_names)
    extra = [k for k in sd if k not in used and not BUFFER_KEYS.search(k) and not _ignored(arch, k)]
    if extra:
        raise UnsupportedModel(f"state dict keys not understood for a {arch.kind}/{arch.head} model: {extra}")
    _check_shapes(arch, params)
    return params


def to_hf_state_dict(arch: Arch, params: dict[str, torch.Tensor], prefix: bool = True) -> dict[str, torch.Tensor]:
    """The inverse of the key tables: an HF state dict (float32) from cometpi params, e.g. to save a
    fine-tuned model with ``save_pretrained``.  ``prefix``: keys as in a model with a head
    (``bert.encoder...``); extra params that HF has no key for (a trained SMU mu) are left out."""
    base = BASE_PREFIX[arch.kind] if prefix else ""
    sd = {}
    for ours, hf_names, transpose in _key_table(arch, base):
        t = params[ours].detach().to(torch.float32)
        parts = t.split(_split_sizes(arch, ours, t.shape[-1], len(hf_names)), dim=-1) if len(hf_names) > 1 else (t,)
        for h, part in zip(hf_names, parts, strict=True):
            sd[h] = (part.T if transpose else part).contiguous()
    return sd


def _split_sizes(arch: Arch, ours: str, width: int, n: int) -> list[int]:
    """Widths of the HF tensors concatenated into one of ours (q|k|v with fewer KV heads differ)."""
    if ours.endswith("attn.qkv.weight") or ours.endswith("attn.qkv.bias"):
        kv = arch.n_kv * arch.head_dim
        return [width - 2 * kv, kv, kv]
    return [width // n] * n


def _ignored(arch: Arch, key: str) -> bool:
    """Weights that exist in the HF model but do not reach its output."""
    return arch.head == "none" and bool(POOLER_KEYS.search(key))


def _check_shapes(arch: Arch, params: dict[str, torch.Tensor]) -> None:
    h, f = arch.hidden, arch.ffn
    want = {"embeddings.word": (arch.vocab, h), "embeddings.position": (arch.max_positions, h),
            "layers.0.attn.qkv.weight": (h, arch.qkv_width), "layers.0.attn.out.weight": (h, h),
            "layers.0.ffn.up.weight": (h, 2 * f if arch.gated else f), "layers.0.ffn.down.weight": (f, h)}
    if arch.head == "lm":
        want["lm_head.weight"] = (h, arch.vocab)
    for name, shape in want.items():
        if name in params and tuple(params[name].shape) != shape:
            raise UnsupportedModel(f"{name} has shape {tuple(params[name].shape)}, the config implies {shape}")


# ---------------------------------------------------------------------------------------------------- from_hf


def from_hf(model_or_dir: Any) -> tuple[Arch, dict[str, torch.Tensor]]:
    """``(Arch, float64 params)`` of an HF model instance or of a local checkpoint directory.

    Supported: BertModel, BertForSequenceClassification, RobertaModel, RobertaForSequenceClassification,
    GPT2Model, GPT2LMHeadModel, LlamaModel, LlamaForCausalLM.  A directory is loaded offline with AutoConfig and
    the AutoModel* class that matches ``config.architectures`` (a bare model when it has none).  Raises
    UnsupportedModel naming the config field, architecture or state-dict key cometpi cannot run.
    """
    if isinstance(model_or_dir, str | Path):
        model_or_dir = _load_dir(Path(model_or_dir))
    config = getattr(model_or_dir, "config", None)
    if config is None or not hasattr(model_or_dir, "state_dict"):
        raise TypeError(f"expected a transformers PreTrainedModel or a directory, got {type(model_or_dir).__name__}")
    name = type(model_or_dir).__name__
    arch = arch_from_config(config, _head_of(config.model_type, name))
    tied = bool(getattr(config, "tie_word_embeddings", True))
    return arch, _map_state_dict(arch, model_or_dir.state_dict(), tie_word_embeddings=tied)


def _head_of(model_type: str, class_name: str) -> str:
    if model_type not in BASE_PREFIX:
        raise UnsupportedModel(f"config.model_type={model_type!r} is not supported (need one of {list(BASE_PREFIX)})")
    kind, head = ARCHITECTURES.get(class_name, (None, None))
    if kind != model_type:
        supported = [c for c, (k, _) in ARCHITECTURES.items() if k == model_type]
        raise UnsupportedModel(f"architecture {class_name!r} is not supported for {model_type} (need one of "
                               f"{supported})")
    return head


def _load_dir(path: Path) -> Any:
    """The HF model saved in ``path``, loaded offline with eager attention and the checkpoint's own dtype."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in BASE_PREFIX:  # before AutoConfig, which has its own error for unknown types
        raise UnsupportedModel(f"config.model_type={model_type!r} is not supported (need one of {list(BASE_PREFIX)})")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if len(archs) > 1:
        raise UnsupportedModel(f"config.architectures={archs} names several models; keep one")
    head = _head_of(model_type, archs[0]) if archs else "none"
    auto = getattr(transformers, AUTO_CLASS[head])
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise UnsupportedModel(f"{path} holds its weights as .bin (a pickle, which can run code when loaded) and no "
                               ".safetensors: convert it first, e.g. `AutoModel.from_pretrained(dir).save_pretrained("
                               "dir, safe_serialization=True)` in a sandbox")
    return auto.from_pretrained(path, config=config, attn_implementation="eager", local_files_only=True,
                                use_safetensors=True, **{dtype_kw: "auto"})


# ---------------------------------------------------------------------------------------- reference forward


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
