"""``cometpi bench generate``: private text generation with a KV cache in shares, against plaintext.

Starts a dealer and ``cometpi serve`` as processes and runs the client here (``PrivateClient.generate``
over TCP on loopback).

* **Accuracy** (``--prompts N``, SmolLM2-135M-Instruct): each of the first N of ``PROMPTS`` (a user
  message through the chat template) is continued greedily for ``--new-tokens`` tokens privately and
  by the plaintext model (float64, the same greedy rule); for a continuation that differs, the first
  divergent position and the plaintext model's top-2 logit margin there.
* **Cost** (``--cost``): prefill against prompt length (16, 64, 256) and per-token cost against context
  length with the cache (a decoding step) and without it (re-running the whole prefix: one forward
  of the context's length), for SmolLM2 and for a GPT-2-small-shaped model (random weights: no real
  GPT-2 checkpoint exists offline).

Writes bench/results/generate.json, generate.md and a plot of per-token cost against context length;
asserts nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

#: Real prompts of our own (plain user requests of the kind an assistant gets).
PROMPTS = [
    "Give me three tips for a rainy day.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Explain what a computer virus is in one sentence.",
    "Name three animals that live in the ocean.",
    "What should I pack for a weekend trip to the mountains?",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "How many days are there in a leap year?",
]


def _plaintext_greedy(arch, params, ids: torch.Tensor, n: int, eos: int | None):
    """Greedy continuation by the plaintext float64 model with a KV cache (cached = uncached: tests),
    with each step's top-2 margin."""
    from ..nn import ApproxConfig, FloatModel, KVCache, forward, prepare_params

    cfg = ApproxConfig.exact()
    ops = FloatModel(prepare_params(arch, params, cfg))
    cache, out, margins = KVCache(), [], []
    cur = ids
    for _ in range(n):
        logits = forward(ops, arch, cfg, batch=1, length=cur.shape[1], input_ids=cur, cache=cache)[0]
        top = logits.topk(2)
        out.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if eos is not None and out[-1] == eos:
            break
        cur = torch.tensor([[out[-1]]])
    return out, margins


def _serve(model_dir: str, daddr: str, extra=()):
    from ..serve import spawn

    return spawn(["serve", "--model", model_dir, "--port", "0", "--dealer", daddr, "--timeout", "900",
                  *extra], timeout=600)


def accuracy(model_dir: str, daddr: str, n_prompts: int, new_tokens: int) -> dict:
    from ..convert import from_hf
    from ..serve import stop
    from ..service import PrivateClient

    arch, params = from_hf(model_dir)
    server, saddr = _serve(model_dir, daddr)
    rows = []
    try:
        with PrivateClient(saddr, daddr, tokenizer=model_dir, timeout=900) as client:
            tok = client.tokenizer
            for prompt in PROMPTS[:n_prompts]:
                ids = client.encode_prompt(prompt, chat=True)
                t0 = time.perf_counter()
                list(client.generate(ids[0].tolist(), max_new_tokens=new_tokens))
                g = client.last_generation
                plain, margins = _plaintext_greedy(arch, params, ids, new_tokens, tok.eos_token_id)
                first = next((i for i, (a, b) in enumerate(zip(g["ids"], plain, strict=False)) if a != b), None)
                if first is None and len(g["ids"]) != len(plain):
                    first = min(len(g["ids"]), len(plain))
                row = {"prompt": prompt, "prompt_tokens": g["prompt_tokens"], "private_text": g["text"],
                       "plaintext_text": tok.decode(plain, skip_special_tokens=True), "equal": first is None,
                       "tokens": len(g["ids"]), "seconds": time.perf_counter() - t0,
                       "online_bytes": g["prefill"]["online_bytes"] + sum(s["online_bytes"] for s in g["per_token"]),
                       "per_token_seconds": (sum(s["seconds"] for s in g["per_token"]) / len(g["per_token"])
                                             if g["per_token"] else None)}
                if first is not None:
                    row.update({"first_divergence": first,
                                "plaintext_margin": margins[first] if first < len(margins) else None})
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("prompt", "equal", "tokens", "seconds")}), flush=True)
    finally:
        stop(server)
    return {"prompts": rows, "equal": sum(r["equal"] for r in rows), "of": len(rows), "new_tokens": new_tokens}


def cost(model_dir: str, daddr: str, name: str, lengths=(16, 64, 256), steps: int = 4) -> list[dict]:
    """Prefill at each prompt length, then ``steps`` decoding steps (with the cache) and one forward of
    the same context length (without it: what re-running the prefix costs per token)."""
    from ..serve import stop
    from ..service import PrivateClient

    server, saddr = _serve(model_dir, daddr)
    rows = []
    try:
        with PrivateClient(saddr, daddr, tokenizer=None if name == "gpt2-small" else model_dir,
                           timeout=900) as client:
            g = torch.Generator().manual_seed(2)  # benchmark token ids, not protocol randomness
            for T in lengths:
                ids = torch.randint(1000, client.arch.vocab, (1, T), generator=g)
                list(client.generate(ids[0].tolist(), max_new_tokens=steps + 1, fixed_length=True))
                gen = client.last_generation
                _, st = client.infer_ids(torch.randint(1000, client.arch.vocab, (1, T + 1), generator=g))
                per = gen["per_token"]
                rows.append({
                    "model": name, "prompt_tokens": T,
                    "prefill": gen["prefill"],
                    "with_cache": {"online_bytes": sum(s["online_bytes"] for s in per) / len(per),
                                   "rounds": sum(s["rounds"] for s in per) / len(per),
                                   "seconds": sum(s["seconds"] for s in per) / len(per), "steps": len(per)},
                    "without_cache": {"online_bytes": st["online"]["bytes_sent"] + st["online"]["bytes_recv"],
                                      "rounds": st["online"]["rounds"], "seconds": st["seconds"],
                                      "context": T + 1},
                    "kv_cache_bytes_per_party": gen["kv_cache_bytes_per_party"]})
                print(json.dumps({"model": name, "T": T, "with": rows[-1]["with_cache"]["online_bytes"],
                                  "without": rows[-1]["without_cache"]["online_bytes"]}), flush=True)
    finally:
        stop(server)
    return rows


