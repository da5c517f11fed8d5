"""``cometpi bench tls``: the cost of TLS on a private inference, measured on loopback.

Starts a dealer and ``cometpi serve --model minilm`` as processes, with and without TLS 1.3 (keys made
by ``tls.keygen`` in a temporary directory), and runs ``--reps`` private inferences of one
``--seq``-token input from the client here, in one session each way.  Records the protocol payload
(the meter), the bytes on the client's wire (TLS records: ``TlsChannel.wire``; plaintext: payload +
frame headers) and the seconds per inference (median).  Writes bench/results/tls.json; asserts
nothing.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _run(tls_dir: Path | None, seq: int, reps: int) -> dict:
    from ..client import PrivateClient
    from ..serve import spawn_roles
    from ..tls import PartyTls, TlsConfig

    dealer_args = []
    serve_args = ["--timeout", "600"]
    tls = None
    if tls_dir is not None:
        k = str(tls_dir)
        dealer_args += ["--tls", f"{k}/dealer", "--allow-servers", f"{k}/server.crt", "--allow-clients",
                        f"{k}/alice.crt"]
        serve_args += ["--tls", f"{k}/server", "--dealer-cert", f"{k}/dealer.crt", "--allow-clients", f"{k}/alice.crt"]
        tls = PartyTls(TlsConfig(f"{k}/alice", [f"{k}/server.crt"]), TlsConfig(f"{k}/alice", [f"{k}/dealer.crt"]))
    with spawn_roles("minilm", *serve_args, timeout=300, dealer_args=dealer_args) as roles:
        with PrivateClient(roles.saddr, roles.daddr, timeout=600, tls=tls) as client:
            g = torch.Generator().manual_seed(1)  # benchmark token ids, not protocol randomness
            ids = torch.randint(1000, client.arch.vocab, (1, seq), generator=g)
            seconds, payload = [], 0
            before = _wire(client)
            for _ in range(reps):
                _, st = client.infer_ids(ids)
                seconds.append(st["seconds"])
                payload += sum(st[p]["bytes_sent"] + st[p]["bytes_recv"] + st[p]["header_bytes_sent"]
                               + st[p]["header_bytes_recv"] for p in ("online", "offline"))
            after = _wire(client)
    out = {"seconds_median": statistics.median(seconds), "seconds": seconds,
           "payload_and_headers_bytes_per_inference": payload / reps}
    if after is not None:
        out["wire_bytes_per_inference"] = (after - before) / reps
    return out


def _wire(client):
    chans = [client.sess.peer, getattr(client.sess.provider, "link", None)]
    chans = [getattr(c, "ch", c) for c in chans if c is not None]
    walls = [c.wire for c in chans if hasattr(c, "wire")]
    return sum(w["sent"] + w["recv"] for w in walls) if walls else None


def add_arguments(p) -> None:
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench/results/tls.json")


def main(args) -> int:
    from ..tls import keygen
    from .ops import git_sha

    with tempfile.TemporaryDirectory(prefix="cometpi-keys-") as tmp:
        for n in ("dealer", "server", "alice"):
            keygen(n, tmp)
        t0 = time.time()
        rows = {"plaintext": _run(None, args.seq, args.reps), "tls": _run(Path(tmp), args.seq, args.reps)}
    p, t = rows["plaintext"], rows["tls"]
    res = {"bench": "tls", "model": "minilm", "seq": args.seq, "reps": args.reps, "rows": rows,
           "tls_seconds_overhead": t["seconds_median"] / p["seconds_median"] - 1,
           "tls_wire_overhead": (t["wire_bytes_per_inference"] / t["payload_and_headers_bytes_per_inference"] - 1
                                 if "wire_bytes_per_inference" in t else None),
           "git": git_sha(), "bench_seconds": time.time() - t0,
           "command": f"cometpi bench tls --seq {args.seq} --reps {args.reps}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0
