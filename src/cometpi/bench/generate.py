"""``cometpi bench generate``: private text generation with a KV cache in shares, against plaintext.

Starts a dealer and ``cometpi serve`` as processes and runs the client here (``PrivateClient.generate``
over TCP on loopback).

* **Accuracy** (``--prompts N``, SmolLM2-135M-Instruct): each of the first N of ``PROMPTS`` (a user
  message through the chat template) is continued greedily for ``--new-tokens`` tokens privately and
  by the plaintext model (float64, the same greedy rule); for a continuation that differs, the first
  divergent position and the plaintext model's top-2 logit margin there.
* **Sampling** (``--sample N``): the first N prompts sampled privately with ``--temperature`` and
  ``--top-k`` (the client's CSPRNG noise: a different text each run), with the per-token cost against
  greedy decoding's; each sampled token is checked to be among the plaintext model's top k at its
  position (``in_top_k``; with the private logits' rounding a token at the k-th place may differ).
* **Lookahead** (``--lookahead-ab N``): N alternating pairs of whole generations (a 16-token prompt,
  9 tokens, fixed length) with the dealer lookahead off (``--no-lookahead``: each correction fetched
  when needed) and on (the coming layers' requests guessed and fetched ahead): prefill seconds and
  the median seconds per token, each pair run back to back on the same machine.
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

from ..nn import first_divergence, plaintext_greedy  # noqa: F401 - first_divergence re-exported

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


def _serve(model_dir: str, daddr: str, extra=()):
    from ..serve import spawn

    return spawn(["serve", "--model", model_dir, "--port", "0", "--dealer", daddr, "--timeout", "900",
                  *extra], timeout=600)


def accuracy(model_dir: str, daddr: str, n_prompts: int, new_tokens: int) -> dict:
    from ..client import PrivateClient
    from ..convert import from_hf
    from ..serve import stop

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
                plain, margins = plaintext_greedy(arch, params, ids, new_tokens, tok.eos_token_id)
                first = first_divergence(g["ids"], plain)
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


def _plaintext_topk_rank(arch, params, ids: torch.Tensor, out: list[int]) -> list[int]:
    """The rank (0: the largest) of each generated token among the plaintext model's logits there."""
    from ..nn import ApproxConfig, FloatModel, KVCache, forward, prepare_params

    cfg = ApproxConfig.exact()
    ops = FloatModel(prepare_params(arch, params, cfg))
    cache, ranks, cur = KVCache(), [], ids
    for tok in out:
        logits = forward(ops, arch, cfg, batch=1, length=cur.shape[1], input_ids=cur, cache=cache)[0]
        ranks.append(int((logits > logits[tok]).sum()))
        cur = torch.tensor([[tok]])
    return ranks


def sampling(model_dir: str, daddr: str, n_prompts: int, new_tokens: int, temperature: float, top_k: int) -> dict:
    from ..client import PrivateClient
    from ..convert import from_hf
    from ..serve import stop

    arch, params = from_hf(model_dir)
    server, saddr = _serve(model_dir, daddr)
    rows = []
    try:
        with PrivateClient(saddr, daddr, tokenizer=model_dir, timeout=900) as client:
            for prompt in PROMPTS[:n_prompts]:
                ids = client.encode_prompt(prompt, chat=True)
                row = {"prompt": prompt}
                for mode, kw in (("greedy", {}), ("sampled", {"temperature": temperature, "top_k": top_k})):
                    list(client.generate(ids[0].tolist(), max_new_tokens=new_tokens, fixed_length=True, **kw))
                    g = client.last_generation
                    per = g["per_token"]
                    row[mode] = {"text": g["text"], "tokens": len(g["ids"]),
                                 "per_token": {k: sum(st[k] for st in per) / len(per)
                                               for k in ("online_bytes", "rounds", "seconds")}}
                    if mode == "sampled":
                        ranks = _plaintext_topk_rank(arch, params, ids, g["ids"])
                        row[mode].update({"ranks": ranks, "in_top_k": sum(r < top_k for r in ranks)})
                rows.append(row)
                print(json.dumps({"prompt": prompt, "sampled": row["sampled"]["text"][:80]}), flush=True)
    finally:
        stop(server)
    return {"temperature": temperature, "top_k": top_k, "new_tokens": new_tokens, "prompts": rows}


