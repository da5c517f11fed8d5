"""What the client gets back is the server's choice (``--reveal logits|label|topk``), the client's own
floor (flooded guess below sigma 40, ``insecure_*``, local truncation; a pinned model hash), the query
budget and ``op: stats`` only with ``--allow-stats``: dealer, model server (a thread) and client in one
process over loopback TCP, on a tiny BERT classifier and a tiny Llama."""

import contextlib
import threading

import pytest
import torch

from cometpi.convert import from_hf
from cometpi.core import Config, ConfigError, Role
from cometpi.nn import ApproxConfig, RingModel, greedy_decode, prepare_params, ring_forward
from cometpi.party import run_local
from cometpi.sampling import marks_to_indices, reveal_rounds, top_marks
from cometpi.service import (
    InsecureConfigError,
    ModelServer,
    PrivateClient,
    QueryBudgetExceeded,
    StatsRefused,
    check_floor,
    floor_violations,
)
from cometpi.transport import RemoteError, Traffic

transformers = pytest.importorskip("transformers")

FAST = ApproxConfig(guess="constant", gelu="quad", softmax="quad2")
NAMES = ["awful", "bad", "meh", "good", "great"]
TEXTS = ["a gorgeous, witty, seductive movie.", "dull, lifeless and far too long.", "meh."]


@pytest.fixture(scope="module")
def tiny_bert5_dir(tmp_path_factory):
    """A small BERT classifier with 5 labels and the real bert-base-uncased vocabulary (MiniLM's tokenizer)."""
    torch.manual_seed(3)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=5,
                                  id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        model.classifier.weight.mul_(40)  # distinct labels, margins far above the fixed-point error
    path = tmp_path_factory.mktemp("model") / "tiny-bert5"
    model.save_pretrained(path)
    return path


@contextlib.contextmanager
def served(server: ModelServer):
    """A dealer and ``server`` (serve_forever in a thread) on loopback; yields (server, dealer) addresses."""
    from cometpi.dealer import DealerServer
    from cometpi.serve import serve_forever
    from cometpi.transport import listen

    dealer = DealerServer().start()
    sock = listen()
    port = sock.getsockname()[1]
    sock.close()
    stop = threading.Event()
    t = threading.Thread(target=serve_forever, args=(server.handle,), daemon=True,
                         kwargs=dict(host="127.0.0.1", port=port, dealer=f"{dealer.address[0]}:{dealer.address[1]}",
                                     config=server.config, timeout=60, extra=server.card, stop_event=stop))
    t.start()
    try:
        yield f"127.0.0.1:{port}", f"{dealer.address[0]}:{dealer.address[1]}"
    finally:
        stop.set()
        t.join(10)
        dealer.stop()


def _received(client: PrivateClient) -> list:
    """Record (tag, shape, dtype) of every frame the client receives from the server from now on."""
    got, recv = [], client.sess.peer.recv

    def rec(tag, *a, **kw):
        out = recv(tag, *a, **kw)
        if isinstance(out, torch.Tensor):
            got.append((tag, tuple(out.shape), out.dtype))
        return out

    client.sess.peer.recv = rec
    return got


def _simulated_logits(model_dir, client, texts):
    arch, params = from_hf(str(model_dir))
    ids, mask = client.encode(texts)
    return ring_forward(arch, params, ids, mask, FAST)


def test_label_and_topk_are_the_simulations_argmax_and_topk_and_no_logits_reach_the_client(tiny_bert5_dir):
    """label = argmax of the simulated logits (and of the plaintext-approximate ones), topk = torch.topk's
    indices in order; the client receives no tensor tagged 'reveal' (the logits' reveal) and no (B, labels)
    tensor at all, only the (B, k, labels) marks; the label costs reveal_rounds(5, 1) - 1 more rounds
    than revealing the logits (the rest of the query is the same)."""
    rows = {}
    for reveal, k in (("logits", None), ("label", None), ("topk", 3)):
        server = ModelServer(str(tiny_bert5_dir), FAST, reveal=reveal, reveal_k=k)
        with served(server) as (saddr, daddr), PrivateClient(saddr, daddr) as c:
            assert (c.reveal, c.reveal_k) == (reveal, k) and c.card["reveal"] == reveal
            got = _received(c)
            ids, mask = c.encode(TEXTS)
            out, stats = c.infer_ids(ids, mask)
            rows[reveal] = c.classify(TEXTS)
            want = _simulated_logits(tiny_bert5_dir, c, TEXTS)
        B, V = want.shape
        if reveal == "logits":
            assert out.shape == (B, V) and ("reveal", (B, V), torch.int64) in got
            logits_rounds = stats["online"]["rounds"]
            continue
        assert not any(tag == "reveal" for tag, _, _ in got), got  # the logits are never revealed
        assert not any(shape == (B, V) for _, shape, _ in got), got
        assert [g for g in got if g[0] == "reveal-top"] == [("reveal-top", (B, k or 1, V), torch.int64)] * 2
        assert out.dtype == torch.int64
        assert out.tolist() == torch.topk(want, k or 1).indices.tolist()
        if reveal == "label":
            assert stats["online"]["rounds"] == logits_rounds + reveal_rounds(V, 1) - 1
    plain = torch.tensor([r["logits"] for r in rows["logits"]])
    assert [r["label"] for r in rows["label"]] == [NAMES[int(j)] for j in plain.argmax(-1)]
    assert all(r["confidence"] is None and r["logits"] is None for r in rows["label"] + rows["topk"])
    assert [r["top"] for r in rows["topk"]] == [[NAMES[int(j)] for j in row] for row in plain.topk(3).indices]


