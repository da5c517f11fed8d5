"""The model service end to end: dealer, model server and client as three OS processes over loopback,
from text to label, plus the Python API in one process."""

import json
import subprocess
import sys

import pytest
import torch

from cometpi.convert import from_hf
from cometpi.nn import ApproxConfig, plaintext_forward
from cometpi.serve import spawn_roles

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A small BERT classifier with the real bert-base-uncased vocabulary (so MiniLM's tokenizer works)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2,
                                  id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
    model = transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        model.classifier.weight.mul_(40)  # confident, distinct labels
    path = tmp_path_factory.mktemp("model") / "tiny-bert"
    model.save_pretrained(path)
    return path


def test_three_processes_text_to_label(tmp_path, tiny_bert_dir):
    texts = ["a gorgeous, witty, seductive movie.", "dull, lifeless and far too long."]
    with spawn_roles(tiny_bert_dir, "--once", "--guess", "constant", timeout=60) as roles:
        r = subprocess.run([sys.executable, "-m", "cometpi", "infer", "--server", roles.saddr, "--dealer", roles.daddr,
                            "--json", str(tmp_path / "out.json"), *texts],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        roles.server.wait(30)
    out = json.loads((tmp_path / "out.json").read_text())
    # the plaintext-approximate model on the same tokens gives the same labels and nearly the same logits
    from cometpi.data import minilm_path

    tok = transformers.BertTokenizerFast.from_pretrained(minilm_path())
    enc = tok(texts, padding=True, return_tensors="pt")
    arch, params = from_hf(str(tiny_bert_dir))
    approx = plaintext_forward(arch, params, enc["input_ids"], enc["attention_mask"],
                               ApproxConfig(guess="constant"))
    logits = torch.tensor([row["logits"] for row in out["results"]], dtype=torch.float64)
    # the pooled features differ by ~1e-3 (fixed point through CrypTen's sigmoid); the classifier,
    # scaled by 40 above, multiplies that
    assert float((logits - approx).abs().max()) < 40 * 1e-3
    assert [row["label"] for row in out["results"]] == [["rotten", "fresh"][int(k)] for k in approx.argmax(-1)]
    assert out["stats"]["online"]["bytes_sent"] > 0 and out["card"]["arch"]["kind"] == "bert"
    assert "online" in r.stdout and "rounds" in r.stdout


def test_python_api_several_queries_and_pinned_hash(tiny_bert_dir):
    import threading

    from cometpi.dealer import DealerServer
    from cometpi.serve import serve_forever
    from cometpi.service import ModelServer, PrivateClient
    from cometpi.transport import listen

    dealer = DealerServer().start()
    daddr = f"{dealer.address[0]}:{dealer.address[1]}"
    server = ModelServer(str(tiny_bert_dir), ApproxConfig(guess="constant", gelu="quad", softmax="quad2"))
    sock = listen()
    port = sock.getsockname()[1]
    sock.close()
    t = threading.Thread(target=serve_forever, args=(server.handle,), daemon=True,
                         kwargs=dict(host="127.0.0.1", port=port, dealer=daddr, config=server.config,
                                     timeout=60, extra=server.card))
    t.start()
    try:
        with PrivateClient(f"127.0.0.1:{port}", daddr, model_hash=server.card["model_hash"]) as c:
            assert c.approx.gelu == "quad"  # the client adopts the server's approximation config
            a = c.classify(["good"], pad_to=16)
            b = c.classify(["bad", "worse"], hide_length=True)
            assert len(a) == 1 and len(b) == 2 and a[0]["label"] in ("rotten", "fresh")
        from cometpi.core import ConfigError

        with pytest.raises(ConfigError, match="model_hash"):
            PrivateClient(f"127.0.0.1:{port}", daddr, model_hash="0" * 16)
    finally:
        dealer.stop()


def test_infer_says_when_a_text_was_truncated(tiny_bert_dir, tmp_path, capsys):
    """Issue 15: a long text was cut to --max-length silently, its whole text echoed beside the label.
    The line for that text now says '(truncated to K of N tokens)'; the API rows carry the counts."""
    import threading

    from cometpi.cli import main
    from cometpi.dealer import DealerServer
    from cometpi.serve import serve_forever
    from cometpi.service import ModelServer, PrivateClient
    from cometpi.transport import listen

    dealer = DealerServer().start()
    daddr = f"{dealer.address[0]}:{dealer.address[1]}"
    server = ModelServer(str(tiny_bert_dir), ApproxConfig(guess="constant", gelu="quad", softmax="quad2"))
    sock = listen()
    port = sock.getsockname()[1]
    sock.close()
    threading.Thread(target=serve_forever, args=(server.handle,), daemon=True,
                     kwargs=dict(host="127.0.0.1", port=port, dealer=daddr, config=server.config, timeout=60,
                                 extra=server.card)).start()
    long_text, short = " ".join(["great"] * 100), "dull"  # 102 and 3 tokens with [CLS] and [SEP]
    try:
        capsys.readouterr()
        rc = main(["infer", "--server", f"127.0.0.1:{port}", "--dealer", daddr, "--max-length", "16",
                   "--json", str(tmp_path / "out.json"), long_text, short])
        out = capsys.readouterr().out
        assert rc == 0, out
        lines = out.splitlines()
        long_line = next(x for x in lines if long_text in x)
        assert "\t(truncated to 16 of 102 tokens) great great" in long_line
        assert next(x for x in lines if x.endswith(f"\t{short}")).count("truncated") == 0
        assert "note: 1 of 2 text(s) truncated to 16 tokens" in out and "--max-length (up to 64" in out
        rows = json.loads((tmp_path / "out.json").read_text())["results"]
        assert [(r["tokens"], r["tokens_used"], r["truncated"]) for r in rows] == [(102, 16, True), (3, 3, False)]
        with PrivateClient(f"127.0.0.1:{port}", daddr) as c:  # the default 128 is capped by the model's 64
            (r,) = c.classify([long_text])
            assert (r["tokens"], r["tokens_used"], r["truncated"]) == (102, 64, True)
    finally:
        dealer.stop()


@pytest.fixture
def model_service(tiny_bert_dir):
    """A dealer and a model server (3 concurrent sessions) as processes; yields their addresses."""
    with spawn_roles(tiny_bert_dir, "--guess", "constant", "--workers", "3", "--timeout", "20", timeout=60) as roles:
        yield roles.saddr, roles.daddr, roles.server


TEXTS = ["a gorgeous, witty, seductive movie.", "dull, lifeless and far too long.", "meh.",
         "the actors try hard, but the script gives them nothing to do", "brilliant", "an ugly, shrill mess"]


def _plaintext_logits(tiny_bert_dir, texts):
    from cometpi.data import minilm_path

    tok = transformers.BertTokenizerFast.from_pretrained(minilm_path())
    arch, params = from_hf(str(tiny_bert_dir))
    out = []
    for t in texts:
        enc = tok([t], return_tensors="pt")
        out.append(plaintext_forward(arch, params, enc["input_ids"], enc["attention_mask"],
                                     ApproxConfig(guess="constant"))[0])
    return out


def test_concurrent_and_sequential_clients_get_their_own_results(tiny_bert_dir, model_service):
    import threading
    import time

    from cometpi.service import PrivateClient

    saddr, daddr, server = model_service
    got: dict[int, list] = {}
    errors: list = []

    def client(i):
        try:
            with PrivateClient(saddr, daddr, timeout=120) as c:
                got[i] = c.classify([TEXTS[i]])[0]["logits"]
        except Exception as e:  # noqa: BLE001
            errors.append((i, e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]  # 5 clients, 3 served at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    concurrent_s = time.perf_counter() - t0
    client(5)  # and one more afterwards, alone
    assert not errors, errors
    want = _plaintext_logits(tiny_bert_dir, TEXTS)
    for i in range(6):  # each session computed its own client's text (isolated sessions)
        assert float((torch.tensor(got[i], dtype=torch.float64) - want[i]).abs().max()) < 40 * 1e-3, i
    assert server.poll() is None and concurrent_s < 180


def test_bad_queries_get_a_named_error_and_the_server_keeps_serving(tiny_bert_dir, model_service):
    from cometpi.service import PrivateClient
    from cometpi.transport import RemoteError

    saddr, daddr, server = model_service
    bad = [({"op": "infer", "batch": 1, "length": 10_000, "mask": None}, "length must be"),
           ({"op": "infer", "batch": 0, "length": 4, "mask": None}, "batch must be"),
           ({"op": "infer", "batch": 1, "length": 4, "mask": [[1, 1]]}, "attention mask must be"),
           ({"op": "infer", "batch": 1, "length": 2, "mask": [[0, 0]]}, "at least one real token"),
           ({"op": "infer", "batch": 1, "length": 2, "mask": "x"}, "malformed attention mask")]
    for query, named in bad:
        c = PrivateClient(saddr, daddr, timeout=30)
        try:
            c.sess.peer.send_json(query, "query")
            with pytest.raises(RemoteError, match=named):
                c.sess.peer.recv("anything")
        finally:
            c.sess.close()
    with PrivateClient(saddr, daddr, timeout=60) as c:
        with pytest.raises(ValueError, match="beyond the model's vocabulary|model's 64 positions"):
            c.classify(["x"], pad_to=1000)  # over-long: refused on the client before anything is sent
        long_text = " ".join(["great"] * 500)  # truncated to the model's positions, unknown words become [UNK]
        r = c.classify([long_text, "zxqv\u2603 \U0001f600 qwrtzp"], max_length=1000)
        assert len(r) == 2 and all(0 <= x["confidence"] <= 1 for x in r)
    assert server.poll() is None
