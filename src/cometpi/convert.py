"""Import Hugging Face BERT, RoBERTa, GPT-2 and Llama weights into cometpi's own parameter names.

This is the only module of cometpi that imports ``transformers`` (lazily, inside :func:`from_hf`).

* :func:`from_hf` -- a ``PreTrainedModel`` or a checkpoint directory -> ``(Arch, params)``.  Weights are mapped
  by explicit key tables (nanoGPT's ``from_pretrained``): every key of the HF state dict must be consumed, except
  known buffers, else :class:`UnsupportedModel` names the key.  Config features cometpi does not implement are
  refused the same way, naming the config field.
* :func:`reference_forward` (``reference``) -- a plain float64 torch forward pass that reads ``params`` only
  (no ``transformers``), with exact GeLU, softmax and LayerNorm: the plaintext oracle for the secure layers.
* :class:`Arch`, :func:`arch_from_config`, :func:`params_hash` and :meth:`Arch.hash` (``arch``) -- the
  architecture read from an HF config, short fingerprints both parties can compare.  Both are re-exported here.

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

import json
import re
from pathlib import Path
from typing import Any

import torch

from .arch import (  # noqa: F401 - re-exported (convert.Arch, convert.params_hash, ...)
    BASE_PREFIX,
    HEADS,
    SUPPORTED_ACTIVATIONS,
    Arch,
    UnsupportedModel,
    arch_from_config,
    params_hash,
)
from .reference import (  # noqa: F401 - re-exported (convert.reference_forward, convert.rotary_tables, ...)
    ACTIVATIONS,
    reference_forward,
    rotary_tables,
    rotate_half_index,
)

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

# Keys of HF state dicts that hold no weights cometpi needs: position/token-type id buffers, GPT-2's causal-mask
# buffers (persistent in checkpoints written by older transformers versions).
BUFFER_KEYS = re.compile(r"(^|\.)(embeddings\.(position_ids|token_type_ids)|h\.\d+\.attn\.(bias|masked_bias)|"
                         r"rotary_emb\.inv_freq)$")
POOLER_KEYS = re.compile(r"(^|\.)pooler\.dense\.(weight|bias)$")  # a bare BertModel's unused pooler


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
