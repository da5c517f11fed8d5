"""``cometpi bench rtt``: a channel's round trip against a raw socket's, in one run, TCP and TLS.

A second process (``multiprocessing``, spawned) echoes what it receives.  For each message size the
parent times ``--reps`` ping-pongs and reports the median, 10th and 90th percentile in microseconds:

* ``socket``: a raw Python socket (TCP_NODELAY), an 8-byte length then the payload, ``sendall`` and
  ``recv_into``: the floor any framing on top of Python sockets is measured against;
* ``channel``: ``TcpChannel.send`` of an int64 tensor and ``recv`` of the echo (the frame header, tag,
  shape and size checks, the counters: everything a protocol round pays);
* ``exchange``: ``TcpChannel.exchange`` with both sides sending at once, as a protocol round does;

and the same three inside TLS 1.3 (``ssl`` over the raw socket; ``TlsChannel``), with keys made in a
temporary directory.  Writes bench/results/rtt.json; asserts nothing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import ssl
import statistics
import struct
import tempfile
import time
from pathlib import Path

SIZES = (8, 1024, 65536, 1 << 20)
_LEN = struct.Struct("!Q")


def _reps(size: int, reps: int) -> int:
    return max(20, reps if size <= 65536 else reps // 20)


# -- raw sockets ---------------------------------------------------------------------------------

def _recv_exact(sock, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        k = sock.recv_into(buf[got:])
        if not k:
            raise ConnectionError("peer closed")
        got += k


def _raw_echo(sock, total: int) -> None:
    hdr = bytearray(8)
    for _ in range(total):
        _recv_exact(sock, memoryview(hdr))
        (n,) = _LEN.unpack(hdr)
        buf = bytearray(n)
        _recv_exact(sock, memoryview(buf))
        sock.sendall(bytes(hdr) + bytes(buf))


def _raw_ping(sock, size: int, n: int) -> list[float]:
    msg = _LEN.pack(size) + bytes(size)
    hdr, buf, out = bytearray(8), bytearray(size), []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(msg)
        _recv_exact(sock, memoryview(hdr))
        _recv_exact(sock, memoryview(buf))
        out.append(time.perf_counter() - t0)
    return out


# -- channels ------------------------------------------------------------------------------------

def _chan_echo(ch, shape, total: int, exchange: bool) -> None:
    import torch

    mine = torch.zeros(shape, dtype=torch.int64)
    for _ in range(total):
        if exchange:
            ch.exchange([mine], "rtt")
        else:
            ch.send(ch.recv("rtt", shape=shape, dtype=torch.int64), "rtt")


def _chan_ping(ch, size: int, n: int, exchange: bool) -> list[float]:
    import torch

    t = torch.arange(size // 8, dtype=torch.int64)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        if exchange:
            ch.exchange([t], "rtt")
        else:
            ch.send(t, "rtt")
            ch.recv("rtt", shape=tuple(t.shape), dtype=torch.int64)
        out.append(time.perf_counter() - t0)
    return out


# -- the two processes ---------------------------------------------------------------------------

def _plan(reps: int, warm: int) -> list[tuple[str, int, int]]:
    """(kind, size, count) in the order both processes run them."""
    return [(kind, size, warm + _reps(size, reps)) for kind in ("socket", "channel", "exchange") for size in SIZES]


def _tls_ctx(keys: str, me: str, peer: str, server_side: bool) -> ssl.SSLContext:
    from ..tls import TlsConfig

    return TlsConfig(f"{keys}/{me}", [f"{keys}/{peer}.crt"]).context(server_side)


def _peer(port: int, keys: str | None, reps: int, warm: int) -> None:
    """The echoing process: one connection per (kind, size), in ``_plan``'s order."""
    from ..tls import TlsChannel, TlsConfig
    from ..transport import TcpChannel

    for kind, size, total in _plan(reps, warm):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == "socket":
            if keys:
                sock = _tls_ctx(keys, "b", "a", False).wrap_socket(sock)
            _raw_echo(sock, total)
            sock.close()
            continue
        ch = (TlsChannel(sock, TlsConfig(f"{keys}/b", [f"{keys}/a.crt"]), server_side=False, timeout=60)
              if keys else TcpChannel(sock, timeout=60))
        _chan_echo(ch, (size // 8,), total, kind == "exchange")
        ch.close()


def _summary(samples: list[float], warm: int) -> dict:
    s = sorted(samples[warm:])
    us = [x * 1e6 for x in s]
    return {"n": len(us), "median_us": statistics.median(us), "p10_us": us[len(us) // 10],
            "p90_us": us[(9 * len(us)) // 10]}


def _run(keys: str | None, reps: int, warm: int, progress) -> list[dict]:
    from ..tls import TlsChannel, TlsConfig
    from ..transport import TcpChannel, listen

    srv = listen()
    port = srv.getsockname()[1]
    proc = mp.get_context("spawn").Process(target=_peer, args=(port, keys, reps, warm), daemon=True)
    proc.start()
    rows = []
    try:
        srv.settimeout(120)
        for kind, size, total in _plan(reps, warm):
            sock, _ = srv.accept()
            sock.settimeout(60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kind == "socket":
                if keys:
                    sock = _tls_ctx(keys, "a", "b", True).wrap_socket(sock, server_side=True)
                samples = _raw_ping(sock, size, total)
                sock.close()
            else:
                ch = (TlsChannel(sock, TlsConfig(f"{keys}/a", [f"{keys}/b.crt"]), server_side=True, timeout=60)
                      if keys else TcpChannel(sock, timeout=60))
                samples = _chan_ping(ch, size, total, kind == "exchange")
                ch.close()
            rows.append({"link": "tls" if keys else "tcp", "kind": kind, "bytes": size, **_summary(samples, warm)})
            progress.update(1)
    finally:
        srv.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return rows


def add_arguments(p) -> None:
    p.add_argument("--reps", type=int, default=2000, help="ping-pongs per row up to 64 KB (1 MB: a twentieth)")
    p.add_argument("--no-tls", action="store_true", help="TCP only")
    p.add_argument("--out", default="bench/results/rtt.json")


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: median (p10-p90) microseconds, and the channel against the socket."""
    base = {(r["link"], r["bytes"]): r["median_us"] for r in rows if r["kind"] == "socket"}
    out = ["| link | bytes | kind | median us | p10-p90 us | x socket |", "|---|---|---|---|---|---|"]
    for r in rows:
        x = r["median_us"] / base[(r["link"], r["bytes"])]
        out.append(f"| {r['link']} | {r['bytes']:,} | {r['kind']} | {r['median_us']:.1f} | "
                   f"{r['p10_us']:.1f}-{r['p90_us']:.1f} | {x:.2f} |")
    return "\n".join(out)


def main(args) -> int:
    from tqdm import tqdm

    from ..tls import keygen
    from .machine import machine
    from .ops import git_sha

    warm = 50
    links = 1 if args.no_tls else 2
    t0 = time.time()
    with tqdm(total=links * len(_plan(args.reps, warm)), desc="round trips", unit="row") as bar:
        rows = _run(None, args.reps, warm, bar)
        if not args.no_tls:
            with tempfile.TemporaryDirectory(prefix="cometpi-keys-") as tmp:
                keygen("a", tmp)
                keygen("b", tmp)
                rows += _run(tmp, args.reps, warm, bar)
    res = {"bench": "rtt", "rows": rows, "machine": machine(), "git": git_sha(), "date": time.strftime("%Y-%m-%d"),
           "bench_seconds": time.time() - t0,
           "command": f"cometpi bench rtt --reps {args.reps}" + (" --no-tls" if args.no_tls else "")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(rows))
    return 0
