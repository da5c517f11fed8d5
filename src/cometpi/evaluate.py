"""Accuracy of a fine-tuned classifier: in plaintext (exact and approximate) and through the real
private path (dealer, server and client as separate processes over TCP).

Three plaintext accuracies on the whole test split:

* ``exact``     -- GeLU, softmax, LayerNorm and tanh exactly (what the weights give without Comet);
* ``trained``   -- the approximations with exact rsqrt (the functions the model was fine-tuned for);
* ``simulated`` -- the protocol's own math in float64: rsqrt by its initial guess (Comet's on
  simulated flooded shares, or the constant) and Newton steps, CrypTen's tanh in the pooler.

These cost minutes (the simulated guess most), so they can be reused from a cache file keyed by the
model hash, the approximations, the tokenized test split and the max length (``plaintext_cache``;
``cometpi eval --plaintext-cache``), or skipped before a private run (``skip_plaintext``: only the
private rows are simulated, for the agreement).

The private run classifies a seeded subset of the test split (``_order`` ranks; the same subset on
every machine), in batches of similar length (the padded length of each batch is public), and
compares each private prediction with the simulated one (agreement).  Per-example records go to a
JSONL file as they arrive, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .approx.config import ApproxConfig, resolve_approx
from .convert import params_hash
from .finetune import _order, collate, load_dataset, predict

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


def plaintext_key(model_hash: str, approx: ApproxConfig | None, data_name: str, enc, y, max_length: int) -> dict:
    """What the plaintext accuracies depend on: the weights, the approximations, the test split as
    tokenized (so the data file's rows, the tokenizer and ``max_length`` are all in the hash) and the
    code that computes them."""
    h = hashlib.sha256(json.dumps([list(map(list, enc["input_ids"])), y.tolist()]).encode()).hexdigest()[:16]
    return {"model_hash": model_hash, "approx": None if approx is None else approx.to_dict(), "data": data_name,
            "split": "test", "n_test": len(y), "max_length": max_length, "test_hash": h, "code_hash": _code_hash()}


def _code_hash() -> str:
    """Hash of the sources of the float model and the approximations (a change there recomputes)."""
    pkg = Path(__file__).parent
    h = hashlib.sha256()
    for f in [pkg / "nn.py", pkg / "weights.py", *sorted((pkg / "approx").glob("*.py"))]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _cached_plaintext(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); remove it or pass another --plaintext-cache") from None
    return next((e for e in entries if isinstance(e, dict) and e.get("key") == key), None)


def _store_plaintext(path: Path, entry: dict) -> None:
    from .costs import save_json

    entries = json.loads(path.read_text()) if path.is_file() else []
    save_json(str(path), [e for e in entries if e.get("key") != entry["key"]] + [entry])


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


def serve_flags(timeout: float, approx_overrides: dict) -> list[str]:
    """The ``cometpi serve`` options of the private run, after its model and dealer (ApproxConfig field
    names become flags: smu_form -> --smu-form)."""
    args = ["--once", "--timeout", str(timeout)]
    for k, v in approx_overrides.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def run_private(model_dir: str, approx_overrides: dict, enc, y, subset: list[int], sim_pred, *, batch: int,
                records: Path, header: dict, timeout: float = 600.0) -> list[dict]:
    """Classify ``subset`` privately (3 processes) and return one record per example."""
    from .client import PrivateClient
    from .serve import spawn_roles

    done = _read_records(records, header)
    # longest first: the progress bar's ETA then errs long rather than short
    todo = sorted((i for i in subset if i not in done), key=lambda i: -len(enc["input_ids"][i]))
    if todo:
        records.parent.mkdir(parents=True, exist_ok=True)
        if not done:
            records.write_text(json.dumps(header) + "\n")
        with spawn_roles(model_dir, *serve_flags(timeout, approx_overrides), timeout=300) as roles:
            with PrivateClient(roles.saddr, roles.daddr, timeout=timeout) as client, records.open("a") as f:
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
            roles.server.wait(60)
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
             timeout: float = 600.0, skip_plaintext: bool = False, plaintext_cache: str | Path | None = None,
             log=print) -> dict:
    """Plaintext accuracies on the test split and, with ``private`` > 0, the private run on that many.

    ``plaintext_cache``: a JSON file of earlier plaintext results; one with the same key
    (:func:`plaintext_key`) is reused (and said so), else the new one is stored there.
    ``skip_plaintext`` (with ``private``): no plaintext accuracies unless cached; the simulated
    predictions are computed for the private rows only."""
    from transformers import AutoTokenizer

    from .costs import git_sha

    arch, params, meta = checkpoint.load(model_dir)
    trained = checkpoint.approx_of(meta)
    approx = None  # an exact checkpoint evaluated in plaintext only, as it is
    if (trained is not None and not trained.is_exact) or approx_overrides or private:
        approx = resolve_approx(trained, params, approx_overrides, layers=arch.layers)  # the same as serve's
    _, _, test, labels, data_name = load_dataset(data, text_col, label_col)
    if meta.get("data") and meta["data"] != data_name:
        log(f"note: {model_dir} was fine-tuned on {meta['data']}, evaluated on {data_name}")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = tok([t for t, _ in test], truncation=True, max_length=max_length)
    y = torch.tensor([lab for _, lab in test])
    if skip_plaintext and not private:
        raise ValueError("--skip-plaintext leaves nothing to evaluate without --private N")
    if private and (approx is None or approx.is_exact):  # before minutes of plaintext work
        raise ValueError("the private run needs approximations (this checkpoint is exact: pass --gelu/--softmax)")
    model_hash = params_hash(params)
    key = plaintext_key(model_hash, approx, data_name, enc, y, max_length)
    cache = Path(plaintext_cache) if plaintext_cache else None
    cached = _cached_plaintext(cache, key) if cache else None
    t0 = time.perf_counter()
    extra: dict = {}
    if cached is not None:
        plain, sim_pred = dict(cached["plaintext"]), cached.get("simulated_pred")
        sim_pred = None if sim_pred is None else torch.tensor(sim_pred)
        seconds = cached["plaintext_seconds"]
        extra["plaintext_reused_from"] = str(cache)
        log(f"reusing the plaintext accuracies in {cache} (same model hash {model_hash}, approximations, test split, "
            f"--max-length {max_length} and code; computed at git {cached.get('git')}, {seconds:g} s)")
    elif skip_plaintext:
        subset = private_subset(len(test), private, seed)
        sub = {"input_ids": [enc["input_ids"][i] for i in subset]}
        sim = predict(arch, params, approx, sub, ideal=False, dtype=torch.float64, desc="approx (simulated)")
        sim_pred = torch.full((len(test),), -1, dtype=torch.int64)
        sim_pred[subset] = sim.argmax(-1)
        plain, seconds = {}, round(time.perf_counter() - t0, 1)
        extra["plaintext_skipped"] = True
        log(f"skipped the plaintext accuracies on the test split (--skip-plaintext); simulated only the "
            f"{len(subset)} private rows")
    else:
        plain = plaintext(arch, params, approx, enc, y)
        sim_pred = plain.pop("simulated_pred", None)
        seconds = round(time.perf_counter() - t0, 1)
        if cache:
            _store_plaintext(cache, {"key": key, "plaintext": plain, "plaintext_seconds": seconds, "git": git_sha(),
                                     "simulated_pred": None if sim_pred is None else sim_pred.tolist()})
    result = {
        "name": name or Path(model_dir).name, "variant": meta.get("variant"), "kd": meta.get("kd"),
        "approx": None if approx is None else approx.to_dict(), "model_hash": model_hash,
        "data": data_name, "split": "test", "n_test": len(test), "max_length": max_length, "plaintext": plain,
        "plaintext_seconds": seconds, **extra, "dev_accuracy": meta.get("dev_accuracy"),
        "train_seconds": meta.get("train_seconds"), "epochs": (meta.get("config") or {}).get("epochs"),
        "git": git_sha(), "threads": torch.get_num_threads(),
    }
    if plain:
        log(f"{result['name']}: plaintext " + ", ".join(f"{k} {v:.4f}" for k, v in plain.items())
            + f" on {len(test)}")
    if private:
        subset = private_subset(len(test), private, seed)
        header = {"model_hash": result["model_hash"], "approx": result["approx"], "seed": seed, "n": len(subset),
                  "data": data_name, "max_length": max_length, "batch": batch}
        rec_path = Path(records or f"runs/eval-{result['name']}-{approx.guess}-{result['model_hash'][:8]}.jsonl")
        recs = run_private(model_dir, approx_overrides, enc, y, subset, sim_pred, batch=batch, records=rec_path,
                           header=header, timeout=timeout)
        result["private"] = {**summarize_private(recs), "seed": seed, "batch": batch, "records": str(rec_path)}
        # the original model (exact functions, plaintext) on the same rows: what a drop-in replacement must match
        exact = predict(arch, params, ApproxConfig.exact(), {"input_ids": [enc["input_ids"][i] for i in subset]},
                        ideal=True, desc="exact (private rows)").argmax(-1)
        preds = torch.tensor([r["pred"] for r in recs])
        result["private"]["exact_accuracy_same_rows"] = float((exact == y[subset]).double().mean())
        result["private"]["agreement_with_exact"] = float((exact == preds).double().mean())
        p = result["private"]
        log(f"private on {p['n']} seeded test rows: accuracy {p['accuracy']:.4f} (simulated on the same rows "
            f"{p['simulated_accuracy_same_rows']:.4f}, the exact plaintext model {p['exact_accuracy_same_rows']:.4f}), "
            f"agreement {p['agreement_with_simulated']:.4f} with the simulation, {p['agreement_with_exact']:.4f} with "
            f"the exact model, {p['online_bytes_per_example'] / 1e9:.2f} GB online and "
            f"{p['seconds_per_example']:.1f} s per example")
    return result


def save_result(result: dict, path: Path = RESULTS) -> None:
    """Upsert ``result`` (by name) into the JSON list at ``path`` (atomically)."""
    from .costs import save_json

    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if r.get("name") != result["name"]] + [result]
    save_json(str(path), sorted(rows, key=lambda r: r["name"]))