def gpt2_small_dir(root: Path) -> str:
    """A random-weight GPT-2 small (GPT2Config() defaults, LM head), saved once."""
    import transformers

    path = root / "gpt2-small-random"
    if not (path / "config.json").exists():
        torch.manual_seed(0)  # benchmark weights, not protocol randomness
        m = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(), attn_implementation="eager")
        m.save_pretrained(path)
    return str(path)


def markdown(res: dict) -> str:
    out = []
    if "accuracy" in res:
        a = res["accuracy"]
        out += [f"Private greedy continuation equal to plaintext on {a['equal']} of {a['of']} prompts "
                f"({a['new_tokens']} new tokens).", "",
                "| prompt | equal | first divergence (plaintext margin) | s/token | private continuation |",
                "|---|---|---|---|---|"]
        for r in a["prompts"]:
            div = "-" if r["equal"] else f"{r['first_divergence']} ({r['plaintext_margin']:.3g})"
            text = r["private_text"].replace("\n", " ").replace("|", "/")[:90]
            pts = f"{r['per_token_seconds']:.2f}" if r["per_token_seconds"] else "-"
            out.append(f"| {r['prompt']} | {'yes' if r['equal'] else 'no'} | {div} | {pts} | {text} |")
        out.append("")
    if "cost" in res:
        out += ["| model | context | prefill online | prefill s | per token, cached | per token, re-run | "
                "cached s | re-run s | KV cache/party |", "|" + "---|" * 9]
        for r in res["cost"]:
            w, wo, p = r["with_cache"], r["without_cache"], r["prefill"]
            out.append(f"| {r['model']} | {r['prompt_tokens']} | {p['online_bytes'] / 1e6:.1f} MB | "
                       f"{p['seconds']:.1f} | {w['online_bytes'] / 1e6:.2f} MB, {w['rounds']:.0f} rounds | "
                       f"{wo['online_bytes'] / 1e6:.1f} MB, {wo['rounds']} rounds | {w['seconds']:.2f} | "
                       f"{wo['seconds']:.1f} | {r['kv_cache_bytes_per_party'] / 1e6:.1f} MB |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in sorted({r["model"] for r in rows}):
        sel = [r for r in rows if r["model"] == name]
        x = [r["prompt_tokens"] for r in sel]
        ax.plot(x, [r["with_cache"]["online_bytes"] / 1e6 for r in sel], "o-", label=f"{name}, KV cache in shares")
        ax.plot(x, [r["without_cache"]["online_bytes"] / 1e6 for r in sel], "s--", label=f"{name}, re-run prefix")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("online MB per generated token")
    ax.set_title("Private generation: per-token cost against context length")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--prompts", type=int, default=10, help="prompts for the accuracy check (0: none)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cost", action="store_true", help="also the prefill and per-token cost sweep")
    p.add_argument("--lengths", type=int, nargs="*", default=[16, 64, 256])
    p.add_argument("--out", default="bench/results/generate.json")


def main(args) -> int:
    from ..data import smollm2_path
    from ..serve import spawn, stop
    from .ops import git_sha

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.update({"bench": "generate", "git": git_sha(), "threads": torch.get_num_threads()})
    dealer, daddr = spawn(["dealer", "--port", "0"])
    try:
        model_dir = smollm2_path()
        if args.prompts:
            res["accuracy"] = accuracy(model_dir, daddr, args.prompts, args.new_tokens)
            res["accuracy"]["command"] = (f"cometpi bench generate --prompts {args.prompts} "
                                          f"--new-tokens {args.new_tokens}")
        if args.cost:
            with tempfile.TemporaryDirectory(prefix="cometpi-bench-") as tmp:
                rows = cost(model_dir, daddr, "smollm2", args.lengths)
                rows += cost(gpt2_small_dir(Path(tmp)), daddr, "gpt2-small", args.lengths)
            keep = {(r["model"], r["prompt_tokens"]) for r in rows}  # upsert: runs of other lengths stay
            res["cost"] = sorted([r for r in res.get("cost", []) if (r["model"], r["prompt_tokens"]) not in keep]
                                 + rows, key=lambda r: (r["model"], r["prompt_tokens"]))
            cmd = "cometpi bench generate --prompts 0 --cost --lengths " + " ".join(map(str, args.lengths))
            res["cost_commands"] = sorted(set(res.get("cost_commands", [])) | {cmd})
    finally:
        stop(dealer)
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    if "cost" in res:
        plot(res["cost"], out.parent / "generate_per_token.png")
    print(md)
    return 0
