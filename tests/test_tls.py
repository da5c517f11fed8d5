"""TLS 1.3 with pinned certificates on all three links (issue 14): keys, a private inference over TLS,
refusals that name the peer and the reason (a certificate not admitted, expired, missing, a plaintext
peer), the dealer's admission policy and session binding, half-open registrations, plaintext only on
loopback."""

import datetime as dt
import json
import subprocess
import sys
import threading

import pytest

from cometpi.core import Role
from cometpi.dealer import MAX_HALF_OPEN, DealerCore
from cometpi.protocols.material import DealerError
from cometpi.serve import spawn, spawn_roles, stop
from cometpi.tls import TlsConfig, TlsError, check_plaintext, keygen
from cometpi.transport import TcpChannel, listen

from .test_service import tiny_bert_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    fps = {n: keygen(n, d)["fingerprint"] for n in ("dealer", "server", "alice", "mallory")}
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    fps["expired"] = keygen("expired", d, days=1, not_before=old)["fingerprint"]
    return d, fps


def test_keygen_writes_a_private_key_and_a_pinned_certificate(keys):
    d, fps = keys
    assert (d / "alice.key").stat().st_mode & 0o777 == 0o600
    assert len(fps["alice"].split(":")) == 32 and len(set(fps.values())) == len(fps)
    r = subprocess.run([sys.executable, "-m", "cometpi", "keygen", "--name", "bob", "--out", str(d)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fingerprint" in r.stdout and (d / "bob.crt").is_file()


def _link(d, client_name, server_trusts, client_trusts="server"):
    """One TLS link between two threads; returns (client error, server error, server-side peer)."""
    sock = listen()
    port = sock.getsockname()[1]
    out = {}

    def serve():
        conn, _ = sock.accept()
        try:
            ch = TlsChannel_(conn, TlsConfig(str(d / "server"), [d / f"{n}.crt" for n in server_trusts]),
                             server_side=True, timeout=10, peer_name="client")
            out["peer"] = ch.peer
            ch.send_json({"hi": 1}, "x")
            ch.close()
        except TlsError as e:
            out["server"] = str(e)

    from cometpi.tls import TlsChannel as TlsChannel_

    t = threading.Thread(target=serve)
    t.start()
    try:
        ch = TcpChannel.connect("127.0.0.1", port, tls=TlsConfig(str(d / client_name), [d / f"{client_trusts}.crt"]),
                                timeout=10, peer_name="server")
        assert ch.recv_json("x") == {"hi": 1}
        out["client_wire"] = dict(ch.wire)
        ch.close()
    except Exception as e:  # noqa: BLE001
        out["client"] = str(e)
    t.join(20)
    sock.close()
    return out


def test_links_authenticate_both_ways_and_refusals_name_the_reason(keys):
    d, fps = keys
    ok = _link(d, "alice", ["alice"])
    assert ok["peer"].name == "alice" and ok["peer"].fingerprint == fps["alice"]
    assert ok["client_wire"]["recv"] > 0
    bad = _link(d, "mallory", ["alice"])  # not admitted by the server
    assert "client refused" in bad["server"] and "not one of the pinned" in bad["server"]
    assert "does not trust our certificate" in bad["client"]
    old = _link(d, "expired", ["expired"])  # admitted but expired
    assert "expired" in old["server"]
    wrong = _link(d, "alice", ["alice"], client_trusts="mallory")  # the client pinned another server
    assert "server refused" in wrong["client"] and "not one of the pinned" in wrong["client"]
    with pytest.raises(TlsError, match="not found"):
        TlsConfig(str(d / "nobody"), [d / "alice.crt"])


def test_private_inference_over_tls_and_impostors_are_refused(keys, tiny_bert_dir, tmp_path):  # noqa: F811
    d, _ = keys
    k = str(d)
    dealer_tls = ("--tls", f"{k}/dealer", "--allow-servers", f"{k}/server.crt", "--allow-clients", f"{k}/alice.crt",
                  "--allow-clients", f"{k}/mallory.crt")
    with spawn_roles(tiny_bert_dir, "--tls", f"{k}/server", "--dealer-cert", f"{k}/dealer.crt", "--allow-clients",
                     f"{k}/alice.crt", timeout=60, dealer_args=dealer_tls) as roles:
        saddr, daddr = roles.saddr, roles.daddr

        def infer(*extra, out=None):
            return subprocess.run([sys.executable, "-m", "cometpi", "infer", "--server", saddr, "--dealer", daddr,
                                   "--timeout", "20", *extra, *(["--json", str(out)] if out else []),
                                   "a gorgeous, witty film"], capture_output=True, text=True, timeout=120)

        r = infer("--tls", f"{k}/alice", "--server-cert", f"{k}/server.crt", "--dealer-cert", f"{k}/dealer.crt",
                  out=tmp_path / "ok.json")
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((tmp_path / "ok.json").read_text())["results"][0]["label"] in ("rotten", "fresh")
        r = infer("--tls", f"{k}/mallory", "--server-cert", f"{k}/server.crt", "--dealer-cert", f"{k}/dealer.crt")
        assert r.returncode == 2 and "does not trust our certificate" in r.stderr  # the server admits alice only
        r = infer()  # no TLS: the client's plaintext hello never becomes a session
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert roles.server.poll() is None  # and the server goes on serving


def test_dealer_admission_policy_and_session_binding():
    core = DealerCore(pairing_timeout=0.5, allow={int(Role.SERVER): {"S"}, int(Role.CLIENT): {"A", "M"}})
    with pytest.raises(DealerError, match="not admitted"):  # a client certificate registering as the server
        core.register("s1", int(Role.SERVER), identity="A", names="A")
    core.register("s1", int(Role.CLIENT), identity="A", names="S")
    with pytest.raises(DealerError, match="already connected"):  # a second registration of a role
        core.register("s1", int(Role.CLIENT), identity="M", names="S")
    core.register("s1", int(Role.SERVER), identity="S", names="A")
    assert len(core._both("s1")) == 2  # they name each other
    # a third, admitted process that learned the session id registers first, as the client: the server, which
    # authenticated alice, names her; the session's material is refused
    core.register("s2", int(Role.CLIENT), identity="M", names="S")
    core.register("s2", int(Role.SERVER), identity="S", names="A")
    with pytest.raises(DealerError, match="do not name each other"):
        core._both("s2")


def test_half_open_registrations_expire_and_are_bounded():
    class FakeChannel:
        closed = False

        def close(self):
            self.closed = True

    core = DealerCore(pairing_timeout=0.2)
    chans = [FakeChannel() for _ in range(MAX_HALF_OPEN)]
    for i, ch in enumerate(chans):
        core.register(f"h{i}", int(Role.CLIENT), channel=ch)
    with pytest.raises(DealerError, match="half-open"):
        core.register("one-too-many", int(Role.CLIENT))
    import time

    time.sleep(0.3)
    core.register("later", int(Role.CLIENT))  # registering reaps: the stale ones are closed
    assert all(ch.closed for ch in chans)
    for i in range(MAX_HALF_OPEN):
        core.unregister(f"h{i}", int(Role.CLIENT))
    assert len(core._seeds) == 1


def test_plaintext_only_on_loopback():
    check_plaintext("127.0.0.1", False, "the server")
    check_plaintext("localhost", False, "the server")
    with pytest.raises(TlsError, match="--insecure-plaintext"):
        check_plaintext("10.1.2.3", False, "the server")
    with pytest.warns(UserWarning, match="insecure_plaintext"):
        check_plaintext("10.1.2.3", True, "the test link")
    r = subprocess.run([sys.executable, "-m", "cometpi", "dealer", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--tls" in r.stderr


def test_operations_log_line_sigterm_and_per_client_limit(tiny_bert_dir, tmp_path):  # noqa: F811
    """One JSON line per session on the server; a per-client limit on concurrent sessions; SIGTERM while a
    session runs: the session finishes, then the server exits 0."""
    import signal
    import time

    from cometpi.service import PrivateClient

    dealer, daddr = spawn(["dealer", "--port", "0"])
    server = None
    try:
        log = open(tmp_path / "server.err", "w")  # noqa: SIM115
        server, saddr = spawn(["serve", "--model", str(tiny_bert_dir), "--port", "0", "--dealer", daddr,
                               "--workers", "3", "--max-sessions-per-client", "1", "--timeout", "20"], timeout=60,
                              stderr=log)
        with PrivateClient(saddr, daddr, timeout=20) as first:
            with pytest.raises(Exception, match="too many concurrent sessions"):
                with PrivateClient(saddr, daddr, timeout=20) as second:
                    second.classify(["no"])
            server.send_signal(signal.SIGTERM)  # while `first` is open: it may finish its work
            time.sleep(0.5)
            assert first.classify(["a gorgeous, witty film"])[0]["label"] in ("rotten", "fresh")
        assert server.wait(30) == 0
        log.close()
        err = (tmp_path / "server.err").read_text()
    finally:
        if server is not None:
            stop(server)
        stop(dealer)
    lines = [json.loads(x) for x in err.splitlines() if x.startswith('{"event": "session"')]
    assert len(lines) == 2 and {x["outcome"] for x in lines} >= {"ok"}
    ok = next(x for x in lines if x["outcome"] == "ok")
    assert ok["online_bytes"] > 0 and ok["rounds"] > 0 and "model_hash" in ok
    assert any("too many concurrent sessions" in x["outcome"] for x in lines)


def test_the_dealer_exits_cleanly_on_sigterm():
    import signal

    dealer, _ = spawn(["dealer", "--port", "0"])
    try:
        dealer.send_signal(signal.SIGTERM)
        assert dealer.wait(15) == 0
    finally:
        stop(dealer)
