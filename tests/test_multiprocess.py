"""Real processes over loopback TCP: dealer, server and client as separate OS processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cometpi.bench.ops import OPS_BY_NAME, run_op
from cometpi.core import Config
from cometpi.party import connect_client
from cometpi.ring import FixedPoint
from cometpi.serve import spawn, stop
from cometpi.transport import TransportError

FP = FixedPoint(16)


@pytest.fixture
def dealer():
    proc, addr = spawn(["dealer", "--port", "0"])
    yield proc, addr
    stop(proc)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cometpi", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("trunc", ["local", "exact"])
def test_three_processes_private_linear(tmp_path, dealer, trunc):
    """Client-private 128x768 times server-private 768x768: matches plaintext; online traffic of the
    product is one 128x768 message client -> server (plus exact truncation when chosen)."""
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.uniform(-2, 2, (128, 768)))
    w = torch.from_numpy(rng.normal(0, 0.05, (768, 768)))
    save_file({"w": w}, tmp_path / "w.safetensors")
    save_file({"x": x}, tmp_path / "x.safetensors")
    _, daddr = dealer
    server, saddr = spawn(["linear", "serve", "--weight", str(tmp_path / "w.safetensors"), "--port", "0",
                           "--dealer", daddr, "--once", "--trunc", trunc])
    try:
        r = _cli("linear", "query", "--server", saddr, "--dealer", daddr, "--input",
                 str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors"),
                 "--stats", str(tmp_path / "s.json"), "--trunc", trunc)
        assert r.returncode == 0, r.stderr
        server.wait(30)
    finally:
        stop(server)
    y = load_file(tmp_path / "y.safetensors")["y"]
    ref = FP.decode(FP.encode(x)) @ FP.decode(FP.encode(w))
    assert float((y - ref).abs().max()) < FP.ulp
    span = json.loads((tmp_path / "s.json").read_text())["spans"]["matmul_private"]["online"]
    n_out = 128 * 768
    if trunc == "local":
        assert span["msgs_sent"] == 1 and span["msgs_recv"] == 0
        assert span["bytes_sent"] == 128 * 768 * 8 and span["bytes_recv"] == 0
        assert span["rounds"] == 1
    else:  # plus the truncation exchange: one message each way of 8 B/element
        assert span["msgs_sent"] == 2 and span["msgs_recv"] == 1
        assert span["bytes_sent"] == 128 * 768 * 8 + 8 * n_out and span["bytes_recv"] == 8 * n_out
        assert span["rounds"] == 2


def _long_client(saddr, daddr, errors):
    sess = connect_client(saddr, daddr, Config(), timeout=30)
    try:
        sess.peer.send_json({"op": "mul", "seed": 1}, "bench-op")
        run_op(sess, OPS_BY_NAME["mul"], 10_000, seed=1)
    except TransportError as e:
        errors.append((time.perf_counter(), e))
    finally:
        sess.close()


@pytest.mark.parametrize("victim", ["server", "dealer"])
def test_killing_a_party_mid_protocol_fails_fast(dealer, victim):
    dproc, daddr = dealer
    server, saddr = spawn(["bench-worker", "--dealer", daddr, "--reps", "10000", "--timeout", "30"])
    errors = []
    try:
        t = threading.Thread(target=_long_client, args=(saddr, daddr, errors))
        t.start()
        time.sleep(2.0)  # well inside the protocol
        assert t.is_alive()
        killed_at = time.perf_counter()
        os.kill((server if victim == "server" else dproc).pid, signal.SIGKILL)
        t.join(15)
        assert not t.is_alive(), "the client hung"
        assert errors, "the client did not notice"
        at, err = errors[0]
        assert at - killed_at < 10
        assert "closed" in str(err) or "lost" in str(err)
    finally:
        stop(server)


def test_server_survives_garbage_and_serves_the_next_client(tmp_path, dealer):
    _, daddr = dealer
    w = torch.eye(4, dtype=torch.float64)
    save_file({"w": w}, tmp_path / "w.safetensors")
    save_file({"x": torch.ones(2, 4, dtype=torch.float64)}, tmp_path / "x.safetensors")
    server, saddr = spawn(["linear", "serve", "--weight", str(tmp_path / "w.safetensors"), "--port", "0",
                           "--dealer", daddr, "--timeout", "5", "--trunc", "local"])
    try:
        host, port = saddr.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:  # a port scanner / HTTP client
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            s.settimeout(5)
            assert s.recv(100) == b""  # the server hangs up on it
        r = _cli("linear", "query", "--server", saddr, "--dealer", daddr, "--input",
                 str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors"), "--trunc", "local")
        assert r.returncode == 0, r.stderr
        # a client with another configuration gets a clear error naming the field
        r = _cli("linear", "query", "--server", saddr, "--dealer", daddr, "--input",
                 str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "z.safetensors"))
        assert r.returncode == 2 and "trunc" in r.stderr
        assert not (tmp_path / "z.safetensors").exists()  # nothing half-written
    finally:
        stop(server)
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], torch.ones(2, 4, dtype=torch.float64))


def test_unreachable_dealer_and_refused_server_are_clear_errors(tmp_path):
    save_file({"x": torch.ones(2, 4, dtype=torch.float64)}, tmp_path / "x.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    t0 = time.perf_counter()
    r = _cli("linear", "query", "--server", f"127.0.0.1:{free}", "--dealer", f"127.0.0.1:{free}",
             "--input", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors"))
    assert r.returncode == 2 and "cannot connect to server" in r.stderr
    assert time.perf_counter() - t0 < 30
    r = _cli("linear", "query", "--server", "nonsense", "--dealer", "x:1", "--input",
             str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors"))
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = _cli("linear", "query", "--server", "127.0.0.1:1", "--dealer", "127.0.0.1:1", "--input",
             str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "y.safetensors"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_emulated_wan_is_felt_end_to_end(tmp_path, dealer):
    """--net wan on both parties: the same product takes at least its rounds x RTT longer."""
    _, daddr = dealer
    save_file({"w": torch.eye(8, dtype=torch.float64)}, tmp_path / "w.safetensors")
    save_file({"x": torch.ones(4, 8, dtype=torch.float64)}, tmp_path / "x.safetensors")
    server, saddr = spawn(["linear", "serve", "--weight", str(tmp_path / "w.safetensors"), "--port", "0",
                           "--dealer", daddr, "--once", "--net", "bolt-wan"])
    try:
        r = _cli("linear", "query", "--server", saddr, "--dealer", daddr, "--input", str(tmp_path / "x.safetensors"),
                 "--out", str(tmp_path / "y.safetensors"), "--stats", str(tmp_path / "s.json"), "--net", "bolt-wan")
        assert r.returncode == 0, r.stderr
    finally:
        stop(server)
    stats = json.loads((tmp_path / "s.json").read_text())
    rounds = stats["online"]["rounds"]
    assert rounds >= 3 and stats["seconds"] >= rounds * 0.020  # one-way delay 20 ms per round at least
