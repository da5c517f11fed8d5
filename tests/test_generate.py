"""Private greedy generation with a KV cache in shares: cached equals uncached, private equals the
plaintext simulation token for token, end of sequence and fixed length, on tiny Llama and GPT-2."""

import pytest
import torch

from cometpi.convert import from_hf, reference_forward
from cometpi.nn import (
    ApproxConfig,
    FloatModel,
    KVCache,
    RingModel,
    ShareModel,
    greedy_decode,
    prepare_params,
    secure_generate,
)
from cometpi.party import run_local

from .test_convert import _tiny

ORIGINAL = ApproxConfig.original()
MODELS = [("LlamaForCausalLM", "llama"), ("GPT2LMHeadModel", "gpt2")]


def _prompt(seed=11, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 99, (1, n), generator=g)


def _uncached(arch, params, ids, steps):
    """Greedy decoding by re-running the whole prefix every step (the exact reference)."""
    out = ids
    for _ in range(steps):
        nxt = reference_forward(arch, params, out)[0, -1].argmax()
        out = torch.cat([out, nxt.reshape(1, 1)], 1)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("cls,kind", MODELS)
def test_cached_decoding_equals_rerunning_the_prefix(cls, kind):
    arch, params = from_hf(_tiny(cls, seed=12))
    ids = _prompt()
    ops = FloatModel(prepare_params(arch, params, ApproxConfig.exact()))
    cache = KVCache()
    got = list(greedy_decode(ops, arch, ApproxConfig.exact(), prompt_ids=ids, prompt_length=5, max_new=6,
                             cache=cache))
    assert got == _uncached(arch, params, ids, 6)
    assert cache.length == 5 + 5 and len(cache.k) == arch.layers  # the last token is not fed back
    assert tuple(cache.k[0].shape) == (1, arch.n_kv, 10, arch.head_dim)
    assert cache.nbytes() == 2 * arch.layers * 10 * arch.n_kv * arch.head_dim * 8


@pytest.mark.parametrize("cls,kind", MODELS)
def test_private_tokens_equal_the_simulation(cls, kind):
    """Private greedy tokens (original functions, KV cache in shares) equal the fixed-point
    simulation's; with an end-of-sequence id the client stops both parties there."""
    arch, params = from_hf(_tiny(cls, seed=13))
    ids = _prompt(14)
    prepared = prepare_params(arch, params, ORIGINAL)
    ring = list(greedy_decode(RingModel(prepared), arch, ORIGINAL, prompt_ids=ids, prompt_length=5, max_new=5))
    plain = _uncached(arch, params, ids, 5)
    eos = ring[2]

    def job(s):
        model = ShareModel(s, arch, prepared if not s.is_client else None)
        kw = dict(model=model, prompt_ids=ids if s.is_client else None, prompt_length=5, max_new=5)
        full = list(secure_generate(s, arch, ORIGINAL, fixed_length=True, **kw))
        cut = list(secure_generate(s, arch, ORIGINAL, eos_id=eos if s.is_client else None, **kw))
        return full, cut

    (full, cut), (sfull, scut) = run_local(job, timeout=600)
    assert full == ring
    assert cut == ring[: ring.index(eos) + 1]
    assert sfull == [None] * 5 and len(scut) == len(cut)  # the server: the number of steps, nothing else
    assert plain[:3] == ring[:3]  # the original functions follow the plaintext model (margins permitting)


def save_tiny_llama(folder, max_positions: int = 64):
    """A stock tiny Llama with SmolLM2's vocabulary (so SmolLM2's tokenizer works), saved as a checkpoint
    in ``folder``/tiny-llama (seeded: the same weights every time)."""
    import transformers

    torch.manual_seed(15)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=37, num_hidden_layers=2, max_position_embeddings=max_positions,
                                   tie_word_embeddings=True, initializer_range=0.3)
    path = folder / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("model"))