def lookahead_ab(model_dir: str, daddr: str, pairs: int, new_tokens: int = 9, prompt_tokens: int = 16) -> dict:
    import statistics

    from ..client import PrivateClient
    from ..core import Config
    from ..serve import stop

    runs = []
    for pair in range(pairs):
        for on in (False, True):
            server, saddr = _serve(model_dir, daddr, () if on else ("--no-lookahead",))
            try:
                with PrivateClient(saddr, daddr, tokenizer=model_dir, timeout=900, config=Config(lookahead=on)) as c:
                    list(c.generate(list(range(1000, 1000 + prompt_tokens)), max_new_tokens=new_tokens,
                                    fixed_length=True))
                    g = c.last_generation
                    per = [st["seconds"] for st in g["per_token"]]
                    runs.append({"pair": pair, "lookahead": on, "prefill_seconds": g["prefill"]["seconds"],
                                 "per_token_median_seconds": statistics.median(per), "per_token_seconds": per,
                                 "per_token_rounds": g["per_token"][0]["rounds"],
                                 "per_token_online_bytes": g["per_token"][0]["online_bytes"],
                                 "mispredictions": c.sess.provider.mispredictions})
                    print(json.dumps({k: runs[-1][k] for k in ("pair", "lookahead", "prefill_seconds",
                                                              "per_token_median_seconds")}), flush=True)
            finally:
                stop(server)

    def med(on, key):
        return statistics.median(r[key] for r in runs if r["lookahead"] == on)

    return {"runs": runs, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "summary": {k: {"off": med(False, k), "on": med(True, k)}
                        for k in ("prefill_seconds", "per_token_median_seconds")}}


def cost(model_dir: str, daddr: str, name: str, lengths=(16, 64, 256), steps: int = 4) -> list[dict]:
    """Prefill at each prompt length, then ``steps`` decoding steps (with the cache) and one forward of
    the same context length (without it: what re-running the prefix costs per token)."""
    from ..client import PrivateClient
    from ..serve import stop

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
                                   "seconds": sum(s["seconds"] for s in per) / len(per), "steps": len(per),
                                   "by_layer_type": per[-1]["by_layer_type"]},  # the last step's
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
    if "sampling" in res:
        sm = res["sampling"]
        out += [f"Private sampling, temperature {sm['temperature']}, top-k {sm['top_k']}, {sm['new_tokens']} tokens "
                "(fixed length), against greedy decoding of the same prompt:", "",
                "| prompt | sampled continuation | tokens in the plaintext top-k | per token, greedy | top-k |",
                "|---|---|---|---|---|"]
        for r in sm["prompts"]:
            g, t = r["greedy"]["per_token"], r["sampled"]["per_token"]
            text = r["sampled"]["text"].replace("\n", " ").replace("|", "/")[:90]
            out.append(f"| {r['prompt']} | {text} | {r['sampled']['in_top_k']} of {r['sampled']['tokens']} | "
                       f"{g['online_bytes'] / 1e6:.1f} MB, {g['rounds']:.0f} rounds, {g['seconds']:.1f} s | "
                       f"{t['online_bytes'] / 1e6:.1f} MB, {t['rounds']:.0f} rounds, {t['seconds']:.1f} s |")
        out.append("")
    if "lookahead" in res:
        sm = res["lookahead"]["summary"]
        out += [f"Dealer lookahead, SmolLM2, {res['lookahead']['prompt_tokens']}-token prompt, medians over "
                f"{len(res['lookahead']['runs']) // 2} alternating pairs of runs: prefill "
                f"{sm['prefill_seconds']['off']:.1f} s without, {sm['prefill_seconds']['on']:.1f} s with; per token "
                f"{sm['per_token_median_seconds']['off']:.2f} s without, {sm['per_token_median_seconds']['on']:.2f} s "
                "with (the same bytes and rounds).", ""]
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
    p.add_argument("--sample", type=int, default=0, help="prompts to sample with --temperature and --top-k too")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--lookahead-ab", type=int, default=0, metavar="N",
                   help="N alternating pairs of generations with the dealer lookahead off and on")
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
        if args.sample:
            res["sampling"] = sampling(model_dir, daddr, args.sample, args.new_tokens, args.temperature, args.top_k)
            res["sampling"]["command"] = (f"cometpi bench generate --prompts 0 --sample {args.sample} --new-tokens "
                                          f"{args.new_tokens} --temperature {args.temperature} --top-k {args.top_k}")
        if args.lookahead_ab:
            res["lookahead"] = lookahead_ab(model_dir, daddr, args.lookahead_ab)
            res["lookahead"]["command"] = f"cometpi bench generate --prompts 0 --lookahead-ab {args.lookahead_ab}"
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