@pytest.mark.parametrize("V,k,rounds,nbytes", [(2, 1, 9, 84), (2, 2, 17, 168), (5, 3, 31, 954)])
def test_top_marks_cost_line(V, k, rounds, nbytes):
    """The rounds of ``reveal_rounds`` and the bytes of ``top_marks``' Cost line, on the session counters
    (one row, online, both directions, the reveal of the marks included)."""
    doc = " ".join(top_marks.__doc__.split())
    assert "Cost: ``reveal_rounds(V, k)`` = k (``max_rounds(V, c)`` + c) + 1 rounds" in doc
    assert reveal_rounds(V, k) == rounds
    logits = torch.tensor([[3.0, -1.5, 7.25, 0.5, 2.0][:V]], dtype=torch.float64)

    def job(s):
        from cometpi.approx import ShareOps

        x = s.share(logits if s.is_client else None, owner=Role.CLIENT, shape=logits.shape)
        before = s.meter.snapshot()
        marks = s.reveal(top_marks(ShareOps(s), x, k), Role.CLIENT, "reveal-top")
        after = s.meter.snapshot()
        on = sum((after[q] - before[q] for q in after if q[1] == "online"), Traffic())
        return None if marks is None else marks_to_indices(marks, k), on

    (idx, on), _ = run_local(job)
    assert idx.tolist() == torch.topk(logits, k).indices.tolist()
    assert on.rounds == rounds
    if (V, k) == (5, 3):
        assert f"the top 3: {rounds} rounds, {nbytes:,} B" in doc
    else:
        assert f"{rounds} rounds, {nbytes:,} B" in doc
    assert on.payload_bytes == nbytes


def test_marks_to_indices_takes_ties_in_index_order():
    marks = torch.tensor([[[0, 1, 0, 1], [0, 0, 1, 0]]])  # a tie for the first place, then index 2
    assert marks_to_indices(marks, 2).tolist() == [[1, 3]]
    assert marks_to_indices(marks, 3).tolist() == [[1, 3, 2]]
    with pytest.raises(ValueError, match="marked 0 of 1"):
        marks_to_indices(torch.zeros(1, 1, 4, dtype=torch.int64), 1)


def test_lm_server_that_reveals_labels_refuses_infer_and_still_generates():
    from .test_convert import _tiny

    arch, params = from_hf(_tiny("LlamaForCausalLM", seed=13))
    with pytest.raises(ValueError, match="--reveal topk is for classifiers"):
        ModelServer((arch, params), ApproxConfig.original(), reveal="topk", reveal_k=2)
    server = ModelServer((arch, params), ApproxConfig.original(), reveal="label")
    assert server.card["reveal"] == "label"
    ids = torch.tensor([[5, 17, 42]])
    with served(server) as (saddr, daddr):
        with PrivateClient(saddr, daddr) as c:
            with pytest.raises(ValueError, match="reveals only generated tokens.*infer.*refused"):
                c.infer_ids(ids)  # refused on the client, which knows the policy from the card
            got = [t["token"] for t in c.generate(ids[0].tolist(), max_new_tokens=2, fixed_length=True)]
        prepared = prepare_params(arch, params, ApproxConfig.original())
        assert got == list(greedy_decode(RingModel(prepared), arch, ApproxConfig.original(), prompt_ids=ids,
                                         prompt_length=3, max_new=2))
        c = PrivateClient(saddr, daddr)  # a client that ignores the card: the server refuses
        try:
            c.sess.peer.send_json({"op": "infer", "batch": 1, "length": 3, "mask": [[1, 1, 1]]}, "query")
            with pytest.raises(RemoteError, match="reveals only generated tokens"):
                c.sess.peer.recv("anything")
        finally:
            c.sess.close()