def test_generate_over_three_processes(tmp_path, tiny_llama_dir):
    """`cometpi serve` on a stock tiny Llama with SmolLM2's vocabulary (the original functions by default),
    `cometpi generate` streams the simulation's greedy tokens, and reports prefill and per-token costs."""
    import json
    import subprocess
    import sys

    from cometpi.serve import spawn_roles
    from cometpi.service import load_tokenizer

    arch, params = from_hf(str(tiny_llama_dir))
    prompt = "The rain had started before dawn"
    ids = load_tokenizer(None, arch)(prompt, return_tensors="pt")["input_ids"]
    want = list(greedy_decode(RingModel(prepare_params(arch, params, ORIGINAL)), arch, ORIGINAL, prompt_ids=ids,
                              prompt_length=ids.shape[1], max_new=4))
    with spawn_roles(tiny_llama_dir, "--once", timeout=60) as roles:
        out = str(tmp_path / "gen.json")
        r = subprocess.run([sys.executable, "-m", "cometpi", "generate", "--server", roles.saddr, "--dealer",
                            roles.daddr, "--max-new-tokens", "4", "--fixed-length", "--json", out, prompt],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        roles.server.wait(30)
    g = json.loads((tmp_path / "gen.json").read_text())["generation"]
    eos = 2 if 2 in want else None
    assert g["ids"] == (want[: want.index(eos) + 1] if eos else want)
    assert g["prompt_tokens"] == ids.shape[1] and g["steps"] == 4 and len(g["per_token"]) == 3
    # keys and values of the prompt and the 3 tokens fed back, 8 B per ring element, in each of 2 layers, opened
    # once each, and this party's share of their masks
    assert g["kv_cache_bytes_per_party"] == 2 * 2 * 2 * (ids.shape[1] + 3) * arch.n_kv * arch.head_dim * 8
    assert g["prefill"]["online_bytes"] > g["per_token"][0]["online_bytes"] > 0
    layers = g["per_token"][0]["by_layer_type"]  # a step's traffic by layer type: within the step's total
    assert {"softmax", "attention matmul", "linear", "gelu"} <= set(layers)
    assert 0 < sum(t["online_bytes"] for t in layers.values()) <= g["per_token"][0]["online_bytes"]
    assert "per token" in r.stderr and "KV cache" in r.stderr


def test_generate_requests_are_checked(tiny_llama_dir):
    from cometpi.service import ModelServer

    server = ModelServer(str(tiny_llama_dir))
    assert server._validate_generate({"length": 5, "max_new": 4, "top_k": True})[3] is True
    with pytest.raises(ValueError, match="top_k must be true or false"):
        server._validate_generate({"length": 5, "max_new": 4, "top_k": 40})  # k is the client's alone
    with pytest.raises(ValueError, match="must fit"):
        server._validate_generate({"length": 60, "max_new": 5})


def test_sampling_with_the_clients_noise():
    """Temperature sampling by the Gumbel-max trick: with the same noise the private tokens equal the
    simulation's, the server's side is the greedy one (it never sees the noise), and a high temperature
    departs from greedy decoding."""
    arch, params = from_hf(_tiny("LlamaForCausalLM", seed=17))
    ids = _prompt(18)
    prepared = prepare_params(arch, params, ORIGINAL)
    gen = torch.Generator().manual_seed(19)  # test noise, fixed so that both runs see the same
    noise = [-torch.log(-torch.log(torch.rand(1, arch.vocab, generator=gen, dtype=torch.float64).clamp_min(1e-12)))
             for _ in range(5)]
    ring = list(greedy_decode(RingModel(prepared), arch, ORIGINAL, prompt_ids=ids, prompt_length=5, max_new=5,
                              temperature=2.0, noise=lambda i: noise[i]))
    greedy = list(greedy_decode(RingModel(prepared), arch, ORIGINAL, prompt_ids=ids, prompt_length=5, max_new=5))
    assert ring != greedy

    def job(s):
        model = ShareModel(s, arch, prepared if not s.is_client else None)
        return list(secure_generate(s, arch, ORIGINAL, model=model, prompt_ids=ids if s.is_client else None,
                                    prompt_length=5, max_new=5, fixed_length=True,
                                    temperature=2.0 if s.is_client else 0.0, noise=lambda i: noise[i]))

    assert run_local(job, timeout=600)[0] == ring

    # top-k (k = 3, the client's; the server passes True): the simulation's tokens, each among the top 3
    topk = list(greedy_decode(RingModel(prepared), arch, ORIGINAL, prompt_ids=ids, prompt_length=5, max_new=5,
                              temperature=2.0, top_k=3, noise=lambda i: noise[i]))
    ctx = ids
    for tok in topk:
        top3 = reference_forward(arch, params, ctx)[0, -1].topk(3).indices.tolist()
        assert tok in top3
        ctx = torch.cat([ctx, torch.tensor([[tok]])], 1)

    def job_k(s):
        model = ShareModel(s, arch, prepared if not s.is_client else None)
        return list(secure_generate(s, arch, ORIGINAL, model=model, prompt_ids=ids if s.is_client else None,
                                    prompt_length=5, max_new=5, fixed_length=True, top_k=3 if s.is_client else True,
                                    temperature=2.0 if s.is_client else 0.0, noise=lambda i: noise[i]))

    assert run_local(job_k, timeout=600)[0] == topk
    with pytest.raises(ValueError, match="temperature"):
        next(greedy_decode(RingModel(prepared), arch, ORIGINAL, prompt_ids=ids, prompt_length=5, max_new=1,
                           temperature=-1.0))


def test_dealer_lookahead_fetches_the_coming_layers_ahead():
    """With the lookahead (the default) both parties guess the next layers' dealer requests from the
    layers done and fetch them ahead: no guess is wrong, the tokens are the same as without it, and the
    server sends a fraction of the dealer messages it sends when every correction is fetched on demand."""
    from cometpi.core import Config
    from cometpi.protocols import KINDS

    arch, params = from_hf(_tiny("LlamaForCausalLM", seed=21, num_hidden_layers=4))
    ids = _prompt(22)
    prepared = prepare_params(arch, params, ORIGINAL)

    def job(s):
        model = ShareModel(s, arch, prepared if not s.is_client else None)
        before = s.meter.total(link="dealer").msgs_sent
        toks = list(secure_generate(s, arch, ORIGINAL, model=model, prompt_ids=ids if s.is_client else None,
                                    prompt_length=5, max_new=4, fixed_length=True))
        mine = sum(KINDS[k].receiver == s.role for _, k, _ in s.provider.plan)
        return toks, s.provider.mispredictions, s.meter.total(link="dealer").msgs_sent - before, mine

    (on, miss, _, _), (_, smiss, smsgs, sreq) = run_local(job, timeout=600)
    (off, _, _, _), (_, _, omsgs, oreq) = run_local(job, config=Config(lookahead=False), timeout=600)
    assert on == off and miss == smiss == 0
    assert omsgs >= oreq > 0  # without: one request message per correction (the weights' setup aside)
    assert smsgs < 0.6 * omsgs  # with: layers 2-3 of the prefill, 1-3 of each step and the tails in batches
