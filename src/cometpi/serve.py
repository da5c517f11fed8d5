"""Processes: the server accept loop, spawning dealer/server processes, and the private-linear demo.

The *linear demo* is the engine's end-to-end job until the model layers land: the server owns a
weight W (a safetensors file), the client owns X, and the client learns X @ W and nothing else; the
server learns nothing about X.  Dealer, server and client are separate OS processes over TCP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .core import Config, Role, Session
from .costs import atomic_write, save_json  # noqa: F401 - re-exported
from .party import HANDSHAKE_TIMEOUT, accept_server
from .profiling import thread_profile
from .protocols import matmul_private, prepare_weight
from .transport import DeadlineExceeded, TransportError, listen

log = logging.getLogger("cometpi.serve")


#: Seconds running sessions get to finish after SIGTERM before the server exits anyway.
DRAIN_SECONDS = 60.0
#: Connections at most in their handshake or waiting for a session slot at once (more are closed at once).
MAX_PENDING_HANDSHAKES = 32
#: Seconds a session may last (then the server ends it with an error frame naming the limit).
MAX_SESSION_SECONDS = 4 * 3600.0


def session_record(sess: Session | None, addr, extra: dict | None, outcome: str, seconds: float) -> dict:
    """The one structured log line per session: peer identity, model hash, bytes, rounds, seconds, outcome."""
    rec = {"event": "session", "peer": f"{addr[0]}:{addr[1]}", "outcome": outcome, "seconds": round(seconds, 3)}
    peer = getattr(getattr(sess, "peer", None), "peer", None)
    if peer is not None:
        rec["identity"] = {"name": peer.name, "fingerprint": peer.fingerprint}
    if extra and "model_hash" in extra:
        rec["model_hash"] = extra["model_hash"]
    if sess is not None:
        rep = sess.meter.report()
        for phase in ("online", "offline"):
            rec[f"{phase}_bytes"] = rep[phase]["bytes_sent"] + rep[phase]["bytes_recv"]
        rec["rounds"] = rep["online"]["rounds"]
        wire = getattr(sess.peer, "wire", None)
        if wire is not None:
            rec["tls_wire_bytes"] = wire["sent"] + wire["recv"]
    return rec


class ServerBusy(RuntimeError):
    """No session slot became free for a client that completed its handshake (or the server is stopping)."""


def serve_forever(handler: Callable[[Session], None], *, host: str, port: int, dealer: str, config: Config,
                  timeout: float, extra: dict | None = None, once: bool = False, banner: str = "server",
                  net=None, workers: int = 1, tls=None, insecure_plaintext: bool = False,
                  max_per_client: int | None = None, stop_event: threading.Event | None = None,
                  handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
                  max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
                  max_session_seconds: float | None = MAX_SESSION_SECONDS) -> None:
    """Accept clients and serve each in its own session; up to ``workers`` at once (threads sharing
    only read-only state such as the weights).  A failing client is logged and the others go on.
    ``once``: exit after the first client.

    Bounds against anyone who can connect (docs/robustness.md): each connection runs its handshake (TLS,
    hello, dealer registration) in a thread of its own, off the accept loop, and must complete it within
    ``handshake_timeout`` seconds in all (``party.accept_server``), or it is dropped with the reason logged;
    at most ``max_pending_handshakes`` connections may be in their handshake or waiting for a session slot,
    more are closed at once.  A session slot (``workers``) is taken only by a session whose handshake
    completed, which waits at most ``timeout`` s for one (then ``ServerBusy``, told to the client).  A session
    lasts at most ``max_session_seconds``: every read from the client is bounded by what is left (so it is
    enforced between queries and within them), then the client gets an error frame naming the limit.  Idle
    time between two reads is bounded by ``timeout`` (the model server's handler waits up to its own idle
    timeout between queries).

    Operations: one JSON log line per connection (``session_record``, logger ``cometpi.serve``, also on
    stderr); ``max_per_client`` concurrent sessions per client identity (its certificate with TLS, its
    address without), more are refused with a named error; SIGTERM (in the main thread) or
    ``stop_event`` stops accepting, lets running sessions finish within ``DRAIN_SECONDS`` and returns."""
    if workers < 1 or max_pending_handshakes < 1:
        raise ValueError(f"workers and max_pending_handshakes must be >= 1, got {workers}, {max_pending_handshakes}")
    if tls is None:
        from .tls import check_plaintext

        check_plaintext(host, insecure_plaintext, "this server's port")
    sock = listen(host, port)
    h, p = sock.getsockname()[:2]
    many = f" ({workers} concurrent sessions)" if workers > 1 else ""
    print(f"cometpi {banner}{many} listening on {h}:{p}", flush=True)
    slots = threading.BoundedSemaphore(workers)
    running: list[threading.Thread] = []
    stopping = stop_event or threading.Event()
    per_client: dict[str, int] = {}
    lock = threading.Lock()  # guards per_client and pending
    pending = [0]  # connections in their handshake or waiting for a slot
    if threading.current_thread() is threading.main_thread():
        import signal

        signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def take_slot() -> bool:
        end = time.monotonic() + timeout
        while not slots.acquire(timeout=0.5):
            if stopping.is_set():
                raise ServerBusy("the server is shutting down")
            if time.monotonic() > end:
                raise ServerBusy(f"the server is busy: no free session slot within {timeout:g} s")
        return True

    def serve_one(conn, addr) -> None:
        sess, t0, outcome, key, slot = None, time.perf_counter(), "ok", None, False
        try:
            try:
                sess = accept_server(conn, dealer, config, timeout=timeout, extra=extra, net=net, tls=tls,
                                     insecure_plaintext=insecure_plaintext, handshake_timeout=handshake_timeout)
                ident = getattr(sess.peer, "peer", None)
                key = ident.fingerprint if ident is not None else addr[0]
                with lock:
                    per_client[key] = per_client.get(key, 0) + 1
                    over = max_per_client is not None and per_client[key] > max_per_client
                if over:
                    raise ValueError(f"too many concurrent sessions for this client (at most {max_per_client})")
                slot = take_slot()
            finally:
                with lock:
                    pending[0] -= 1
            if max_session_seconds is not None:
                sess.peer.set_deadline(time.monotonic() + max_session_seconds, "the session reached the server's "
                                       f"maximum session length ({max_session_seconds:g} s)")
            with thread_profile("server"):  # COMETPI_PROFILE=DIR: this session's CPU time by function
                handler(sess)
            log.info("client %s:%s served", *addr[:2])
        except (TransportError, ValueError, RuntimeError) as e:
            outcome = f"error: {e}"
            log.error("client %s:%s failed: %s", addr[0], addr[1], e)
            print(f"error serving {addr[0]}:{addr[1]}: {e}", file=sys.stderr, flush=True)
            if sess is not None and (not isinstance(e, TransportError) or isinstance(e, DeadlineExceeded)):
                sess.peer.send_error(e)  # a bad query, a busy server, the session's time is up: tell the client
        except Exception as e:  # noqa: BLE001 - a bug in one session must not stop the server
            outcome = f"internal error: {type(e).__name__}"
            log.exception("client %s:%s crashed the session", addr[0], addr[1])
            print(f"error serving {addr[0]}:{addr[1]}: internal error {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            if sess is not None:
                sess.peer.send_error(f"internal server error ({type(e).__name__})")
        finally:
            if key is not None:
                with lock:
                    per_client[key] -= 1
            line = json.dumps(session_record(sess, addr, extra, outcome, time.perf_counter() - t0))
            log.info(line)
            print(line, file=sys.stderr, flush=True)
            if sess is not None:
                sess.close()
            else:
                conn.close()
            if slot:
                slots.release()

    sock.settimeout(0.5)  # to notice SIGTERM between accepts
    served_once = False
    try:
        while not stopping.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            with lock:
                full = pending[0] >= max_pending_handshakes
                pending[0] += not full
            if full:
                log.warning("refusing %s:%s: %d connections already in their handshake or waiting for a session "
                            "slot (max_pending_handshakes)", addr[0], addr[1], max_pending_handshakes)
                conn.close()
                continue
            conn.settimeout(None)
            t = threading.Thread(target=serve_one, args=(conn, addr), name=f"session-{addr[1]}", daemon=True)
            t.start()
            running[:] = [x for x in running if x.is_alive()] + [t]
            if once:
                served_once = True
                break
    finally:
        sock.close()
        if served_once and not stopping.is_set():
            running[-1].join()  # the one client's session, to its end (bounded by its timeouts)
        deadline = time.monotonic() + (DRAIN_SECONDS if stopping.is_set() else timeout)
        for t in running:
            t.join(max(0.0, deadline - time.monotonic()))
        if stopping.is_set():
            print(f"cometpi {banner}: stopped (SIGTERM)", file=sys.stderr, flush=True)


def spawn(args: list[str], *, ready: str = "listening on", timeout: float = 30.0, env=None, stderr=None):
    """Start ``python -m cometpi ARGS`` and wait for its 'listening on HOST:PORT' line.

    Returns (process, "HOST:PORT").  The child's stderr passes through (or goes to ``stderr``, e.g. a
    file); it is killed on failure.
    """
    proc = subprocess.Popen([sys.executable, "-m", "cometpi", *args], stdout=subprocess.PIPE, text=True,
                            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=stderr)
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


@dataclass
class Roles:
    """A dealer and a model server started by ``spawn_roles``: their processes and HOST:PORT addresses."""

    dealer: subprocess.Popen
    daddr: str
    server: subprocess.Popen | None = None
    saddr: str | None = None


@contextlib.contextmanager
def spawn_roles(model: str, *serve_args: str, timeout: float = 300.0, stderr=None, dealer_args=(),
                server_env=None, dealer_env=None):
    """Start ``cometpi dealer DEALER_ARGS`` and ``cometpi serve --model MODEL SERVE_ARGS`` (on free ports, the
    server using that dealer) and stop both when the block ends, whatever happens in it.  Yields ``Roles``.
    ``timeout``: the seconds the server may take to start; ``stderr``: both processes' (``spawn``);
    ``server_env``/``dealer_env``: each process's environment (default: this one's, unbuffered)."""
    dealer, daddr = spawn(["dealer", "--port", "0", *dealer_args], stderr=stderr, env=dealer_env)
    roles = Roles(dealer, daddr)
    try:
        roles.server, roles.saddr = spawn(["serve", "--model", str(model), "--port", "0", "--dealer", daddr,
                                           *serve_args], timeout=timeout, stderr=stderr, env=server_env)
        yield roles
    finally:
        if roles.server is not None:
            stop(roles.server)
        stop(dealer)


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