def test_reveal_choices_are_checked_at_start(tiny_bert5_dir):
    from .test_convert import _tiny

    with pytest.raises(ValueError, match="--reveal topk needs --reveal-k K, 1 <= K <= 5"):
        ModelServer(str(tiny_bert5_dir), FAST, reveal="topk")
    with pytest.raises(ValueError, match="--reveal-k is for --reveal topk"):
        ModelServer(str(tiny_bert5_dir), FAST, reveal="label", reveal_k=2)
    with pytest.raises(ValueError, match="unknown --reveal"):
        ModelServer(str(tiny_bert5_dir), FAST, reveal="probs")
    with pytest.raises(ValueError, match="needs logits"):
        ModelServer(from_hf(_tiny("BertModel", seed=2)), FAST, reveal="label")
    card = ModelServer(str(tiny_bert5_dir), FAST, reveal="topk", reveal_k=2, max_queries_per_session=3).card
    assert (card["reveal"], card["reveal_k"], card["max_queries_per_session"], card["stats"]) == ("topk", 2, 3, False)
    assert ModelServer(str(tiny_bert5_dir), FAST).card["reveal"] == "logits"  # the default: as before


def test_cli_serve_reveal_and_infer_print_the_labels(tiny_bert5_dir, capsys):
    from cometpi.cli import build_parser, main

    p = build_parser()
    assert p.parse_args(["serve", "--model", "m", "--dealer", "d", "--reveal", "topk:3"]).reveal == ("topk", 3)
    assert p.parse_args(["serve", "--model", "m", "--dealer", "d"]).reveal == ("logits", None)
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--model", "m", "--dealer", "d", "--reveal", "label:3"])
    server = ModelServer(str(tiny_bert5_dir), FAST, reveal="topk", reveal_k=2)
    with served(server) as (saddr, daddr):
        capsys.readouterr()
        assert main(["infer", "--server", saddr, "--dealer", daddr, TEXTS[0]]) == 0
        out = capsys.readouterr().out
    assert "the server reveals only the top 2 labels, in order (no logits, no confidence)" in out
    line = next(x for x in out.splitlines() if x.endswith(TEXTS[0]))
    assert line.split("\t")[1].startswith("top ") and " > " in line


def test_query_budget_and_stats_refused_by_default(tiny_bert5_dir):
    server = ModelServer(str(tiny_bert5_dir), FAST, max_queries_per_session=1)
    with served(server) as (saddr, daddr):
        with PrivateClient(saddr, daddr) as c:
            with pytest.raises(StatsRefused, match="--allow-stats"):
                c.server_stats()  # refused on the client: the card says stats are off
            c.classify(["good"])
            with pytest.raises(QueryBudgetExceeded, match="at most 1 queries.*--max-queries-per-session"):
                c.classify(["bad"])
        for query, named in (({"op": "stats"}, "op stats refused.*--allow-stats"), (None, "query budget exceeded")):
            c = PrivateClient(saddr, daddr)  # a client that ignores the card: the server refuses
            try:
                if query is None:
                    c.max_queries = None
                    c.classify(["good"])
                    query = {"op": "infer", "batch": 1, "length": 2, "mask": [[1, 1]]}
                c.sess.peer.send_json(query, "query")
                with pytest.raises(RemoteError, match=named):
                    c.sess.peer.recv("anything")
            finally:
                c.sess.close()
    with served(ModelServer(str(tiny_bert5_dir), FAST, allow_stats=True)) as (saddr, daddr):
        with PrivateClient(saddr, daddr) as c:
            assert c.server_stats()["peak_rss_mb"] > 0


def test_floor_names_the_field_the_value_and_the_flag():
    assert floor_violations(ApproxConfig().to_dict(), Config()) == []
    assert floor_violations(ApproxConfig(guess="comet", sigma=40).to_dict(), Config()) == []
    with pytest.raises(InsecureConfigError, match=r"approx\.sigma = 30.*30\.0 bits.*--allow-insecure flood"):
        check_floor(ApproxConfig(guess="comet", sigma=30).to_dict(), None, who="refusing the server")
    check_floor(ApproxConfig(guess="comet", sigma=30).to_dict(), None, "flood", who="x")
    small = ApproxConfig(guess="insecure_comet_small_flood").to_dict()
    assert {n for n, _ in floor_violations(small, None)} == {"insecure", "flood"}  # its real sigma is tiny
    with pytest.raises(InsecureConfigError, match=r"approx\.guess = 'insecure_comet_small_flood'.*"
                                                  r"--allow-insecure flood,insecure"):
        check_floor(small, None, "", who="refusing the server")
    with pytest.raises(InsecureConfigError, match=r"config\.trunc = 'local'.*--allow-insecure local-trunc"):
        check_floor(None, Config(trunc="local"), ["flood"], who="refusing to connect")
    check_floor(None, Config(trunc="local"), "local-trunc", who="x")
    with pytest.raises(ValueError, match="unknown --allow-insecure value.*choose from flood, insecure, local-trunc"):
        check_floor(None, None, "everything", who="x")


