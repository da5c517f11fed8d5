"""Run as `.venv/bin/python bench/ring_prompts.py 32` (writes nothing: its lines are bench/results/ring_prompts.json).
SmolLM2's 10 chat prompts: the ring simulation of the private path (the server's approximations for a stock
checkpoint) against the plaintext float64 model, greedy, 32 new tokens."""
import json
import sys
import time

import torch
from transformers import AutoTokenizer

from cometpi.approx.config import resolve_approx
from cometpi.bench.generate import PROMPTS
from cometpi.convert import from_hf
from cometpi.data import smollm2_path
from cometpi.nn import KVCache, first_divergence, greedy_decode, plaintext_greedy
from cometpi.weights import RingModel, prepare_params

n_new = int(sys.argv[1]) if len(sys.argv) > 1 else 32
path = smollm2_path()
arch, params = from_hf(path)
tok = AutoTokenizer.from_pretrained(path)
cfg = resolve_approx(None, params, None, layers=arch.layers)
print("approx", cfg.to_dict(), flush=True)
ops = RingModel(prepare_params(arch, params, cfg))
rows = []
for prompt in PROMPTS:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    ids = torch.as_tensor(ids["input_ids"] if hasattr(ids, "keys") else ids).reshape(1, -1)
    t = time.time()
    plain, margins = plaintext_greedy(arch, params, ids, n_new, tok.eos_token_id)
    got = list(greedy_decode(ops, arch, cfg, prompt_ids=ids, prompt_length=ids.shape[1], max_new=n_new, cache=KVCache(),
                             stop=lambda t_: t_ == tok.eos_token_id))
    first = first_divergence(got, plain)
    rows.append({"prompt": prompt, "equal": first is None, "first_divergence": first, "ring": tok.decode(got),
                 "plain": tok.decode(plain), "seconds": round(time.time() - t, 1), "min_margin": min(margins)})
    print(json.dumps(rows[-1]), flush=True)
print("equal", sum(r["equal"] for r in rows), "of", len(rows))
