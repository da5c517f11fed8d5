"""HF import: key tables, refusals, hashes, and the float64 reference forward against transformers itself."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from cometpi.convert import (  # noqa: E402
    Arch,
    UnsupportedModel,
    _map_state_dict,
    from_hf,
    params_hash,
    reference_forward,
)

TOL = 1e-9
# HF's BertModelTester / GPT2ModelTester sizes: odd intermediate and vocab catch transposes and mixed-up axes
BERT_KW = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2, vocab_size=99,
               max_position_embeddings=64)
GPT2_KW = dict(n_embd=32, n_head=4, n_inner=37, n_layer=2, vocab_size=99, n_positions=64)


def _bert_config(**kw):
    return transformers.BertConfig(**{**BERT_KW, "num_labels": 3, **kw})


def _roberta_config(**kw):
    return transformers.RobertaConfig(**{**BERT_KW, "max_position_embeddings": 66, "pad_token_id": 1,
                                         "type_vocab_size": 1, "num_labels": 3, **kw})


def _gpt2_config(**kw):
    return transformers.GPT2Config(**{**GPT2_KW, **kw})


# the odd Llama: 4 heads sharing 2 KV heads, FFN 37, tied embeddings
LLAMA_KW = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                num_hidden_layers=2, vocab_size=99, max_position_embeddings=64, rms_norm_eps=1e-5,
                tie_word_embeddings=True)


def _llama_config(**kw):
    return transformers.LlamaConfig(**{**LLAMA_KW, **kw})


BUILDERS = {
    "BertForSequenceClassification": _bert_config,
    "BertModel": _bert_config,
    "RobertaForSequenceClassification": _roberta_config,
    "RobertaModel": _roberta_config,
    "GPT2LMHeadModel": _gpt2_config,
    "GPT2Model": _gpt2_config,
    "LlamaForCausalLM": _llama_config,
    "LlamaModel": _llama_config,
}
#: HF computes Llama's rotary angles in float32 even in a float64 model (our reference: float64)
ROPE_TOL = 1e-6


def _tiny(class_name: str, seed: int = 0, **config_kw):
    """A seeded float64 eval-mode model; every weight is perturbed so LayerNorm gains and biases are not 1/0."""
    torch.manual_seed(seed)
    cls = getattr(transformers, class_name)
    model = cls._from_config(BUILDERS[class_name](**config_kw), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def _inputs(kind: str, side: str = "right", seed: int = 1):
    """Batch 2, length 7; row 1 has 3 pad tokens on ``side`` (pad id 1 for roberta, 0 for bert, any id for gpt2).

    Right padding is the common case; left padding is what tells apart RoBERTa's pad-aware position ids and
    GPT-2's padding mask (with right padding a causal query never sees a padded key).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    pad = slice(4, None) if side == "right" else slice(None, 3)
    mask[1, pad] = 0
    if kind != "gpt2":
        ids[1, pad] = 1 if kind == "roberta" else 0
    return ids, mask


def _hf_output(model, arch, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if arch.head == "none" else out.logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("class_name", list(BUILDERS))
def test_reference_forward_matches_hf(class_name, side):
    model = _tiny(class_name)
    arch, params = from_hf(model)
    ids, mask = _inputs(arch.kind, side)
    want = _hf_output(model, arch, ids, mask)
    got = reference_forward(arch, params, ids, mask)
    assert got.dtype == torch.float64 and got.shape == want.shape
    if arch.kind == "llama" and side == "left":
        # transformers' eager Llama returns NaN for every position of a left-padded row (the fully masked pad
        # queries' NaN values meet probability 0 in later positions): compare the unpadded row, and the padded
        # row against the same tokens without padding (rotary attention depends on relative positions only)
        assert torch.isnan(want[1]).all() and not torch.isnan(got).any()
        alone = _hf_output(model, arch, ids[1:, 3:], mask[1:, 3:])
        torch.testing.assert_close(got[1, 3:], alone[0], rtol=0, atol=ROPE_TOL)
        ids, mask, want, got = ids[:1], mask[:1], want[:1], got[:1]
    tol = ROPE_TOL if arch.rope_theta else TOL
    if arch.head == "classifier":
        assert got.shape == (2, 3)
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    else:
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=tol)