def test_server_refuses_insecure_constructions_unless_allowed(tiny_bert5_dir, capsys):
    from cometpi.cli import main

    insecure = ApproxConfig(guess="insecure_comet_small_flood", gelu="quad", softmax="quad2")
    with pytest.raises(InsecureConfigError, match="refusing to serve: approx.guess = 'insecure_comet_small_flood'"):
        ModelServer(str(tiny_bert5_dir), insecure)
    with pytest.raises(InsecureConfigError, match="refusing to serve: config.trunc = 'local'"):
        ModelServer(str(tiny_bert5_dir), FAST, Config(trunc="local"))
    ModelServer(str(tiny_bert5_dir), insecure, allow_insecure="insecure,flood")
    rc = main(["serve", "--model", str(tiny_bert5_dir), "--dealer", "127.0.0.1:9", "--gelu", "quad", "--softmax",
               "quad2", "--guess", "insecure_comet_small_flood"])
    assert rc == 2 and "--allow-insecure flood,insecure" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["flood", "insecure", "local-trunc"])
def test_client_refuses_a_server_below_its_floor_unless_allowed(tiny_bert5_dir, case):
    approx, config = {"flood": (ApproxConfig(guess="comet", sigma=30, gelu="quad", softmax="quad2"), Config()),
                      "insecure": (ApproxConfig(guess="insecure_comet_small_flood", gelu="quad", softmax="quad2"),
                                   Config()),
                      "local-trunc": (FAST, Config(trunc="local"))}[case]
    allow = "insecure,flood" if case == "insecure" else case
    server = ModelServer(str(tiny_bert5_dir), approx, config, allow_insecure=allow)
    if case == "local-trunc":  # the session config is the client's own: refused before connecting
        with pytest.raises(InsecureConfigError, match="refusing to connect: config.trunc = 'local'"):
            PrivateClient("127.0.0.1:9", "127.0.0.1:9", config=config)
    with served(server) as (saddr, daddr):
        if case != "local-trunc":
            need = "flood,insecure" if case == "insecure" else case
            with pytest.raises(InsecureConfigError, match=f"refusing the server at {saddr}: approx.*"
                                                          f"--allow-insecure {need}"):
                PrivateClient(saddr, daddr, config=config)
        with PrivateClient(saddr, daddr, config=config, allow_insecure=allow) as c:
            assert c.card["approx"]["guess"] == approx.guess


def test_client_compares_the_pinned_model_hash_itself(tiny_bert5_dir, monkeypatch):
    """A server that does not check the client's pin (here: a handshake that skips the comparison) is
    refused by the client, naming both hashes."""
    import cometpi.party as party

    def lax(ch, config, extra):
        hello = ch.recv_json("hello")
        ch.send_json({"ok": True, "extra": extra or {}}, "hello-ack")
        return str(hello["session"]), bytes.fromhex(hello["pair_seed"])

    server = ModelServer(str(tiny_bert5_dir), FAST)
    with served(server) as (saddr, daddr):
        with pytest.raises(ConfigError, match="session mismatch: model_hash"):  # an honest server refuses first
            PrivateClient(saddr, daddr, model_hash="0" * 16)
        monkeypatch.setattr(party, "_server_handshake", lax)
        with pytest.raises(ConfigError, match=f"pinned model hash {'0' * 16}, but its card announces model_hash "
                                              f"'{server.card['model_hash']}'"):
            PrivateClient(saddr, daddr, model_hash="0" * 16)
        with PrivateClient(saddr, daddr, model_hash=server.card["model_hash"]) as c:
            assert c.card["model_hash"] == server.card["model_hash"]


def test_checkpoints_load_from_safetensors_only(tiny_bert5_dir, tmp_path):
    """``from_pretrained(..., use_safetensors=True)``: a directory whose weights are only a .bin (a pickle) is
    refused with a named error before transformers would unpickle it."""
    import shutil

    from cometpi.convert import UnsupportedModel

    d = tmp_path / "bin-only"
    shutil.copytree(tiny_bert5_dir, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsupportedModel, match=r"\.bin \(a pickle.*no \.safetensors"):
        from_hf(str(d))
