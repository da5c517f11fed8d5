"""``cometpi bench ops``: cost and accuracy of each protocol at Transformer shapes.

Each op runs in-process (two threads, memory channels, in-process dealer) and over TCP with the
dealer, the server and the client as three OS processes.  For each op and truncation mode it records
measured online/offline payload bytes, messages, rounds, seconds (median of ``reps``), the documented
(theoretical) bytes and rounds beside them, the max error in ulps against plaintext, and projected
LAN/WAN times.  It also measures ring-matmul speed (limb split vs int64) and the failure rate of
local truncation.  Benchmarks measure and write JSON; they assert nothing.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import protocols as P
from ..core import Config, Role, Session, TruncMode
from ..costs import git_sha, write_results  # noqa: F401 - re-exported
from ..party import connect_client, run_local
from ..ring import FixedPoint, limbs_needed, random_ring, ring_matmul
from ..transport import NETWORKS, Traffic

T, D, FF = 128, 768, 3072  # BERT-base: tokens, hidden, FFN


@dataclass(frozen=True)
class Op:
    """One benchmarked protocol: inputs owned by client ('x') and server ('y' or 'w'), and the
    documented online cost as (bytes before truncation, rounds before truncation, truncated elements)."""

    name: str
    x: tuple
    y: tuple | None
    run: object
    ref: object
    theory: object  # (x_shape, y_shape) -> (bytes, rounds, truncated elements)
    y_private: bool = False
    x_scale: float = 4.0  # the client's input is uniform on [-x_scale, x_scale]
    exact_only: bool = False  # measured with exact truncation only (its theory counts that mode)


def _smu_segments(s, x, y):
    from ..approx import ShareOps
    from ..approx.segments import smu1_segments

    return smu1_segments(ShareOps(s), x)


def _relu_narrow(s, x, y):
    from ..approx.functions import SCORE_BITS

    return P.mul(x, P.drelu_narrow(x, SCORE_BITS), truncate_result=False)


def _segments_ref(X, Y):
    from ..approx.segments import segments_ref

    return segments_ref(X)


def _n(s) -> int:
    return math.prod(s)


OPS = [
    Op("mul", (T, FF), (T, FF), lambda s, x, y: P.mul(x, y), lambda X, Y: X * Y,
       lambda xs, ys: (32 * _n(xs), 1, _n(xs))),
    Op("square", (T, FF), None, lambda s, x, y: P.square(x), lambda X, Y: X * X,
       lambda xs, ys: (16 * _n(xs), 1, _n(xs))),
    Op("matmul_shared", (T, D), (D, D), lambda s, x, y: P.matmul(x, y), lambda X, Y: X @ Y,
       lambda xs, ys: (16 * (_n(xs) + _n(ys)), 1, xs[0] * ys[1])),
    Op("matmul_private", (T, D), (D, D), None, lambda X, W: X @ W,
       lambda xs, ys: (8 * _n(xs), 1, xs[0] * ys[1]), y_private=True),
    Op("trunc", (T, FF), None, lambda s, x, y: P.truncate(x.mul_int(1 << s.fp.frac_bits)),
       lambda X, Y: X, lambda xs, ys: (0, 0, _n(xs))),
    Op("reshare", (T, D), None, lambda s, x, y: P.reshare(x), lambda X, Y: X,
       lambda xs, ys: (8 * _n(xs), 1, 0)),
    Op("open", (T, D), None, None, lambda X, Y: X, lambda xs, ys: (16 * _n(xs), 1, 0)),
    # issue 11's primitives (BERT-base's FFN shape, inputs over their declared domains)
    Op("drelu_narrow", (T, FF), None, lambda s, x, y: P.drelu_narrow(x, 28).mul_int(1 << s.fp.frac_bits),
       lambda X, Y: (X >= 0).to(X.dtype), lambda xs, ys: (13.75 * _n(xs), 5, 0), x_scale=4000.0, exact_only=True),
    Op("relu_narrow", (T, FF), None, _relu_narrow, lambda X, Y: torch.relu(X),
       lambda xs, ys: (45.75 * _n(xs), 6, 0), x_scale=4000.0, exact_only=True),
    Op("smu_segments", (T, FF), None, _smu_segments, _segments_ref,
       lambda xs, ys: (191.75 * _n(xs), 13, _n(xs)), x_scale=450.0, exact_only=True),
]
OPS_BY_NAME = {o.name: o for o in OPS}


def theory(op: Op, trunc: TruncMode) -> tuple[int, int]:
    """Documented online payload bytes (both directions) and rounds of ``op`` in ``trunc`` mode."""
    b, r, nt = op.theory(op.x, op.y)
    if nt and trunc == TruncMode.EXACT:
        b, r = b + 16 * nt, r + 1
    return b, r


def _inputs(op: Op, seed: int):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(-op.x_scale, op.x_scale, op.x))
    y = None if op.y is None else torch.from_numpy(rng.uniform(-0.5, 0.5, op.y) if op.y_private
                                                   else rng.uniform(-4, 4, op.y))
    return x, y


def _delta(before, after) -> dict:
    return {k: after[k] - before[k] for k in after}


def _sum(d: dict, *, phase: str | None = None, link: str | None = None) -> Traffic:
    return sum((t for (lk, ph), t in d.items() if (phase in (None, ph)) and (link in (None, lk))), Traffic())


def run_op(sess: Session, op: Op, reps: int, seed: int) -> dict | None:
    """SPMD body of one op: both parties call it; the client returns the measurements.

    Rep 0 fetches its dealer material on demand (``seconds_on_demand``) and records the plan; each
    later rep first prefetches its material (offline) and then times the online phase alone.
    """
    X, Y = _inputs(op, seed)
    client = sess.role == Role.CLIENT
    x = sess.share(X if client else None, owner=Role.CLIENT, shape=op.x)
    y = pw = None
    once_bytes = 0
    if op.y_private:  # masked once per session (offline), not per query
        before = sess.meter.snapshot()
        pw = P.prepare_weight(sess, None if client else Y, shape=op.y)
        once_bytes = _sum(_delta(before, sess.meter.snapshot()), phase="offline").payload_bytes
    elif op.y is not None:
        y = sess.share(None if client else Y, owner=Role.SERVER, shape=op.y)

    def once():
        with sess.span(op.name):
            if op.name == "matmul_private":
                return P.matmul_private(x, pw)
            if op.name == "open":
                opened = sess.open(x)
                return x._wrap(opened if client else torch.zeros_like(opened))
            return op.run(sess, x, y)

    prov = sess.provider
    times, deltas, out, plan = [], [], None, None
    for rep in range(max(2, reps + 1)):
        if rep > 0:
            before = sess.meter.snapshot()
            prov.prefetch_relative(plan)
            prov.wait_prefetched()
            prefetch = _delta(before, sess.meter.snapshot())
        start, before, t0 = prov.index, sess.meter.snapshot(), time.perf_counter()
        out = once()
        dt = time.perf_counter() - t0
        d = _delta(before, sess.meter.snapshot())
        if rep == 0:
            plan, t_demand = prov.plan_since(start), dt
        else:
            times.append(dt)
            deltas.append({k: d[k] + prefetch[k] for k in d})
    result = sess.reveal_float(out, Role.CLIENT)
    dealer_traffic = _sum(deltas[-1], link="dealer")
    if not client:  # the dealer traffic of the server, for the total
        sess.peer.send_json(dealer_traffic.as_dict(), "bench-server-stats")
        return None
    server_dealer = Traffic(**sess.peer.recv_json("bench-server-stats"))
    fp = sess.fp
    ref = op.ref(fp.decode(fp.encode(X)), None if Y is None else fp.decode(fp.encode(Y)))
    err = (result - ref).abs()
    return {
        "seconds": statistics.median(times), "seconds_all": times, "seconds_on_demand": t_demand,
        "online": _sum(deltas[-1], phase="online").as_dict(),
        "offline_peer": _sum(deltas[-1], phase="offline", link="peer").as_dict(),
        "offline_dealer": (dealer_traffic + server_dealer).as_dict(),
        "max_abs_err_ulp": float(err.max()) / fp.ulp, "bad_elements": int((err > 4 * fp.ulp).sum()),
        "bytes_offline_per_session": once_bytes,
    }


def _record(op: Op, trunc: TruncMode, transport: str, m: dict, cfg: Config, sha: str) -> dict:
    tb, tr = theory(op, trunc)
    on = m["online"]
    shape = [list(op.x)] + ([list(op.y)] if op.y else [])
    rec = {
        "op": op.name, "method": "comet-engine", "transport": transport,
        "params": {"f": cfg.frac_bits, "trunc": trunc.value, "sigma": None, "iterations": None},
        "shape": shape,
        "bytes_online": on["bytes_sent"] + on["bytes_recv"],
        "bytes_online_theory": tb,
        "header_bytes_online": on["header_bytes_sent"] + on["header_bytes_recv"],
        "msgs_online": on["msgs_sent"] + on["msgs_recv"],
        "rounds": on["rounds"], "rounds_theory": tr,
        "bytes_offline": sum(m[k]["bytes_sent"] + m[k]["bytes_recv"] for k in ("offline_peer", "offline_dealer")),
        "bytes_offline_per_session": m["bytes_offline_per_session"],
        "seconds": m["seconds"], "seconds_on_demand": m["seconds_on_demand"],
        "max_abs_err_ulp": m["max_abs_err_ulp"], "bad_elements": m["bad_elements"],
        "git_sha": sha, "config_hash": cfg.hash(),
    }
    total = rec["bytes_online"] + rec["header_bytes_online"]
    rec["projected_seconds"] = {k: net.project(m["seconds"], total, rec["rounds"]) for k, net in NETWORKS.items()}
    return rec


# --------------------------------------------------------------------------------------------------
# Ring matmul speed and local-truncation failure rate (no parties)
# --------------------------------------------------------------------------------------------------


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_ring_matmul(reps: int, sha: str) -> list[dict]:
    a, b = random_ring((T, D), (D, D))
    small = FixedPoint(16).encode(torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (D, D))))
    rows = []
    for label, bb, limbs, method in [("uniform", b, 4, "limbs"), ("small-weight", small, limbs_needed(
            int(small.abs().max())), "limbs"), ("uniform", b, 4, "int64")]:
        sec = _time(lambda bb=bb, limbs=limbs, method=method: ring_matmul(a, bb, b_limbs=limbs, method=method),
                    reps)
        rows.append({"op": "ring_matmul", "method": method, "operand": label, "b_limbs": limbs,
                     "shape": [[T, D], [D, D]], "seconds": sec, "gmacs_per_s": T * D * D / sec / 1e9,
                     "torch_threads": torch.get_num_threads(), "git_sha": sha})
    return rows


def bench_trunc_failures(sha: str, trials: int = 1 << 22) -> list[dict]:
    """Failure rate of local truncation for values of magnitude 2^k against the |x|/2^64 estimate."""
    rows = []
    for k in (40, 48, 52):
        x = torch.full((trials,), 1 << k, dtype=torch.int64)
        (x0,) = random_ring((trials,))
        x1 = x - x0
        y = (x0 >> 16) + (-((-x1) >> 16))
        fails = int(((y - (x >> 16)).abs() > 1).sum())
        rows.append({"op": "trunc_local_failure", "value_log2": k, "trials": trials, "failures": fails,
                     "rate": fails / trials, "predicted_rate": 2.0**k / 2.0**64, "git_sha": sha})
    return rows


# --------------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------------


def bench_inproc(reps: int, sha: str, ops=OPS) -> list[dict]:
    rows = []
    for trunc in TruncMode:
        cfg = Config(trunc=trunc)
        for op in tqdm([o for o in ops if trunc == TruncMode.EXACT or not o.exact_only],
                       desc=f"in-process, trunc={trunc.value}", leave=False):
            m, _ = run_local(lambda s, op=op: run_op(s, op, reps, seed=1), cfg)
            rows.append(_record(op, trunc, "inproc", m, cfg, sha))
    return rows


def bench_handler(reps: int):
    def handle(sess: Session) -> None:
        req = sess.peer.recv_json("bench-op")
        run_op(sess, OPS_BY_NAME[req["op"]], reps, seed=req["seed"])

    return handle


def bench_tcp(reps: int, sha: str, ops=OPS) -> list[dict]:
    from ..serve import spawn, stop

    rows = []
    dealer, daddr = spawn(["dealer", "--port", "0"])
    try:
        for trunc in TruncMode:
            cfg = Config(trunc=trunc)
            server, saddr = spawn(["bench-worker", "--dealer", daddr, "--trunc", trunc.value,
                                   "--reps", str(reps)])
            try:
                for op in tqdm([o for o in ops if trunc == TruncMode.EXACT or not o.exact_only],
                               desc=f"tcp, trunc={trunc.value}", leave=False):
                    sess = connect_client(saddr, daddr, cfg)
                    try:
                        sess.peer.send_json({"op": op.name, "seed": 1}, "bench-op")
                        m = run_op(sess, op, reps, seed=1)
                    finally:
                        sess.close()
                    rows.append(_record(op, trunc, "tcp-3proc", m, cfg, sha))
            finally:
                stop(server)
    finally:
        stop(dealer)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| op | transport | trunc | shape | online B (measured) | online B (documented) | msgs | rounds "
           "(meas/doc) | offline B | seconds | LAN s | WAN s | max err (ulp) |", "|" + "---|" * 13]
    for r in rows:
        if "bytes_online" not in r:
            continue
        shape = " × ".join("×".join(map(str, s)) for s in r["shape"])
        out.append(f"| {r['op']} | {r['transport']} | {r['params']['trunc']} | {shape} | {r['bytes_online']:,} | "
                   f"{r['bytes_online_theory']:,} | {r['msgs_online']} | {r['rounds']}/{r['rounds_theory']} | "
                   f"{r['bytes_offline']:,} | {r['seconds']:.3f} | {r['projected_seconds']['lan']:.3f} | "
                   f"{r['projected_seconds']['wan']:.3f} | {r['max_abs_err_ulp']:.2f} |")
    mm = [r for r in rows if r["op"] == "ring_matmul"]
    if mm:
        out += ["", "| ring matmul 128×768 @ 768×768 | B operand | limbs of B | seconds | GMAC/s |",
                "|---|---|---|---|---|"]
        out += [f"| {r['method']} | {r['operand']} | {r['b_limbs']} | {r['seconds']:.4f} | {r['gmacs_per_s']:.2f} |"
                for r in mm]
    tf = [r for r in rows if r["op"] == "trunc_local_failure"]
    if tf:
        out += ["", "| local truncation, |x| = 2^k | trials | failures | rate | predicted |x|/2^64 |",
                "|---|---|---|---|---|"]
        out += [f"| k = {r['value_log2']} | {r['trials']:,} | {r['failures']} | {r['rate']:.3g} | "
                f"{r['predicted_rate']:.3g} |" for r in tf]
    return "\n".join(out)


def _row_key(r: dict) -> tuple:
    return (r["op"], r.get("transport"), (r.get("params") or {}).get("trunc"), r.get("method"), r.get("operand"),
            r.get("value_log2"))


def main(args) -> int:
    sha = git_sha()
    torch.set_num_threads(args.threads) if args.threads else None
    ops = [OPS_BY_NAME[n] for n in args.ops] if args.ops else OPS
    rows = []
    rows += bench_ring_matmul(args.reps, sha)
    rows += bench_trunc_failures(sha)
    if args.transport in ("inproc", "both"):
        rows += bench_inproc(args.reps, sha, ops)
    if args.transport in ("tcp", "both"):
        rows += bench_tcp(args.reps, sha, ops)
    host = {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    for r in rows:
        r["host"] = host
    out = Path(args.out)
    if args.ops and out.is_file():  # a subset: upsert its rows into the earlier results
        new = {_row_key(r) for r in rows}
        old = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        rows = [r for r in old if _row_key(r) not in new] + rows
    md = markdown(rows)
    write_results(out, rows, md)
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0
