"""The model service end to end: dealer, model server and client as three OS processes over loopback,
from text to label, plus the Python API in one process."""

import json
import subprocess
import sys

import pytest
import torch

from cometpi.convert import from_hf
from cometpi.nn import ApproxConfig, plaintext_forward
from cometpi.serve import spawn, stop

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
    dealer, daddr = spawn(["dealer", "--port", "0"])
    server = None
    try:
        server, saddr = spawn(["serve", "--model", str(tiny_bert_dir), "--port", "0", "--dealer", daddr,
                               "--once", "--guess", "constant"], timeout=60)
        r = subprocess.run([sys.executable, "-m", "cometpi", "infer", "--server", saddr, "--dealer", daddr,
                            "--json", str(tmp_path / "out.json"), *texts],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        server.wait(30)
    finally:
        if server is not None:
            stop(server)
        stop(dealer)
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
