"""``cometpi bench load``: one model server, N clients, sequentially and concurrently.

For each ``--workers`` setting the dealer and the server start as processes; ``--clients`` clients
(threads of this process, each with its own TCP connections and session) then classify one real test
sentence each, all at once. Each client's label is checked against the plaintext simulation of its
own text. The benchmark writes throughput, latency and peak memory to bench/results/load.{jsonl,md}.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import torch


def add_arguments(p) -> None:
    p.add_argument("--model", default="minilm", help="checkpoint directory or 'minilm'")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--guess", default="constant", choices=["thermometer", "comet", "constant"])
    p.add_argument("--out", default="bench/results/load.jsonl")


def run(model: str, clients: int, workers: int, guess: str, texts: list[str]) -> dict:
    from .. import checkpoint
    from ..client import PrivateClient
    from ..nn import ApproxConfig, plaintext_forward
    from ..serve import spawn_roles
    from ..service import peak_rss_mb, reset_peak_rss, resolve_model_dir

    reset_peak_rss()
    with spawn_roles(model, "--guess", guess, "--workers", str(workers), "--timeout", "600", "--allow-stats",
                     timeout=300) as roles:
        saddr, daddr = roles.saddr, roles.daddr
        out: dict[int, dict] = {}
        errors: list = []

        def client(i: int) -> None:
            try:
                t0 = time.perf_counter()
                with PrivateClient(saddr, daddr, timeout=600) as c:
                    r = c.classify([texts[i]], max_length=64)[0]
                    ids, mask = c.encode([texts[i]], max_length=64)
                out[i] = {"logits": r["logits"], "latency": time.perf_counter() - t0, "ids": ids, "mask": mask,
                          "online": r["batch_stats"]["online"]}
            except Exception as e:  # noqa: BLE001
                errors.append((i, repr(e)))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        with PrivateClient(saddr, daddr, timeout=600) as c:
            server_peak = c.server_stats()["peak_rss_mb"]
    resolved = resolve_model_dir(model)
    arch, params, meta = checkpoint.load(resolved)
    approx = dataclasses.replace(checkpoint.approx_of(meta) or ApproxConfig(), guess=guess)
    correct = 0
    for r in out.values():
        want = plaintext_forward(arch, params, r["ids"], r["mask"], approx)[0]
        correct += int(torch.tensor(r["logits"]).argmax() == want.argmax())
    lat = sorted(r["latency"] for r in out.values())
    return {"model": Path(resolved).name, "clients": clients, "workers": workers, "guess": guess, "errors": errors,
            "wall_seconds": round(wall, 1), "throughput_per_minute": round(60 * len(out) / wall, 2),
            "latency_mean": round(sum(lat) / max(1, len(lat)), 1), "latency_max": round(max(lat, default=0), 1),
            "labels_matching_plaintext": f"{correct}/{clients}",
            "online_bytes_per_query": sum(r["online"]["bytes_sent"] + r["online"]["bytes_recv"]
                                          for r in out.values()) / max(1, len(out)),
            "peak_memory_mb": {"server_process": server_peak, "clients_process": peak_rss_mb()},
            "threads": torch.get_num_threads()}


def main(args) -> int:
    from ..finetune import load_dataset
    from .ops import git_sha, write_results

    _, _, test, _, _ = load_dataset("rt")
    texts = [t for t, _ in test if 8 <= len(t.split()) <= 12][: args.clients]
    rows = []
    for w in args.workers:
        r = run(args.model, args.clients, w, args.guess, texts)
        r["git"] = git_sha()
        rows.append(r)
        print(r, flush=True)
    head = ("| workers | clients | wall s | queries/min | latency mean / max s | labels = plaintext | online/query "
            "| server peak MB | clients' process peak MB |\n|---|---|---|---|---|---|---|---|---|")
    md = "\n".join([head] + [
        f"| {r['workers']} | {r['clients']} | {r['wall_seconds']} | {r['throughput_per_minute']} | "
        f"{r['latency_mean']} / {r['latency_max']} | {r['labels_matching_plaintext']} | "
        f"{r['online_bytes_per_query'] / 1e6:.0f} MB | {r['peak_memory_mb']['server_process']:.0f} | "
        f"{r['peak_memory_mb']['clients_process']:.0f} |" for r in rows])
    write_results(Path(args.out), rows, md)
    return 0
