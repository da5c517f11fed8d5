"""Accuracy of a fine-tuned classifier: in plaintext (exact and approximate) and through the real
private path (dealer, server and client as separate processes over TCP).

Three plaintext accuracies on the whole test split:

* ``exact``     -- GeLU, softmax, LayerNorm and tanh exactly (what the weights give without Comet);
* ``trained``   -- the approximations with exact rsqrt (the functions the model was fine-tuned for);
* ``simulated`` -- the protocol's own math in float64: rsqrt by its initial guess (Comet's on
  simulated flooded shares, or the constant) and Newton steps, CrypTen's tanh in the pooler.

The private run classifies a seeded subset of the test split (``_order`` ranks; the same subset on
every machine), in batches of similar length (the padded length of each batch is public), and
compares each private prediction with the simulated one (agreement).  Per-example records go to a
JSONL file as they arrive, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .convert import params_hash
from .finetune import _order, collate, load_dataset, predict
from .nn import ApproxConfig

RESULTS = Path("bench/results/accuracy.json")


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).double().mean())


def plaintext(arch, params, approx: ApproxConfig | None, enc, y) -> dict:
    """Accuracies (and the simulated predictions) on every row of ``enc``."""
    out = {"exact": _acc(predict(arch, params, ApproxConfig.exact(), enc, ideal=True, desc="exact"), y)}
    if approx is not None and not approx.is_exact:
        out["trained"] = _acc(predict(arch, params, approx, enc, ideal=True, desc="approx (exact rsqrt)"), y)
        sim = predict(arch, params, approx, enc, ideal=False, dtype=torch.float64, desc="approx (simulated)")
        out["simulated"] = _acc(sim, y)
        out["simulated_pred"] = sim.argmax(-1)
    return out


def private_subset(n_test: int, n: int, seed: int) -> list[int]:
    """The seeded subset of test indices the private run classifies (all of them if n >= n_test)."""
    return sorted(_order(n_test, seed, -200)[: min(n, n_test)])


def _read_records(path: Path, header: dict) -> dict[int, dict]:
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]) != header:
        raise ValueError(f"{path} holds records of another model, config or subset; remove it or pass another "
                         "--records file")
    done = {}
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except ValueError:
            break  # a record cut by a crash: it is redone
        done[r["i"]] = r
    return done


def run_private(model_dir: str, approx_overrides: dict, enc, y, subset: list[int], sim_pred, *, batch: int,
                records: Path, header: dict, timeout: float = 600.0) -> list[dict]:
    """Classify ``subset`` privately (3 processes) and return one record per example."""
    from .serve import spawn, stop
    from .service import PrivateClient

    done = _read_records(records, header)
    # longest first: the progress bar's ETA then errs long rather than short
    todo = sorted((i for i in subset if i not in done), key=lambda i: -len(enc["input_ids"][i]))
    if todo:
        records.parent.mkdir(parents=True, exist_ok=True)
        if not done:
            records.write_text(json.dumps(header) + "\n")
        dealer, daddr = spawn(["dealer", "--port", "0"])
        args = ["serve", "--model", model_dir, "--port", "0", "--dealer", daddr, "--once", "--timeout", str(timeout)]
        for k, v in approx_overrides.items():
            args += [f"--{k}", str(v)]
        server = None
        try:
            server, saddr = spawn(args, timeout=300)
            with PrivateClient(saddr, daddr, timeout=timeout) as client, records.open("a") as f:
                bar = tqdm(total=len(subset), initial=len(subset) - len(todo), desc="private", unit="example")
                for s in range(0, len(todo), batch):
                    idx = todo[s : s + batch]
                    ids, mask = collate(enc, idx)
                    logits, st = client.infer_ids(ids, mask)
                    on = st["online"]
                    per = {"online_bytes": (on["bytes_sent"] + on["bytes_recv"]) / len(idx),
                           "offline_bytes": (st["offline"]["bytes_sent"] + st["offline"]["bytes_recv"]) / len(idx),
                           "rounds": on["rounds"], "seconds": st["seconds"] / len(idx), "batch": len(idx),
                           "padded_length": ids.shape[1]}
                    for j, i in enumerate(idx):
                        r = {"i": i, "label": int(y[i]), "pred": int(logits[j].argmax()), "sim_pred": int(sim_pred[i]),
                             "logits": [round(v, 6) for v in logits[j].tolist()], "length": int(mask[j].sum()), **per}
                        f.write(json.dumps(r) + "\n")
                        done[i] = r
                    f.flush()
                    bar.update(len(idx))
                bar.close()
            server.wait(60)
        finally:
            if server is not None:
                stop(server)
            stop(dealer)
    return [done[i] for i in subset]


def summarize_private(recs: list[dict]) -> dict:
    n = len(recs)
    return {
        "n": n,
        "accuracy": sum(r["pred"] == r["label"] for r in recs) / n,
        "simulated_accuracy_same_rows": sum(r["sim_pred"] == r["label"] for r in recs) / n,
        "agreement_with_simulated": sum(r["pred"] == r["sim_pred"] for r in recs) / n,
        "online_bytes_per_example": sum(r["online_bytes"] for r in recs) / n,
        "offline_bytes_per_example": sum(r["offline_bytes"] for r in recs) / n,
        "seconds_per_example": sum(r["seconds"] for r in recs) / n,
        "rounds_per_batch": max(r["rounds"] for r in recs),
        "mean_length": sum(r["length"] for r in recs) / n,
        "mean_padded_length": sum(r["padded_length"] for r in recs) / n,
    }


def evaluate(model_dir: str, *, name: str | None = None, data: str = "rt", text_col: str = "text",
             label_col: str = "label", private: int = 0, batch: int = 8, seed: int = 0,
             approx_overrides: dict | None = None, records: str | None = None, max_length: int = 64,
             timeout: float = 600.0, log=print) -> dict:
    """Plaintext accuracies on the test split and, with ``private`` > 0, the private run on that many."""
    from transformers import AutoTokenizer

    from .bench.ops import git_sha

    arch, params, meta = checkpoint.load(model_dir)
    trained = checkpoint.approx_of(meta)
    approx_overrides = approx_overrides or {}
    approx = None
    if trained is not None and not trained.is_exact:
        approx = dataclasses.replace(trained, **approx_overrides)
    elif approx_overrides or private:
        approx = dataclasses.replace(ApproxConfig(), **approx_overrides)
    _, _, test, labels, data_name = load_dataset(data, text_col, label_col)
    if meta.get("data") and meta["data"] != data_name:
        log(f"note: {model_dir} was fine-tuned on {meta['data']}, evaluated on {data_name}")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = tok([t for t, _ in test], truncation=True, max_length=max_length)
    y = torch.tensor([lab for _, lab in test])
    t0 = time.perf_counter()
    plain = plaintext(arch, params, approx, enc, y)
    sim_pred = plain.pop("simulated_pred", None)
    result = {
        "name": name or Path(model_dir).name, "variant": meta.get("variant"), "kd": meta.get("kd"),
        "approx": None if approx is None else approx.to_dict(), "model_hash": params_hash(params),
        "data": data_name, "split": "test", "n_test": len(test), "plaintext": plain,
        "plaintext_seconds": round(time.perf_counter() - t0, 1), "dev_accuracy": meta.get("dev_accuracy"),
        "train_seconds": meta.get("train_seconds"), "epochs": (meta.get("config") or {}).get("epochs"),
        "git": git_sha(), "threads": torch.get_num_threads(),
    }
    log(f"{result['name']}: plaintext " + ", ".join(f"{k} {v:.4f}" for k, v in plain.items()) + f" on {len(test)}")
    if private:
        if sim_pred is None:
            raise ValueError("the private run needs approximations (this checkpoint is exact: pass --gelu/--softmax)")
        subset = private_subset(len(test), private, seed)
        header = {"model_hash": result["model_hash"], "approx": result["approx"], "seed": seed, "n": len(subset),
                  "data": data_name, "max_length": max_length, "batch": batch}
        rec_path = Path(records or f"runs/eval-{result['name']}-{approx.guess}-{result['model_hash'][:8]}.jsonl")
        recs = run_private(model_dir, approx_overrides, enc, y, subset, sim_pred, batch=batch, records=rec_path,
                           header=header, timeout=timeout)
        result["private"] = {**summarize_private(recs), "seed": seed, "batch": batch, "records": str(rec_path)}
        p = result["private"]
        log(f"private on {p['n']} seeded test rows: accuracy {p['accuracy']:.4f} (simulated on the same rows "
            f"{p['simulated_accuracy_same_rows']:.4f}), agreement {p['agreement_with_simulated']:.4f}, "
            f"{p['online_bytes_per_example'] / 1e9:.2f} GB online and {p['seconds_per_example']:.1f} s per example")
    return result


def save_result(result: dict, path: Path = RESULTS) -> None:
    """Upsert ``result`` (by name) into the JSON list at ``path`` (atomically)."""
    from .serve import save_json

    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if r.get("name") != result["name"]] + [result]
    save_json(str(path), sorted(rows, key=lambda r: r["name"]))