def test_arch_fields():
    arch, params = from_hf(_tiny("RobertaForSequenceClassification"))
    assert (arch.kind, arch.head, arch.num_labels, arch.position_offset, arch.pad_token_id) == (
        "roberta", "classifier", 3, 2, 1)
    assert (arch.hidden, arch.heads, arch.layers, arch.ffn, arch.vocab, arch.max_positions, arch.type_vocab) == (
        32, 4, 2, 37, 99, 66, 1)
    assert not arch.pre_ln and not arch.causal and "head.out.weight" in params and "pooler.weight" not in params
    arch, params = from_hf(_tiny("GPT2LMHeadModel"))
    assert (arch.kind, arch.head, arch.pre_ln, arch.causal, arch.activation, arch.type_vocab) == (
        "gpt2", "lm", True, True, "gelu_new", 0)
    assert params["layers.1.attn.qkv.weight"].shape == (32, 96) and params["layers.0.ffn.up.weight"].shape == (32, 37)
    assert torch.equal(params["lm_head.weight"], params["embeddings.word"].T)  # tied
    arch, params = from_hf(_tiny("BertModel"))
    assert arch.head == "none" and arch.num_labels == 0 and "pooler.weight" not in params
    assert all(v.dtype == torch.float64 for v in params.values())
    arch, params = from_hf(_tiny("LlamaForCausalLM"))
    assert (arch.kind, arch.norm, arch.heads, arch.n_kv, arch.gated, arch.bias, arch.activation, arch.rope_theta) == (
        "llama", "rms", 4, 2, True, False, "silu", 10000.0)
    # q (4 heads) | k, v (2 KV heads) of 8; gate | up of 37; no biases, no position table
    assert params["layers.0.attn.qkv.weight"].shape == (32, 64) and params["layers.1.ffn.up.weight"].shape == (32, 74)
    assert not any(k.endswith(".bias") for k in params) and "embeddings.position" not in params
    assert torch.equal(params["lm_head.weight"], params["embeddings.word"].T)  # tied


def test_llama_state_dict_roundtrip():
    from cometpi.convert import to_hf_state_dict

    model = _tiny("LlamaForCausalLM", seed=2)
    arch, params = from_hf(model)
    sd = to_hf_state_dict(arch, params)
    want = {k: v for k, v in model.state_dict().items() if k in sd}
    assert set(sd) == set(want) and all(torch.equal(sd[k], want[k].float()) for k in sd)


def test_old_arch_dicts_load_with_the_new_fields_defaulted():
    arch, _ = from_hf(_tiny("BertForSequenceClassification"))
    old = {k: v for k, v in arch.to_dict().items() if k not in ("norm", "kv_heads", "rope_theta", "gated", "bias")}
    assert Arch.from_dict(old) == arch


def test_arch_dict_roundtrip_and_hash():
    arch, _ = from_hf(_tiny("BertForSequenceClassification"))
    again = Arch.from_dict(arch.to_dict())
    assert again == arch and again.hash() == arch.hash() and len(arch.hash()) == 16
    assert Arch.from_dict({**arch.to_dict(), "num_labels": 2}).hash() != arch.hash()
    with pytest.raises(ValueError, match="unknown"):
        Arch.from_dict({**arch.to_dict(), "rotary": True})


def test_params_hash_stable_and_sensitive():
    _, params = from_hf(_tiny("BertForSequenceClassification"))
    h = params_hash(params)
    assert len(h) == 16 and h == params_hash({k: v.clone() for k, v in reversed(params.items())})
    _, again = from_hf(_tiny("BertForSequenceClassification"))
    assert params_hash(again) == h
    again["layers.1.ffn.down.bias"][5] += 1e-6
    assert params_hash(again) != h


