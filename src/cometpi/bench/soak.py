"""``cometpi bench soak``: many private inferences of long and adversarial texts, each compared with
the plaintext model (issue 15).

A dealer and a model server run as separate processes (``cometpi dealer``, ``cometpi serve``); this
process is the client.  Texts (``bench.inputs``: real reviews joined to full length, a complaint
repeated, one token repeated, punctuation, very long words, random word pieces, digits) are padded
to ``--length`` tokens and classified in batches.  Each private logit vector is compared with the
plaintext-approximate model (float64, the same functions and the same rsqrt guess) and with the
trained function (exact rsqrt); a disagreement is a logit off by more than ``--tol`` or a changed
label.  Rows are written after every batch to bench/results/soak.{jsonl,md}.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from .inputs import KINDS, texts


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the cached demo model)")
    p.add_argument("--n", type=int, default=56, help="private inferences (texts), spread over the kinds")
    p.add_argument("--batch", type=int, default=8, help="texts per private query")
    p.add_argument("--length", type=int, default=128, help="tokens per text (padded and truncated to it)")
    p.add_argument("--guess", default=None, help="rsqrt guess (default: the checkpoint's)")
    p.add_argument("--tol", type=float, default=0.02, help="largest accepted |private - plaintext| logit")
    p.add_argument("--out", default="bench/results/soak.jsonl")


def _references(arch, prepared, approx, ids, mask):
    """Logits of the plaintext model (same functions and guess) and of the trained function (exact
    rsqrt), from parameters already through ``nn.prepare_params``."""
    from ..nn import FloatModel, forward

    out = []
    for ideal in (False, True):
        ops = FloatModel(prepared, ideal=ideal)
        with torch.no_grad():
            out.append(forward(ops, arch, approx, batch=ids.shape[0], length=ids.shape[1], input_ids=ids,
                               attention_mask=mask))
    return out


def summary(rows: list[dict], tol: float) -> dict:
    per = [r for r in rows if r.get("row") == "inference"]
    return {"row": "summary", "inferences": len(per), "tol": tol,
            "disagreements": sum(not r["agrees"] for r in per),
            "label_changes": sum(r["label_private"] != r["label_plain"] for r in per),
            "max_abs_diff": max((r["max_abs_diff"] for r in per), default=None),
            "max_abs_diff_vs_trained": max((r["max_abs_diff_vs_trained"] for r in per), default=None),
            "label_changes_vs_trained": sum(r["label_private"] != r["label_trained"] for r in per),
            "seconds_per_inference": sum(r["seconds"] for r in per) / max(1, len(per))}


def markdown(rows: list[dict]) -> str:
    s = next(r for r in rows if r.get("row") == "summary")
    per = [r for r in rows if r.get("row") == "inference"]
    out = [f"{s['inferences']} private inferences at {per[0]['tokens'] if per else '?'} tokens "
           f"(model {s.get('model')}, guess {s.get('guess')}, sigma {s.get('sigma')}): "
           f"**{s['disagreements']} disagreements** beyond |logit difference| <= {s['tol']} "
           f"(largest {s['max_abs_diff']:.3g}), {s['label_changes']} label changes against the plaintext model; "
           f"against the trained function (exact rsqrt): largest difference {s['max_abs_diff_vs_trained']:.3g}, "
           f"{s['label_changes_vs_trained']} label changes. {s['seconds_per_inference']:.1f} s per inference.",
           "", "| kind | inferences | largest |Δ logit| vs plaintext | vs trained | disagreements |",
           "|---|---|---|---|---|"]
    for k in KINDS:
        rk = [r for r in per if r["kind"] == k]
        if rk:
            out.append(f"| {k} | {len(rk)} | {max(r['max_abs_diff'] for r in rk):.3g} | "
                       f"{max(r['max_abs_diff_vs_trained'] for r in rk):.3g} | {sum(not r['agrees'] for r in rk)} |")
    return "\n".join(out)


def main(args) -> int:
    from .. import checkpoint
    from ..client import PrivateClient
    from ..demo import DEMO_MODEL, cache_dir
    from ..finetune import load_dataset
    from ..nn import prepare_params
    from ..serve import spawn_roles
    from .ops import git_sha, write_results

    model = Path(args.model or cache_dir() / DEMO_MODEL)
    if not (model / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {model}: run `make demo` once (it fine-tunes the demo model) "
                         "or pass --model")
    arch, params, meta = checkpoint.load(model)
    approx = checkpoint.approx_of(meta)
    if args.guess:
        from dataclasses import replace

        approx = replace(approx, guess=args.guess)
    prepared = prepare_params(arch, params, approx)  # once: the plaintext references of every batch reuse it
    _, _, test, _, _ = load_dataset("rt")
    sentences = [t for t, _ in test]
    rows, sha = [], git_sha()
    base = {"model": model.name, "guess": approx.guess, "sigma": approx.sigma if "comet" in approx.guess else None,
            "git_sha": sha, "command": f"cometpi bench soak --n {args.n} --batch {args.batch} --length {args.length}"
                                       + (f" --guess {args.guess}" if args.guess else "")}
    extra = ["--guess", args.guess] if args.guess else []
    with spawn_roles(model, "--timeout", "900", *extra, timeout=300) as roles:
        with PrivateClient(roles.saddr, roles.daddr, timeout=900) as client:
            per_kind = -(-args.n // len(KINDS))
            items = texts(per_kind, args.length * 2, sentences, client.tokenizer)[: args.n]
            for i in tqdm(range(0, len(items), args.batch), desc="private inferences", unit="batch"):
                chunk = items[i:i + args.batch]
                t0 = time.perf_counter()
                res = client.classify([t for _, t in chunk], max_length=args.length, pad_to=args.length)
                dt = (time.perf_counter() - t0) / len(chunk)
                ids, mask = client.encode([t for _, t in chunk], max_length=args.length, pad_to=args.length)
                plain, trained = _references(arch, prepared, approx, ids, mask)
                on = res[0]["batch_stats"]["online"]
                online = on["bytes_sent"] + on["bytes_recv"]
                for (kind, _), r, p, q in zip(chunk, res, plain, trained, strict=True):
                    lp = torch.tensor(r["logits"], dtype=torch.float64)
                    diff = float((lp - p).abs().max())
                    rows.append({**base, "row": "inference", "kind": kind, "tokens": int(ids.shape[1]),
                                 "logits_private": r["logits"], "logits_plain": p.tolist(),
                                 "max_abs_diff": diff, "max_abs_diff_vs_trained": float((lp - q).abs().max()),
                                 "label_private": int(lp.argmax()), "label_plain": int(p.argmax()),
                                 "label_trained": int(q.argmax()),
                                 "agrees": diff <= args.tol and int(lp.argmax()) == int(p.argmax()), "seconds": dt,
                                 "online_bytes_per_inference": online / len(chunk)})
                done = rows + [{**base, **summary(rows, args.tol)}]
                write_results(Path(args.out), done, markdown(done))
    done = rows + [{**base, **summary(rows, args.tol)}]
    print(markdown(done))
    return 0 if done[-1]["disagreements"] == 0 else 1
