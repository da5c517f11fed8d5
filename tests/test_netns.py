"""Across hosts (issue 14): dealer, server and client in three network namespaces joined by veth links to
a bridge, TLS end to end (text to label), and from a fourth namespace an impostor tries the server and
the dealer: refused.  The namespaces have no route out, so all traffic stays inside what the test made.
Skipped with the reason where the kernel or the user may not create namespaces."""

import os
import subprocess
import sys
import time

import pytest

from cometpi.tls import keygen

from .test_service import tiny_bert_dir  # noqa: F401  (fixture)

SUFFIX = f"{os.getpid() % 100000}"
NAMES = {"dealer": "1", "server": "2", "client": "3", "impostor": "4"}


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    br = f"cpibr{SUFFIX}"
    r = _ip("netns", "add", br, check=False)
    if r.returncode:
        pytest.skip(f"the kernel refused a network namespace: {r.stderr.strip()}")
    made = [br]
    try:
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for role, n in NAMES.items():
            ns = f"cpi{role[0]}{SUFFIX}"
            _ip("netns", "add", ns)
            made.append(ns)
            a, b = f"v{role[0]}{SUFFIX}", f"b{role[0]}{SUFFIX}"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", ns)
            _ip("link", "set", b, "netns", br)
            _ip("-n", br, "link", "set", b, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"10.77.0.{n}/24", "dev", a)
            _ip("-n", ns, "link", "set", a, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {role: (f"cpi{role[0]}{SUFFIX}", f"10.77.0.{n}") for role, n in NAMES.items()}
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)


def _cometpi(ns, *args):
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "cometpi", *args]


def _start(cmd, timeout=90):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            return proc
        if not line:
            break
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def test_three_namespaces_over_tls_and_an_impostor(namespaces, tiny_bert_dir, tmp_path):  # noqa: F811
    k = tmp_path / "keys"
    for n in ("dealer", "server", "alice", "mallory"):
        keygen(n, k)
    (dns, dip), (sns, sip), (cns, _), (xns, _) = (namespaces[r] for r in ("dealer", "server", "client", "impostor"))
    procs = []
    try:
        procs.append(_start(_cometpi(dns, "dealer", "--host", dip, "--port", "7300", "--tls", f"{k}/dealer",
                                     "--allow-servers", f"{k}/server.crt", "--allow-clients", f"{k}/alice.crt")))
        procs.append(_start(_cometpi(sns, "serve", "--model", str(tiny_bert_dir), "--host", sip, "--port", "7301",
                                     "--dealer", f"{dip}:7300", "--tls", f"{k}/server", "--dealer-cert",
                                     f"{k}/dealer.crt", "--allow-clients", f"{k}/alice.crt", "--timeout", "20")))

        def infer(ns, who, *extra):
            tls = ["--tls", f"{k}/{who}", "--server-cert", f"{k}/server.crt", "--dealer-cert", f"{k}/dealer.crt"]
            return subprocess.run(_cometpi(ns, "infer", "--server", f"{sip}:7301", "--dealer", f"{dip}:7300",
                                           "--timeout", "20", *(tls if who else []), *extra, "a gorgeous, witty film"),
                                  capture_output=True, text=True, timeout=180)

        r = infer(cns, "alice")
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split("\n")[1].split("\t")[0] in ("LABEL_0", "LABEL_1", "rotten", "fresh")
        r = infer(xns, "mallory")  # a key the server does not admit
        assert r.returncode == 2 and "does not trust our certificate" in r.stderr
        r = infer(xns, None)  # no TLS off loopback: refused before anything is sent
        assert r.returncode == 2 and "--insecure-plaintext" in r.stderr
        r = infer(xns, None, "--insecure-plaintext")  # plaintext anyway: the server does not speak it
        assert r.returncode == 2 and "Traceback" not in r.stderr
        probe = ("from cometpi.tls import TlsConfig; from cometpi.transport import TcpChannel; "
                 f"TcpChannel.connect('{dip}', 7300, tls=TlsConfig('{k}/mallory', ['{k}/dealer.crt']), timeout=10)"
                 ".recv_json('x')")
        r = subprocess.run(["ip", "netns", "exec", xns, sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=60)  # the impostor at the dealer
        assert r.returncode != 0 and "does not trust our certificate" in r.stderr
        assert all(p.poll() is None for p in procs)  # dealer and server go on
    finally:
        for p in procs:
            p.kill()
            p.wait()