@pytest.mark.parametrize("class_name", ["GPT2LMHeadModel", "BertForSequenceClassification", "RobertaModel",
                                        "LlamaForCausalLM"])
def test_from_dir(tmp_path, class_name):
    model = _tiny(class_name).float()
    model.save_pretrained(tmp_path)  # safetensors; GPT-2 drops the tied lm_head duplicate
    assert (tmp_path / "model.safetensors").is_file()
    arch, params = from_hf(model)
    arch_dir, params_dir = from_hf(str(tmp_path))
    assert arch_dir == arch and params_hash(params_dir) == params_hash(params)


def test_real_minilm():
    from cometpi.data import minilm_path

    path = minilm_path()
    arch, params = from_hf(path)
    assert (arch.kind, arch.head, arch.hidden, arch.layers, arch.heads, arch.ffn) == ("bert", "none", 384, 6, 12, 1536)
    tok = transformers.BertTokenizerFast.from_pretrained(path, local_files_only=True)
    batch = tok(["A quietly devastating film about grief.", "Dull."], padding=True, return_tensors="pt")
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    model = model.double().eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    got = reference_forward(arch, params, batch["input_ids"], batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    assert not keep.all()  # the short sentence is padded
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=TOL)


@pytest.mark.parametrize("class_name, config_kw, field", [
    ("BertModel", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ("BertModel", {"hidden_act": "gelu_fast"}, "hidden_act"),
    ("BertModel", {"is_decoder": True}, "is_decoder"),
    ("BertForSequenceClassification", {"problem_type": "regression"}, "problem_type"),
    ("GPT2Model", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("GPT2LMHeadModel", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
])
def test_unsupported_config_names_field(class_name, config_kw, field):
    with pytest.raises(UnsupportedModel, match=field):
        from_hf(_tiny(class_name, **config_kw))


def test_unsupported_model_type_and_architecture(tmp_path):
    torch.manual_seed(0)
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_heads=4, n_layers=1,
                                                                        hidden_dim=37, vocab_size=99))
    with pytest.raises(UnsupportedModel, match="model_type='distilbert'"):
        from_hf(distil)
    distil.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="model_type='distilbert'"):
        from_hf(tmp_path)
    mlm = transformers.BertForMaskedLM(_bert_config())
    with pytest.raises(UnsupportedModel, match="BertForMaskedLM"):
        from_hf(mlm)


def test_unknown_state_dict_key_is_named():
    model = _tiny("BertForSequenceClassification")
    arch, _ = from_hf(model)
    sd = model.state_dict()
    extra = {**sd, "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(4)}
    with pytest.raises(UnsupportedModel, match=r"attention\.self\.rotary\.weight"):
        _map_state_dict(arch, extra)
    missing = {k: v for k, v in sd.items() if k != "classifier.bias"}
    with pytest.raises(UnsupportedModel, match="classifier.bias"):
        _map_state_dict(arch, missing)
    # known buffers of older checkpoints are skipped; a bare (unprefixed) state dict maps the same way
    bare_arch, bare_params = from_hf(_tiny("BertModel"))
    bare_sd = {**_tiny("BertModel").state_dict(), "embeddings.position_ids": torch.arange(64)[None]}
    assert params_hash(_map_state_dict(bare_arch, bare_sd)) == params_hash(bare_params)


def test_gpt2_causal_buffers_and_untied_head():
    model = _tiny("GPT2LMHeadModel")
    arch, params = from_hf(model)
    sd = {**model.state_dict(), "transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64),
          "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}
    del sd["lm_head.weight"]  # as in a safetensors file: rebuilt from the tied wte
    assert params_hash(_map_state_dict(arch, sd)) == params_hash(params)
    with pytest.raises(UnsupportedModel, match="lm_head.weight"):
        _map_state_dict(arch, sd, tie_word_embeddings=False)
