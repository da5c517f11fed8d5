"""``cometpi engine-demo``: a private X @ W with dealer, server and client as three processes.

The server owns W, the client owns X; the client prints X @ W's agreement with plaintext and the
exact bytes, messages, rounds and seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .ring import FixedPoint
from .serve import spawn, stop


def main(args) -> int:
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.uniform(-2, 2, (args.rows, args.cols)))
    w = torch.from_numpy(rng.normal(0, 0.05, (args.cols, args.out_cols)))
    with tempfile.TemporaryDirectory(prefix="cometpi-demo-") as tmp:
        tmp = Path(tmp)
        save_file({"w": w}, tmp / "w.safetensors")  # the server's file
        save_file({"x": x}, tmp / "x.safetensors")  # the client's file
        print(f"[demo] server owns W {tuple(w.shape)}, client owns X {tuple(x.shape)}")
        dealer, daddr = spawn(["dealer", "--port", "0"])
        print(f"[demo] dealer process pid {dealer.pid} on {daddr}")
        server = None
        try:
            server, saddr = spawn(["linear", "serve", "--weight", str(tmp / "w.safetensors"), "--port", "0",
                                   "--dealer", daddr, "--once"])
            print(f"[demo] server process pid {server.pid} on {saddr}")
            cmd = [sys.executable, "-m", "cometpi", "linear", "query", "--server", saddr, "--dealer", daddr,
                   "--input", str(tmp / "x.safetensors"), "--out", str(tmp / "y.safetensors"),
                   "--stats", str(tmp / "stats.json")]
            print("[demo] client process: cometpi linear query ...")
            subprocess.run(cmd, check=True, timeout=600)
            y = load_file(tmp / "y.safetensors")["y"]
            stats = json.loads((tmp / "stats.json").read_text())
        finally:
            if server is not None:
                stop(server)
            stop(dealer)
    fp = FixedPoint(16)
    err = float((y - x @ w).abs().max())
    err_q = float((y - fp.decode(fp.encode(x)) @ fp.decode(fp.encode(w))).abs().max())
    span = stats["spans"]["matmul_private"]["online"]
    print(f"[demo] max |private - plaintext| = {err:.2e} ({err / fp.ulp:.1f} ulp at f=16; the inputs "
          f"themselves are rounded to 2^-16)")
    print(f"[demo] against plaintext on the encoded inputs: {err_q / fp.ulp:.2f} ulp (truncation only)")
    print(f"[demo] matmul_private online: {span['bytes_sent'] + span['bytes_recv']:,} B payload in "
          f"{span['msgs_sent'] + span['msgs_recv']} messages, {span['rounds']} rounds "
          f"(client->server E = X0 - A is {x.numel() * 8:,} B; the rest is exact truncation)")
    return 0
