"""``cometpi bench model``: private inference of whole models, over TCP with three processes.

For each case (model, sequence length, batch, approximation config) it starts the dealer and a model
server (``cometpi serve``) as processes and runs the client here; it records online and offline bytes
(both parties: the server reports its own), rounds, loopback seconds, projected LAN/WAN/BOLT-WAN
times, a per-layer-type breakdown and each party's peak memory.

With the default thermometer guess BERT-base/128 runs whole (12 layers).  With Comet's flooded guess
a 12-layer run takes many minutes on 2 cores, so those BERT-base rows are measured with the first 1
and 2 layers and extrapolated to 12: every layer has the same shapes, so bytes and rounds of layer
k are exactly those of layer 1 (the extrapolation is exact for them; seconds and memory are
estimates).  Rows say which.  MiniLM-L6 runs whole.  Weights: BERT-base random (no real checkpoint
exists in the registries), MiniLM real.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import kernels
from ..nn import breakdown
from ..transport import NETWORKS
from .machine import machine
from .ops import git_sha, write_results

# Comet's own constructions (SMU by rsqrt, the smooth ReLU: ../shared/COMET.md) with its guesses
COMET = {"gelu": "smu", "softmax": "relu", "guess": "comet", "sigma": 40, "smu_form": "rsqrt", "relu": "smooth"}
CONSTANT = {"gelu": "smu", "softmax": "relu", "guess": "constant", "sigma": 40, "smu_form": "rsqrt", "relu": "smooth"}
THERMOMETER = {"gelu": "smu", "softmax": "relu", "guess": "thermometer", "sigma": 40, "smu_form": "rsqrt",
               "relu": "smooth"}
BASELINE = {"gelu": "quad", "softmax": "quad2", "guess": "constant", "sigma": 40}
# the default: SMU by segments (mu folded into the weights), the exact ReLU by the narrow comparison
SEGMENTS = {"gelu": "smu", "softmax": "relu", "guess": "thermometer", "sigma": 40, "smu_form": "segments",
            "relu": "narrow"}


def cases(quick: bool) -> list[dict]:
    if quick:
        return [dict(model="bert-base", seq=8, batch=1, approx=CONSTANT, layers=[1, 2], repeat=True)]
    out = [dict(model="bert-base", seq=128, batch=1, approx=SEGMENTS, layers=None, repeat=True),
           dict(model="minilm", seq=128, batch=1, approx=SEGMENTS, layers=None),
           dict(model="bert-base", seq=128, batch=1, approx=THERMOMETER, layers=None, repeat=True),
           dict(model="bert-base", seq=128, batch=1, approx=COMET, layers=[1, 2], repeat=True),
           dict(model="bert-base", seq=128, batch=1, approx=CONSTANT, layers=[1, 2]),
           dict(model="bert-base", seq=128, batch=1, approx=BASELINE, layers=[1, 2])]
    out += [dict(model="bert-base", seq=t, batch=1, approx=COMET, layers=[1, 2]) for t in (32, 64, 256)]
    out += [dict(model="bert-base", seq=32, batch=b, approx=COMET, layers=[1, 2]) for b in (4, 8)]
    out += [dict(model="minilm", seq=128, batch=1, approx=COMET, layers=None),
            dict(model="minilm", seq=32, batch=4, approx=COMET, layers=None)]
    return out


def bert_base_dir(root: Path) -> str:
    """A random-weight bert-base classifier (BertConfig() defaults, 2 labels), saved once."""
    import transformers

    path = root / "bert-base-random"
    if not (path / "config.json").exists():
        torch.manual_seed(0)  # benchmark weights, not protocol randomness
        m = transformers.BertForSequenceClassification._from_config(transformers.BertConfig(num_labels=2),
                                                                    attn_implementation="eager")
        m.save_pretrained(path)
    return str(path)


def run_case(model_dir: str, case: dict, layers: int | None, daddr: str) -> dict:
    from ..client import PrivateClient
    from ..serve import spawn, stop
    from ..service import peak_rss_mb, reset_peak_rss

    reset_peak_rss()  # the client's peak of this case only
    a = case["approx"]
    args = ["serve", "--model", model_dir, "--port", "0", "--dealer", daddr, "--once", "--gelu", a["gelu"],
            "--softmax", a["softmax"], "--guess", a["guess"], "--sigma", str(a["sigma"]), "--timeout", "600",
            "--allow-stats"]  # the server's peak memory and spans (server_stats)
    args += [x for k in ("smu_form", "relu") if k in a for x in (f"--{k.replace('_', '-')}", a[k])]
    if layers is not None:
        args += ["--layers", str(layers)]
    from ..policy import floor_violations

    allow = ",".join(sorted({name for name, _ in floor_violations(a, None)})) or None  # a case below the floor
    if allow:  # (e.g. --sigma 30) is measured on purpose: both sides accept it
        args += ["--allow-insecure", allow]
    server, saddr = spawn(args, timeout=300)
    try:
        with PrivateClient(saddr, daddr, timeout=600, allow_insecure=allow) as client:
            g = torch.Generator().manual_seed(1)  # token ids for the benchmark (not protocol randomness)
            ids = torch.randint(1000, client.arch.vocab, (case["batch"], case["seq"]), generator=g)
            out, stats = client.infer_ids(ids)
            client_rep = client.sess.meter.report()  # before any repeat: spans of one query
            client_peak = peak_rss_mb()
            server_rep = client.server_stats()
            again = client.infer_ids(ids)[1]["seconds"] if case.get("repeat") else None
            arch = client.arch
        server.wait(60)
    finally:
        stop(server)
    spans = {k: v for k, v in client_rep["spans"].items() if not k.startswith("prepare_model")}
    by_type = breakdown(spans)
    server_types = breakdown({k: v for k, v in server_rep["spans"].items() if not k.startswith("prepare_model")})
    for k, v in by_type.items():  # the server's dealer traffic is offline too
        v["offline_bytes"] += server_types.get(k, {}).get("offline_bytes", 0)
    on = stats["online"]
    server_dealer = server_rep["spans"].get("inference", {}).get("offline", {})
    return {
        "arch": {"kind": arch.kind, "layers": arch.layers, "hidden": arch.hidden, "heads": arch.heads, "ffn": arch.ffn},
        "bytes_online": on["bytes_sent"] + on["bytes_recv"],
        "header_bytes_online": on["header_bytes_sent"] + on["header_bytes_recv"],
        "bytes_offline": stats["offline"]["bytes_sent"] + stats["offline"]["bytes_recv"]
        + server_dealer.get("bytes_sent", 0) + server_dealer.get("bytes_recv", 0),
        "bytes_offline_per_session": sum(v["offline"]["bytes_sent"] + v["offline"]["bytes_recv"]
                                         for k, v in client_rep["spans"].items() if k == "prepare_model"),
        "rounds": on["rounds"], "seconds": stats["seconds"], "seconds_dealer_prefetched": again,
        "by_layer_type": by_type,
        "peak_memory_mb": {"client_process": client_peak, "server_process": server_rep["peak_rss_mb"]},
        "kernel": {"client": kernels.kernel_label(), "server": server_rep.get("kernels", {}).get("kernel", "?")},
        "machine": machine(),
        "output_shape": list(out.shape),
    }


def extrapolate(one: dict, two: dict, layers: int) -> dict:
    """Cost of ``layers`` layers from runs with 1 and 2 (identical layers: exact for bytes/rounds)."""
    def lin(a, b):
        return a + (b - a) * (layers - 1)

    out = dict(two)
    for key in ("bytes_online", "header_bytes_online", "bytes_offline", "rounds", "seconds"):
        out[key] = lin(one[key], two[key])
    if two.get("seconds_dealer_prefetched") is not None:
        out["seconds_dealer_prefetched"] = lin(one["seconds_dealer_prefetched"], two["seconds_dealer_prefetched"])
    per_layer = ("layernorm", "linear", "attention matmul", "softmax", "gelu", "rotary", "swiglu gate")  # else once
    out["by_layer_type"] = {
        k: ({f: lin(one["by_layer_type"].get(k, {}).get(f, 0), v[f]) for f in v} if k in per_layer else v)
        for k, v in two["by_layer_type"].items()
    }
    out["bytes_offline_per_session"] = lin(one["bytes_offline_per_session"], two["bytes_offline_per_session"])
    out["peak_memory_mb"] = {"measured_1_layer": one["peak_memory_mb"], "measured_2_layers": two["peak_memory_mb"]}
    out["arch"] = {**two["arch"], "layers": layers}
    out["extrapolated_from_layers"] = [1, 2]
    out["measured"] = {"1": {k: one[k] for k in ("bytes_online", "rounds", "seconds")},
                       "2": {k: two[k] for k in ("bytes_online", "rounds", "seconds")}}
    return out


def markdown(rows: list[dict]) -> str:
    out = ["| model | seq | batch | gelu/softmax/guess (σ) | online | offline/query | offline/session | rounds | "
           "loopback s | LAN s | WAN s | how | CPU, kernel client/server |", "|" + "---|" * 13]
    for r in rows:
        a = r["approx"]
        how = ("measured" if "extrapolated_from_layers" not in r else "1+2 layers measured, ×12 exact bytes")
        how += f", {r['arch']['layers']} layers" if "extrapolated_from_layers" not in r else ""
        gelu = a["gelu"] + (f" ({a['smu_form']})" if "smu_form" in a else "")
        softmax = a["softmax"] + (f" ({a['relu']} ReLU)" if "relu" in a else "")
        out.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {gelu}/{softmax}/{a['guess']} "
                   f"({a['sigma']:g}) | {r['bytes_online'] / 1e9:.2f} GB | {r['bytes_offline'] / 1e9:.2f} GB | "
                   f"{r['bytes_offline_per_session'] / 1e6:.0f} MB | {r['rounds']:,} | {r['seconds']:.0f} | "
                   f"{r['projected_seconds']['lan']:.0f} | {r['projected_seconds']['wan']:.0f} | {how} | "
                   f"{_where(r)} |")
    return "\n".join(out)


def _where(r: dict) -> str:
    """'CPU (family/model), kernel client/server' of a row; rows from before kernels were chosen ran int64."""
    m, k = r.get("machine"), r.get("kernel")
    cpu = f"{m['cpu']} ({m['family_model']}{', AVX-512' if m['avx512'] else ''})" if m else "not recorded"
    return f"{cpu}, {k['client']}/{k['server']}" if k else f"{cpu}, int64 (fixed)"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["seq"] == 128 and r["batch"] == 1] or rows[:4]
    types = sorted({k for r in sel for k in r["by_layer_type"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(sel)
    labels = [f"{r['model']}\n{r['approx']['gelu']}/{r['approx']['softmax']}\n{r['approx']['guess']}" for r in sel]
    for t in types:
        vals = [r["by_layer_type"].get(t, {}).get("online_bytes", 0) / 1e9 for r in sel]
        ax.bar(range(len(sel)), vals, bottom=bottom, label=t)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(sel)), labels, fontsize=8)
    ax.set_ylabel("online bytes per inference (GB)")
    ax.set_title("Private inference at seq 128, batch 1: online traffic by layer type")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="one tiny case (smoke run)")
    p.add_argument("--model", choices=["bert-base", "minilm", "smollm2"], default=None,
                   help="run one case only (with --seq, --batch, --guess, ...) and upsert its row into --out")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gelu", default="smu")
    p.add_argument("--softmax", default="relu")
    p.add_argument("--guess", default="thermometer")
    p.add_argument("--sigma", type=float, default=40.0)
    p.add_argument("--smu-form", dest="smu_form", choices=["segments", "rsqrt"], default="segments")
    p.add_argument("--relu", choices=["narrow", "smooth", "full"], default="narrow")
    p.add_argument("--layers", type=int, default=None,
                   help="layers to run whole (default: all); 0: BERT-base's 1+2-layer extrapolation to 12")
    p.add_argument("--out", default="bench/results/model.jsonl")


def _key(r: dict) -> tuple:
    approx = {**r["approx"], "sigma": float(r["approx"]["sigma"])}  # 40 and 40.0 are one case
    return (r["model"], r["seq"], r["batch"], json.dumps(approx, sort_keys=True),
            "extrapolated_from_layers" in r, r["arch"]["layers"])


def _upsert(out: Path, new: list[dict]) -> list[dict]:
    old = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    keys = {_key(r) for r in new}
    return [r for r in old if _key(r) not in keys] + new


def main(args) -> int:
    from ..serve import spawn, stop
    from ..service import resolve_model_dir

    sha = git_sha()
    out = Path(args.out)
    rows = []
    dealer, daddr = spawn(["dealer", "--port", "0"])
    try:
        with tempfile.TemporaryDirectory(prefix="cometpi-bench-") as tmp:
            dirs = {"bert-base": bert_base_dir(Path(tmp)), "minilm": resolve_model_dir("minilm")}
            if args.model == "smollm2":
                dirs["smollm2"] = resolve_model_dir("smollm2")
            if args.model:
                approx = {"gelu": args.gelu, "softmax": args.softmax, "guess": args.guess, "sigma": args.sigma}
                if args.gelu == "smu":
                    approx["smu_form"] = args.smu_form
                if args.softmax == "relu":
                    approx["relu"] = args.relu
                todo = [dict(model=args.model, seq=args.seq, batch=args.batch, approx=approx,
                             layers=[1, 2] if args.layers == 0 else None, whole_layers=args.layers or None,
                             repeat=True)]
            else:
                todo = cases(args.quick)
            for case in tqdm(todo, desc="bench model"):
                t0 = time.time()
                if case["layers"]:
                    one = run_case(dirs[case["model"]], case, 1, daddr)
                    two = run_case(dirs[case["model"]], case, 2, daddr)
                    rec = extrapolate(one, two, 12)
                else:
                    rec = run_case(dirs[case["model"]], case, case.get("whole_layers"), daddr)
                total = rec["bytes_online"] + rec["header_bytes_online"]
                rec.update({"model": case["model"], "seq": case["seq"], "batch": case["batch"],
                            "approx": case["approx"], "f": 16, "trunc": "exact", "git_sha": sha,
                            "command": "cometpi bench model" + (
                                f" --model {args.model} --seq {args.seq} --batch {args.batch} --gelu {args.gelu} "
                                f"--softmax {args.softmax} --guess {args.guess} --sigma {args.sigma:g} "
                                f"--smu-form {args.smu_form} --relu {args.relu}"
                                + (f" --layers {args.layers}" if args.layers is not None else "")
                                if args.model else (" --quick" if args.quick else "")),
                            "bench_seconds": time.time() - t0,
                            "projected_seconds": {k: n.project(rec["seconds"], total, rec["rounds"])
                                                  for k, n in NETWORKS.items()}})
                rows.append(rec)
                print(json.dumps({k: rec[k] for k in ("model", "seq", "batch", "bytes_online", "rounds", "seconds")}),
                      flush=True)
    finally:
        stop(dealer)
    if args.model:
        rows = _upsert(out, rows)
    md = markdown(rows)
    write_results(out, rows, md)
    plot(rows, out.parent / "model_bytes_by_layer_type.png")
    print(md)
    return 0
