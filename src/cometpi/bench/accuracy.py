"""``cometpi bench accuracy``: fine-tune every variant on Rotten Tomatoes, measure its accuracy in
plaintext and (for some) through the private path, and write bench/results/accuracy.{json,md,png}.

Each step is skipped when its output exists (checkpoints in ``--runs``; private records resume), so
the benchmark can be run piecewise.  ``--report`` only redraws the table and plot from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

VARIANTS = [  # (name, variant, kd)
    ("exact", "exact", False),
    ("comet", "comet", False),
    ("comet-kd", "comet", True),
    ("mpcformer", "mpcformer", False),
    ("mpcformer-kd", "mpcformer", True),
]
# The recipe behind bench/results/accuracy.json (2 CPU cores; docs/finetune.md): epochs and body lr.
# The quadratic MPCFormer functions start far from the teacher's, so they get a larger lr; the
# variants without KD had one epoch for lack of machine time.
RECIPE = {"exact": (2, 5e-5), "comet-kd": (2, 5e-5), "comet": (1, 5e-5), "mpcformer-kd": (1, 1e-4),
          "mpcformer": (1, 1e-4)}


def add_arguments(p) -> None:
    p.add_argument("--runs", default="runs", help="checkpoint folder (default runs/)")
    p.add_argument("--epochs", type=float, default=None, help="epochs for every variant (default: RECIPE)")
    p.add_argument("--variants", nargs="*", default=[v[0] for v in VARIANTS])
    p.add_argument("--private", type=int, default=500, help="seeded test rows classified privately")
    p.add_argument("--private-variants", nargs="*", default=["comet-kd", "mpcformer-kd"])
    p.add_argument("--guess", default=None, choices=["comet", "constant"],
                   help="rsqrt guess for the private runs (default: the checkpoint's, comet)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default="bench/results/accuracy.json")
    p.add_argument("--report", action="store_true", help="only write the table and plot from --out")


def markdown(rows: list[dict]) -> str:
    head = ("| variant | KD | GeLU / softmax | plaintext exact | plaintext approx (trained) | plaintext simulated "
            "| private | agreement | private rows | online / example | seconds / example |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        a, pt, pv = r.get("approx") or {}, r["plaintext"], r.get("private")
        fn = "GeLU / softmax" if not a else f"{a['gelu']} / {a['softmax']}" + (
            f" ({a['guess']} guess)" if pv else "")
        cells = [r["name"], "yes" if r.get("kd") else "no", fn, f"{100 * pt['exact']:.2f}",
                 f"{100 * pt['trained']:.2f}" if "trained" in pt else "-",
                 f"{100 * pt['simulated']:.2f}" if "simulated" in pt else "-"]
        if pv:
            cells += [f"{100 * pv['accuracy']:.2f} (sim. {100 * pv['simulated_accuracy_same_rows']:.2f})",
                      f"{100 * pv['agreement_with_simulated']:.2f}%", str(pv["n"]),
                      f"{pv['online_bytes_per_example'] / 1e9:.2f} GB", f"{pv['seconds_per_example']:.1f}"]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    exact = next((r for r in rows if r["name"] == "exact"), None)
    for r in rows:
        pv = r.get("private")
        if not pv:
            continue
        x = pv["online_bytes_per_example"] / 1e9
        ax.scatter([x], [100 * pv["accuracy"]], s=40, zorder=3)
        ax.annotate(f"{r['name']} ({r['approx']['guess']} guess)\nprivate, n={pv['n']}",
                    (x, 100 * pv["accuracy"]), textcoords="offset points", xytext=(6, -4), fontsize=8)
    if exact:
        ax.axhline(100 * exact["plaintext"]["exact"], ls="--", c="gray", lw=1)
        ax.text(ax.get_xlim()[0], 100 * exact["plaintext"]["exact"], " exact model (plaintext)", va="bottom",
                fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("online bytes per example (GB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes: accuracy vs private cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> None:
    from ..serve import atomic_write

    rows = json.loads(out.read_text())
    order = {name: i for i, (name, _, _) in enumerate(VARIANTS)}
    rows.sort(key=lambda r: order.get(r["name"], 99))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(rows) + "\n"))
    plot(rows, out.with_name("accuracy_vs_online_bytes.png"))


def main(args) -> int:
    from ..data import minilm_path
    from ..evaluate import evaluate, save_result
    from ..finetune import FinetuneConfig, finetune, load_dataset

    out = Path(args.out)
    if args.report:
        report(out)
        return 0
    from transformers import AutoTokenizer

    runs = Path(args.runs)
    train, dev, _, labels, name = load_dataset("rt")
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    teacher = runs / "exact"
    for vname, variant, kd in VARIANTS:
        if vname != "exact" and vname not in args.variants:  # exact is the teacher of the others
            continue
        ckpt = runs / vname
        if not (ckpt / "cometpi.json").is_file():
            epochs, lr = RECIPE[vname]
            cfg = FinetuneConfig(variant=variant, kd=kd, teacher=None if variant == "exact" else str(teacher),
                                 epochs=args.epochs or epochs, lr=lr)
            finetune(cfg, train, dev, str(ckpt), base=minilm_path(), labels=labels, tokenizer=tok, data_name=name)
    for vname, _, _ in VARIANTS:
        if vname not in args.variants:
            continue
        private = args.private if vname in args.private_variants else 0
        overrides = {"guess": args.guess} if args.guess and private else {}
        res = evaluate(str(runs / vname), name=vname, private=private, batch=args.batch,
                       approx_overrides=overrides)
        save_result(res, out)
        report(out)
    return 0
