"""Handshake and dealer errors: mismatches are named, nothing hangs."""

import threading

import pytest

from cometpi.core import Config, ConfigError, Role
from cometpi.dealer import DealerClient, DealerCore, DealerError, LocalDealer, Provider
from cometpi.party import client_handshake, local_pair, server_handshake
from cometpi.transport import PROTOCOL_VERSION, MemoryChannel, Meter, VersionMismatch


def _handshake(client_cfg, server_cfg, client_extra=None, server_extra=None):
    c, s = MemoryChannel.pair((Meter(), Meter()), timeout=5)
    out = {}

    def server():
        try:
            out["s"] = server_handshake(s, server_cfg, server_extra)
        except Exception as e:  # noqa: BLE001
            out["s_err"] = e

    t = threading.Thread(target=server)
    t.start()
    try:
        out["c"] = client_handshake(c, client_cfg, client_extra)
    except Exception as e:  # noqa: BLE001
        out["c_err"] = e
    t.join(5)
    return out


def test_matching_configs_agree_on_session_and_seed():
    out = _handshake(Config(), Config(), None, {"model": "m1"})
    assert out["c"][:2] == out["s"]
    assert out["c"][2] == {"model": "m1"}  # the client learns the server's public card


def test_config_mismatch_names_the_field_on_both_sides():
    out = _handshake(Config(trunc="local"), Config(trunc="exact"))
    for key in ("c_err", "s_err"):
        assert isinstance(out[key], ConfigError)
        assert "trunc" in str(out[key]) and "'local'" in str(out[key])


def test_model_mismatch_in_extra_is_named():
    out = _handshake(Config(), Config(), {"model": "abc"}, {"model": "def"})
    assert "model" in str(out["c_err"]) and "model" in str(out["s_err"])


def test_wrong_protocol_version_in_hello():
    c, s = MemoryChannel.pair((Meter(), Meter()), timeout=5)
    c.send_json({"version": PROTOCOL_VERSION + 7, "config": {}, "config_hash": ""}, "hello")
    with pytest.raises(VersionMismatch, match="version"):
        server_handshake(s, Config())
    assert "version" in c.recv_json("hello-ack")["error"]


def test_malformed_hello_is_refused():
    c, s = MemoryChannel.pair((Meter(), Meter()), timeout=5)
    c.send_json({"version": PROTOCOL_VERSION, "config_hash": Config().hash()}, "hello")
    with pytest.raises(ConfigError, match="malformed hello"):
        server_handshake(s, Config())


def test_invalid_config_is_clear():
    with pytest.raises(ConfigError, match="truncation mode"):
        Config(trunc="sometimes")
    with pytest.raises(ConfigError, match="unknown configuration fields"):
        Config.from_dict({"frac_bits": 16, "colour": "red"})


def test_config_hash_changes_with_fields():
    assert Config().hash() == Config().hash()
    assert Config(frac_bits=12).hash() != Config().hash()


def test_dealer_refuses_unknown_kind_and_wrong_receiver():
    dealer = LocalDealer()
    client, server = local_pair(dealer=dealer)
    with pytest.raises(DealerError, match="unknown kind"):
        server.provider.link.fetch(99, "teleport", {})
    client2, server2 = local_pair(dealer=dealer)
    with pytest.raises(DealerError, match="may not ask"):
        client2.provider.link.fetch(0, "mul", {"shape": [2]})
    for s in (client, server, client2, server2):
        s.close()


def test_dealer_refuses_oversized_and_malformed_requests():
    core = DealerCore(pairing_timeout=1)
    core.register("s", 0)
    core.register("s", 1)
    with pytest.raises(DealerError, match="exceeds"):
        core.correction("s", 1, [0, "mul", {"shape": [1 << 20, 1 << 20]}])
    with pytest.raises(DealerError, match="invalid shape"):
        core.correction("s", 1, [0, "mul", {"shape": "big"}])
    with pytest.raises(DealerError, match="malformed request"):
        core.correction("s", 1, ["x"])
    with pytest.raises(DealerError, match="already connected"):
        core.register("s", 0)


def test_dealer_answers_each_index_once():
    """Two corrections at one index would let their receiver solve for the other party's material."""
    core = DealerCore(pairing_timeout=1)
    core.register("s", 0)
    core.register("s", 1)
    core.correction("s", 1, [7, "mul", {"shape": [2]}])
    with pytest.raises(DealerError, match="already answered"):
        core.correction("s", 1, [7, "mul", {"shape": [3]}])
    with pytest.raises(DealerError, match="already answered"):
        core.correction("s", 1, [7, "trunc", {"shape": [2]}])
    core.correction("s", 1, [3, "mul", {"shape": [2]}])  # lower indices are fine (guessed plans run ahead)
    with pytest.raises(DealerError, match="outside this session's range"):
        core.correction("s", 1, [1 << 40, "mul", {"shape": [2]}])  # no unbounded bookkeeping
    with pytest.raises(DealerError, match="outside this session's range"):
        core.correction("s", 1, [-1, "mul", {"shape": [2]}])


def test_dealer_waits_a_bounded_time_for_the_other_party():
    dealer = LocalDealer(pairing_timeout=0.5)
    link = dealer.connect(Meter(), timeout=5)
    seed = link.hello("lonely", Role.SERVER, Config().hash())
    provider = Provider(Role.SERVER, seed, link)
    with pytest.raises(DealerError, match="did not connect to the dealer"):
        provider.get("mul", shape=[3])
    provider.close()


def test_dealer_client_reports_a_dead_dealer():
    c, d = MemoryChannel.pair((Meter(), Meter()), link="dealer", timeout=2)
    link = DealerClient(c)

    def fake_dealer():
        d.recv_json("dealer-hello")
        d.send_json({"ok": True, "seed": "00" * 16}, "dealer-hello")
        d.recv_json("dealer-get")
        d.close()  # dies before answering

    t = threading.Thread(target=fake_dealer)
    t.start()
    seed = link.hello("sid", Role.SERVER, "h")
    with pytest.raises(Exception, match="closed the connection"):
        Provider(Role.SERVER, seed, link).get("mul", shape=[2])
    t.join()
