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
    ("comet-kd-rsqrt", "comet-rsqrt", True),  # Comet's own SMU/ReLU in the loop (the 2026-11-25 recipe)
    ("mpcformer", "mpcformer", False),
    ("mpcformer-kd", "mpcformer", True),
]
# The recipe behind bench/results/accuracy.json (2 CPU cores; docs/finetune.md): epochs and body lr.
# Every variant gets the same 2 epochs; the quadratic MPCFormer functions start far from the teacher's,
# so they get a larger lr.
RECIPE = {"exact": (2, 5e-5), "comet-kd": (2, 5e-5), "comet": (2, 5e-5), "comet-kd-rsqrt": (2, 5e-5),
          "mpcformer-kd": (2, 1e-4), "mpcformer": (2, 1e-4)}


# The rows of bench/results/accuracy.json: (row name, checkpoint in --runs, private test rows, rsqrt guess
# for the private run (None: the checkpoint's own)).  The two 500-row runs are the headline; the 32-row runs
# give the other variants' cost; the 64-row pair compares Comet's flooded guess (sigma = 40) with the public
# constant on the same rows and batches.
EVALS = [
    ("exact", "exact", 0, None),
    ("comet-kd", "comet-kd", 500, "thermometer"),
    # a model trained with Comet's own functions, privately through the default path (segments SMU, narrow ReLU)
    ("comet-kd-rsqrt-through-segments", "comet-kd-rsqrt", 500, "thermometer",
     {"smu_form": "segments", "relu": "narrow"}),
    ("comet", "comet", 32, "thermometer"),
    ("mpcformer", "mpcformer", 32, None),
    ("mpcformer-kd", "mpcformer-kd", 500, None),
    ("comet-kd-64-comet-guess", "comet-kd", 64, "comet"),
    ("comet-kd-64-constant-guess", "comet-kd", 64, "constant"),
]
# Rows kept from the runs of commit b8b7eac (2026-11-25: Comet's own constructions, SMU by rsqrt and the smooth ReLU,
# trained in the loop): comet-rsqrt, comet-kd-rsqrt (the 83.40% reference of the segments SMU and narrow ReLU) and
# its two 64-row guess runs.
HISTORIC = ("comet-rsqrt", "comet-kd-rsqrt", "comet-kd-rsqrt-64-comet-guess", "comet-kd-rsqrt-64-constant-guess")


def add_arguments(p) -> None:
    p.add_argument("--runs", default="runs", help="checkpoint folder (default runs/)")
    p.add_argument("--epochs", type=float, default=None, help="epochs for every variant (default: RECIPE)")
    p.add_argument("--rows", nargs="*", default=[e[0] for e in EVALS],
                   help="result rows to (re)compute (default: all of EVALS)")
    p.add_argument("--private", type=int, default=None,
                   help="seeded test rows classified privately, for every row that has a private run "
                        "(default: EVALS, 32-500; 0: plaintext only)")
    p.add_argument("--guess", default=None, choices=["thermometer", "comet", "constant"],
                   help="rsqrt guess for every private run (default: EVALS)")
    p.add_argument("--batch", type=int, default=16, help="texts per private query")
    p.add_argument("--out", default="bench/results/accuracy.json")
    p.add_argument("--report", action="store_true", help="only write the table and plot from --out")


