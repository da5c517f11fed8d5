"""``cometpi bench sites``: the rsqrt call sites' input ranges at full length (issue 15).

For a checkpoint (default: the fine-tuned demo model, else MiniLM-L6) and a random-weight
BERT-base, run the plaintext-approximate model (floats, the checkpoint's own approximations) on
real sentences and on long and adversarial texts (``bench.inputs``) at 128, 256 and 512 tokens,
with a ``DomainMonitor`` on every rsqrt call.  Per site it records the smallest and largest input,
how many inputs left the declared domain, and the headroom bound beyond which the secure path
would wrap; and the expected number of corrupted elements per inference that the old local
rescale of Newton's scale would have caused (the defect of issue 15).  Writes
bench/results/sites.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..approx.newton import DomainMonitor
from ..approx.sites import DOMAINS
from .inputs import KINDS, texts


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the cached demo model, else MiniLM)")
    p.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--per-kind", type=int, default=2, help="texts of each adversarial kind per length")
    p.add_argument("--real", type=int, default=64, help="real test sentences (natural length) per model")
    p.add_argument("--bert-base", action=argparse.BooleanOptionalAction, default=True,
                   help="also a random-weight BERT-base")
    p.add_argument("--out", default="bench/results/sites.jsonl")


def _forward(arch, params, approx, ids, mask, monitor, batch=8):
    from ..nn import FloatModel, forward, prepare_params

    ops = FloatModel(prepare_params(arch, params, approx))
    ops.monitor = monitor
    for i in range(0, ids.shape[0], batch):
        b = ids[i:i + batch]
        forward(ops, arch, approx, batch=b.shape[0], length=b.shape[1], input_ids=b, attention_mask=mask[i:i + batch])


def measure(name, arch, params, approx, tok, sentences, lengths, per_kind, real, log=print) -> list[dict]:
    rows = []
    cases = [("real", None, sentences[:real])]
    limit = arch.max_positions - arch.position_offset
    for length in lengths:
        if length > limit:
            continue
        cases.append(("adversarial", length, [t for _, t in texts(per_kind, length * 2, sentences, tok)]))
    for case, length, batch in cases:
        t0 = time.perf_counter()
        enc = tok(batch, padding="max_length" if length else True, truncation=True, max_length=length or 128,
                  return_tensors="pt")
        mon = DomainMonitor()
        with torch.no_grad():
            _forward(arch, params, approx, enc["input_ids"], enc["attention_mask"], mon)
        rows.append({"model": name, "case": case, "tokens": int(enc["input_ids"].shape[1]), "texts": len(batch),
                     "kinds": list(KINDS) if length else ["real test sentences"], "approx": approx.to_dict(),
                     "sites": mon.sites, "values": mon.values, "outside": sorted(mon.outside()),
                     "local_rescale_failures_per_inference": mon.local_shift_failures() / len(batch),
                     "seconds": time.perf_counter() - t0})
        log(f"[sites] {name} {case} {rows[-1]['tokens']} tokens x {len(batch)}: outside {rows[-1]['outside']}, "
            f"old local-rescale failures/inference {rows[-1]['local_rescale_failures_per_inference']:.3g}")
    return rows


def local_mode_odds(name, arch, params, approx, tok, sentences, length: int) -> dict:
    """One inference of a real review joined to ``length`` tokens on the ring simulation: the expected
    number of wrong elements had every truncation been local (``--trunc local``)."""
    from ..nn import RingModel, forward, prepare_params
    from .inputs import make_text

    enc = tok([make_text("real_long", 0, 2 * length, sentences=sentences)], padding="max_length", truncation=True,
              max_length=length, return_tensors="pt")
    ops = RingModel(prepare_params(arch, params, approx), count_local_odds=True)
    t0 = time.perf_counter()
    forward(ops, arch, approx, batch=1, length=length, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return {"model": name, "case": "local truncation odds", "tokens": length, "texts": 1,
            "local_trunc_failures_per_inference": ops.local_trunc_failures, "approx": approx.to_dict(),
            "seconds": time.perf_counter() - t0}


def provable(name, arch, params, approx, length: int) -> dict:
    from ..approx.sites import SMU_MU
    from ..bounds import worst_case

    mu = SMU_MU if isinstance(approx.smu_mu, str) else approx.smu_mu
    return {"model": name, "case": "provable worst case", "tokens": length,
            "bounds": worst_case(arch, params, length=length, smu_mu=mu, relu_mu=approx.relu_mu,
                                 softmax_eps=approx.softmax_eps)}


def markdown(rows: list[dict]) -> str:
    out = ["| model | inputs | tokens | site | domain | min | max | outside | headroom bound | "
           "old local-rescale failures / inference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "sites" not in r:
            continue
        first = True
        for site, s in r["sites"].items():
            fails = f"{r['local_rescale_failures_per_inference']:.2g}" if first else ""
            out.append(f"| {r['model'] if first else ''} | {r['case'] if first else ''} | "
                       f"{r['tokens'] if first else ''} | {site} | [{s['domain'][0]:.3g}, {s['domain'][1]:g}] | "
                       f"{s['min']:.3g} | {s['max']:.4g} | {s['below'] + s['above']:,} of {s['n']:,} | "
                       f"{s['headroom_max']:.3g} | {fails} |")
            first = False
        for v, rec in r.get("values", {}).items():
            out.append(f"| | | | {v} | |x - mean| < {rec['bound']:g} | | {rec['max']:.4g} | {rec['above']} | "
                       f"{rec['bound']:g} | |")
    extra = [r for r in rows if r["case"] in ("local truncation odds", "provable worst case")]
    if extra:
        out += ["", "| model | what | tokens | value |", "|---|---|---|---|"]
        for r in extra:
            val = (f"{r['local_trunc_failures_per_inference']:.3g} expected wrong elements per inference with "
                   f"--trunc local (exact: 0)" if "bounds" not in r else
                   ", ".join(f"{k} <= {v:.3g}" for k, v in r["bounds"].items()))
            out.append(f"| {r['model']} | {r['case']} | {r['tokens']} | {val} |")
    return "\n".join(out)


def main(args) -> int:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from .. import checkpoint
    from ..convert import from_hf
    from ..data import minilm_path
    from ..demo import DEMO_MODEL, cache_dir
    from ..finetune import load_dataset
    from ..nn import ApproxConfig
    from .ops import git_sha, write_results

    _, _, test, _, _ = load_dataset("rt")
    sentences = [t for t, _ in test]
    model = args.model or (str(cache_dir() / DEMO_MODEL) if (cache_dir() / DEMO_MODEL).is_dir() else minilm_path())
    arch, params, meta = checkpoint.load(model)
    approx = checkpoint.approx_of(meta) if meta else ApproxConfig()
    tok = AutoTokenizer.from_pretrained(model if Path(model, "tokenizer.json").is_file() or Path(model, "vocab.txt")
                                        .is_file() else minilm_path(), local_files_only=True)
    name = Path(model).name
    rows = measure(name, arch, params, approx, tok, sentences, args.lengths, args.per_kind, args.real)
    rows.append(local_mode_odds(name, arch, params, approx, tok, sentences, 128))
    rows.append(provable(name, arch, params, approx, max(args.lengths)))
    if args.bert_base:
        torch.manual_seed(0)  # the random bert-base's weights: public, not a protocol's randomness
        hf = BertForSequenceClassification(BertConfig(attn_implementation="eager")).eval()
        barch, bparams = from_hf(hf)
        bname = "bert-base (random weights)"
        rows += measure(bname, barch, bparams, ApproxConfig(), tok, sentences, [128], args.per_kind, args.real)
        rows.append(local_mode_odds(bname, barch, bparams, ApproxConfig(), tok, sentences, 128))
        rows.append(provable(bname, barch, bparams, ApproxConfig(), 512))
    sha = git_sha()
    for r in rows:
        r["git_sha"] = sha
        r["domains"] = {k: list(v) for k, v in DOMAINS.items()}
        r["command"] = "cometpi bench sites " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k in ("lengths", "per_kind", "real"))
    out = Path(args.out)
    write_results(out, rows, markdown(rows))
    print(markdown(rows))
    return 0
