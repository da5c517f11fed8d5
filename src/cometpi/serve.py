"""Processes: the server accept loop, spawning dealer/server processes, and the private-linear demo.

The *linear demo* is the engine's end-to-end job until the model layers land: the server owns a
weight W (a safetensors file), the client owns X, and the client learns X @ W and nothing else; the
server learns nothing about X.  Dealer, server and client are separate OS processes over TCP.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .core import Config, Role, Session
from .party import accept_server
from .protocols import matmul_private, prepare_weight
from .transport import TransportError, listen

log = logging.getLogger("cometpi.serve")


def serve_forever(handler: Callable[[Session], None], *, host: str, port: int, dealer: str, config: Config,
                  timeout: float, extra: dict | None = None, once: bool = False, banner: str = "server",
                  net=None, workers: int = 1, tls=None, insecure_plaintext: bool = False) -> None:
    """Accept clients and serve each in its own session; up to ``workers`` at once (threads sharing
    only read-only state such as the weights), later ones wait in the listen backlog.  A failing
    client is logged and the others go on.  ``once``: exit after the first client."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if tls is None:
        from .tls import check_plaintext

        check_plaintext(host, insecure_plaintext, "this server's port")
    sock = listen(host, port)
    h, p = sock.getsockname()[:2]
    many = f" ({workers} concurrent sessions)" if workers > 1 else ""
    print(f"cometpi {banner}{many} listening on {h}:{p}", flush=True)
    slots = threading.BoundedSemaphore(workers)
    running: list[threading.Thread] = []

    def serve_one(conn, addr) -> None:
        sess = None
        try:
            sess = accept_server(conn, dealer, config, timeout=timeout, extra=extra, net=net, tls=tls,
                                 insecure_plaintext=insecure_plaintext)
            handler(sess)
            log.info("client %s:%s served", *addr[:2])
        except (TransportError, ValueError, RuntimeError) as e:
            log.error("client %s:%s failed: %s", addr[0], addr[1], e)
            print(f"error serving {addr[0]}:{addr[1]}: {e}", file=sys.stderr, flush=True)
            if sess is not None and not isinstance(e, TransportError):
                sess.peer.send_error(e)  # a bad query: tell the client what was wrong
        except Exception as e:  # noqa: BLE001 - a bug in one session must not stop the server
            log.exception("client %s:%s crashed the session", addr[0], addr[1])
            print(f"error serving {addr[0]}:{addr[1]}: internal error {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            if sess is not None:
                sess.peer.send_error(f"internal server error ({type(e).__name__})")
        finally:
            if sess is not None:
                sess.close()
            else:
                conn.close()
            slots.release()

    try:
        while True:
            slots.acquire()
            conn, addr = sock.accept()
            if workers == 1:
                serve_one(conn, addr)
            else:
                t = threading.Thread(target=serve_one, args=(conn, addr), name=f"session-{addr[1]}", daemon=True)
                t.start()
                running[:] = [x for x in running if x.is_alive()] + [t]
            if once:
                break
    finally:
        for t in running:
            t.join(timeout)
        sock.close()


def spawn(args: list[str], *, ready: str = "listening on", timeout: float = 30.0, env=None):
    """Start ``python -m cometpi ARGS`` and wait for its 'listening on HOST:PORT' line.

    Returns (process, "HOST:PORT").  The child's stderr passes through; it is killed on failure.
    """
    proc = subprocess.Popen([sys.executable, "-m", "cometpi", *args], stdout=subprocess.PIPE, text=True,
                            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if ready in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.kill()
    proc.wait()
    raise RuntimeError(f"`cometpi {' '.join(args)}` did not start (exit code {proc.returncode})")


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a spawned process and reap it (no zombies)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder and rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensor(path: str, key: str | None = None) -> torch.Tensor:
    """One tensor from a safetensors file (the only tensor, or ``key``)."""
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises several types
        raise ValueError(f"cannot read {path} as safetensors: {e}") from None
    if key is None:
        if len(tensors) != 1:
            raise ValueError(f"{path} holds {sorted(tensors)}; name one with --key")
        key = next(iter(tensors))
    if key not in tensors:
        raise ValueError(f"{path} has no tensor {key!r} (has {sorted(tensors)})")
    return tensors[key].to(torch.float64)


# --------------------------------------------------------------------------------------------------
# The private-linear demo
# --------------------------------------------------------------------------------------------------


def linear_server_handler(w: torch.Tensor) -> Callable[[Session], None]:
    def handle(sess: Session) -> None:
        q = sess.peer.recv_json("linear-query")
        q = q if isinstance(q, dict) else {}
        rows, cols = q.get("rows"), q.get("cols")
        if not (isinstance(rows, int) and 0 < rows <= 1 << 16) or cols != w.shape[0]:
            msg = f"query of shape ({rows}, {cols}) does not fit a weight of shape {tuple(w.shape)}"
            sess.peer.send_json({"ok": False, "error": msg}, "linear-answer")
            raise ValueError(msg)
        sess.peer.send_json({"ok": True, "out": w.shape[1]}, "linear-answer")
        pw = prepare_weight(sess, w)
        x = sess.share(None, owner=Role.CLIENT, shape=(rows, cols))
        sess.reveal(matmul_private(x, pw), Role.CLIENT)

    return handle


def linear_client(sess: Session, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the linear demo's client side; returns (X @ W, the meter report)."""
    t0 = time.perf_counter()
    sess.peer.send_json({"rows": x.shape[0], "cols": x.shape[1]}, "linear-query")
    ans = sess.peer.recv_json("linear-answer")
    if not ans.get("ok"):
        raise ValueError(f"server refused the query: {ans.get('error')}")
    pw = prepare_weight(sess, shape=(x.shape[1], ans["out"]))
    xs = sess.share(x, owner=Role.CLIENT)
    y = sess.reveal_float(matmul_private(xs, pw), Role.CLIENT)
    report = sess.meter.report()
    report["seconds"] = time.perf_counter() - t0
    return y, report


def save_result(path: str, y: torch.Tensor) -> None:
    atomic_write(path, lambda tmp: save_file({"y": y.contiguous()}, tmp))


def save_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))