def markdown(rows: list[dict]) -> str:
    head = ("| variant | KD | GeLU / softmax | plaintext exact | plaintext approx (trained) | plaintext simulated "
            "| private | agreement | private rows | online / example | seconds / example | training |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, pt, pv = r.get("approx") or {}, r["plaintext"], r.get("private")
        forms = f" ({a.get('smu_form', 'rsqrt')} SMU, {a.get('relu', 'smooth')} ReLU)" if a.get("gelu") == "smu" else ""
        fn = "GeLU / softmax" if not a else f"{a['gelu']} / {a['softmax']}{forms}" + (
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
        ep, secs = r.get("epochs"), r.get("train_seconds")
        cells.append(f"{ep:g} ep, {secs / 60:.1f} min" if ep and secs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PRIVATE_POINT_MIN_ROWS = 100  # smaller private subsets are too noisy to plot as accuracy (the table has them)


def plot(rows: list[dict], path: Path) -> None:
    """One point per (weights, rsqrt guess): the whole split's simulated accuracy against the online bytes
    measured privately (the largest subset run), and, for subsets of >= PRIVATE_POINT_MIN_ROWS rows, the
    private accuracy on that subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[tuple, dict] = {}
    for r in rows:
        pv = r.get("private")
        if pv and "simulated" in r["plaintext"]:
            key = (r["model_hash"], r["approx"]["guess"])
            if key not in best or pv["n"] > best[key]["private"]["n"]:
                best[key] = r
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for k, r in enumerate(sorted(best.values(), key=lambda r: r["private"]["online_bytes_per_example"])):
        pv = r["private"]
        x, y = pv["online_bytes_per_example"] / 1e9, 100 * r["plaintext"]["simulated"]
        dot = ax.scatter([x], [y], s=45, zorder=3)
        if pv["n"] >= PRIVATE_POINT_MIN_ROWS:
            ax.scatter([x], [100 * pv["accuracy"]], s=45, marker="s", facecolors="none",
                       edgecolors=dot.get_facecolor()[0], zorder=3)
        a = r["approx"]
        guess = f"comet guess, σ={a['sigma']:g}" if a["guess"] == "comet" else f"{a['guess']} guess"
        variant = r["variant"] + ("-kd" if r.get("kd") else "")
        ax.annotate(f"{variant}, {guess}", (x, y), textcoords="offset points",
                    xytext=(6, (6, -12, 18)[k % 3]), fontsize=8)
    exact = next((r for r in rows if r["name"] == "exact"), None)
    if exact:
        ax.axhline(100 * exact["plaintext"]["exact"], ls="--", c="gray", lw=1, label="exact model (plaintext)")
    ax.scatter([], [], s=45, marker="o", color="k", label="simulated protocol, whole test split")
    ax.scatter([], [], s=45, marker="s", facecolors="none", edgecolors="k",
               label=f"private, seeded subset (>= {PRIVATE_POINT_MIN_ROWS} rows)")
    ax.legend(fontsize=8, loc="center right")
    if best:  # log scale, with room for the rightmost label
        ax.set_xscale("log")
        xs = [r["private"]["online_bytes_per_example"] / 1e9 for r in best.values()]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 4)
        ax.set_ylim(top=ax.get_ylim()[1] + 0.8)
    ax.set_xlabel("online bytes per example, measured privately (GB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes: accuracy vs private cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> None:
    from ..costs import atomic_write

    rows = json.loads(out.read_text())
    order = {e[0]: i for i, e in enumerate(EVALS)} | {h: len(EVALS) + i for i, h in enumerate(HISTORIC)}
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
    needed = {"exact"} | {e[1] for e in EVALS if e[0] in args.rows}  # exact: the teacher
    for vname, variant, kd in VARIANTS:
        ckpt = runs / vname
        if vname in needed and not (ckpt / "cometpi.json").is_file():
            epochs, lr = RECIPE[vname]
            cfg = FinetuneConfig(variant=variant, kd=kd, teacher=None if variant == "exact" else str(teacher),
                                 epochs=args.epochs or epochs, lr=lr)
            finetune(cfg, train, dev, str(ckpt), base=minilm_path(), labels=labels, tokenizer=tok, data_name=name)
    for row, ckpt, private, guess, *forms in EVALS:
        if row not in args.rows:
            continue
        private = args.private if private and args.private is not None else private
        guess = args.guess or guess
        overrides = {"guess": guess} if guess and private else {}
        overrides.update(forms[0] if forms else {})
        res = evaluate(str(runs / ckpt), name=row, private=private, batch=args.batch, approx_overrides=overrides)
        save_result(res, out)
        report(out)
    return 0
