"""Crashes at chosen points of a private inference (docs/robustness.md): a party dies abruptly (os._exit,
no cleanup, like kill -9) right after sending its N-th frame.  The survivors exit with a clean error
within a bounded time or go on serving; no hang, no zombie, no partial result file.  One crash point
per victim runs in ``make test``; the others in ``make test-slow``."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cometpi.serve import spawn_roles
from cometpi.transport import FAULT_EXIT_CODE

from .test_generate import tiny_llama_dir  # noqa: F401  (fixture)
from .test_service import tiny_bert_dir  # noqa: F401  (fixture)

TIMEOUT = 10  # every party's receive timeout here: the bound on noticing a silent peer
TEXT = "a gorgeous, witty, seductive movie."


def _env(after: int | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("COMETPI_FAULT_EXIT_AFTER_SENDS", None)
    if after:
        env["COMETPI_FAULT_EXIT_AFTER_SENDS"] = str(after)
    return env


def _services(model_dir, *serve_args, server_after=None, dealer_after=None):
    """A dealer and a model server, each with its own crash point (``_env``), stopped when the block ends."""
    return spawn_roles(model_dir, *serve_args, "--timeout", str(TIMEOUT), timeout=60,
                       dealer_args=("--pairing-timeout", str(TIMEOUT)), server_env=_env(server_after),
                       dealer_env=_env(dealer_after))


def _infer(saddr, daddr, out: Path, after=None):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cometpi", "infer", "--server", saddr, "--dealer", daddr, "--timeout",
                        str(TIMEOUT), "--json", str(out), TEXT], capture_output=True, text=True, timeout=120,
                       env=_env(after))
    return r, time.perf_counter() - t0


def _zombies() -> list[int]:
    """Zombie children of this test process."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            out.append(int(stat.parent.name))
    return out


@pytest.fixture(scope="module")
def frames(tiny_bert_dir, tmp_path_factory):  # noqa: F811
    """Frames a client sends in one inference (online + to the dealer), from a clean run."""
    with _services(tiny_bert_dir, "--guess", "constant") as roles:
        out = tmp_path_factory.mktemp("clean") / "out.json"
        r, _ = _infer(roles.saddr, roles.daddr, out)
        assert r.returncode == 0, r.stderr[-2000:]
        st = json.loads(out.read_text())["stats"]
        return st["online"]["msgs_sent"] + st["offline"]["msgs_sent"]


@pytest.mark.parametrize("point", [pytest.param(0.01, marks=pytest.mark.slow), 0.5,
                                   pytest.param(0.95, marks=pytest.mark.slow)])
def test_client_dies_and_the_server_serves_the_next(tiny_bert_dir, frames, tmp_path, point):  # noqa: F811
    with _services(tiny_bert_dir, "--guess", "constant") as roles:
        r, _ = _infer(roles.saddr, roles.daddr, tmp_path / "dead.json", after=max(1, int(point * frames)))
        assert r.returncode == FAULT_EXIT_CODE and not (tmp_path / "dead.json").exists()
        r, seconds = _infer(roles.saddr, roles.daddr, tmp_path / "next.json")  # the server recovered
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((tmp_path / "next.json").read_text())["results"][0]["label"] in ("rotten", "fresh")
        assert roles.server.poll() is None
    assert not _zombies()


@pytest.mark.parametrize("victim,point", [pytest.param("server", 0.02, marks=pytest.mark.slow), ("server", 0.6),
                                          pytest.param("dealer", 0.05, marks=pytest.mark.slow), ("dealer", 0.7)])
def test_server_or_dealer_dies_and_the_client_fails_cleanly(tiny_bert_dir, frames, tmp_path, victim,  # noqa: F811
                                                            point):
    # the server and the dealer send about as many frames as the client; they start counting at launch
    after = max(1, int(point * frames))
    with _services(tiny_bert_dir, "--guess", "constant", **{f"{victim}_after": after}) as roles:
        r, seconds = _infer(roles.saddr, roles.daddr, tmp_path / "out.json")
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "error" in r.stderr and "Traceback" not in r.stderr
        assert seconds < 2 * TIMEOUT + 30  # noticed within the timeout (plus process start-up)
        assert not (tmp_path / "out.json").exists()  # no partial result
        dead = roles.server if victim == "server" else roles.dealer
        assert dead.wait(10) == FAULT_EXIT_CODE
        if victim == "dealer":  # the server notices too, logs it and keeps accepting
            time.sleep(1)
            assert roles.server.poll() is None
    assert not _zombies()


def test_server_killed_mid_generation_and_the_client_fails_cleanly(tiny_llama_dir, tmp_path):  # noqa: F811
    """The server is killed (SIGKILL) while it generates; `cometpi generate` exits with a clean error
    within the timeout, leaves no JSON, and the dealer keeps running."""
    with _services(tiny_llama_dir) as roles:
        saddr, daddr = roles.saddr, roles.daddr
        out = tmp_path / "gen.json"
        client = subprocess.Popen([sys.executable, "-m", "cometpi", "generate", "--server", saddr, "--dealer", daddr,
                                   "--timeout", str(TIMEOUT), "--max-new-tokens", "40", "--fixed-length", "--json",
                                   str(out), "The rain had started before dawn"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_env(None))
        line = client.stderr.readline()  # "connected: ..." once the weights are masked: generation starts
        assert line.startswith("connected"), line
        time.sleep(1.0)
        roles.server.kill()
        t0 = time.perf_counter()
        _, err = client.communicate(timeout=120)
        seconds = time.perf_counter() - t0
        assert client.returncode == 2, (client.returncode, err[-2000:])
        assert "error" in err and "Traceback" not in err
        assert seconds < 2 * TIMEOUT + 10 and not out.exists()
        assert roles.dealer.poll() is None
    assert not _zombies()
