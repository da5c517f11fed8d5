"""Fine-tuning and evaluation on a tiny BERT with the real bert-base-uncased vocabulary: checkpoints
round-trip through Hugging Face, a trained per-channel SMU mu reaches the secure path, and the
private evaluation (three processes) agrees with the plaintext simulation."""

import json
from pathlib import Path

import pytest
import torch

from cometpi import checkpoint
from cometpi.convert import from_hf, to_hf_state_dict
from cometpi.evaluate import evaluate, private_subset
from cometpi.finetune import FinetuneConfig, batches, finetune, load_dataset, variant_config
from cometpi.nn import ApproxConfig, plaintext_forward
from cometpi.service import ModelServer

from .test_convert import _inputs, _tiny
from .test_nn import TOL, secure

transformers = pytest.importorskip("transformers")

GOOD = ["a gorgeous, witty film", "warm and funny", "a delight from start to finish", "smart, moving, brilliant",
        "beautifully acted and wise", "the best comedy of the year", "tender and true", "great fun"]
BAD = ["dull and lifeless", "a tedious mess", "far too long and boring", "clumsy, shrill and stupid",
       "an ugly waste of time", "the worst film of the year", "flat and lazy", "painfully bad"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel._from_config(cfg, attn_implementation="eager")
    path = tmp_path_factory.mktemp("base") / "tiny"
    model.save_pretrained(path)
    from cometpi.data import minilm_path

    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    rows = [{"review": t, "stars": "good"} for t in GOOD * 5] + [{"review": t, "stars": "bad"} for t in BAD * 5]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(tiny_dir, table, out, **kw):
    train, dev, _, labels, name = load_dataset(table, "review", "stars")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    cfg = FinetuneConfig(**{"epochs": 10, "batch_size": 8, "lr": 3e-3, "freeze_embeddings": False, **kw})
    return finetune(cfg, train, dev, str(out), base=tiny_dir, labels=labels, tokenizer=tok, data_name=name,
                    log=lambda *_: None)


@pytest.fixture(scope="module")
def trained(tiny_dir, table, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    exact = _train(tiny_dir, table, root / "exact", variant="exact")
    comet = _train(tiny_dir, table, root / "comet", variant="comet", kd=True, teacher=str(root / "exact"))
    return root, exact, comet


def test_hf_state_dict_round_trip():
    model = _tiny("BertForSequenceClassification", seed=2)
    arch, params = from_hf(model)
    sd = to_hf_state_dict(arch, params)
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert sd.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(sd[k], v.float()), k


def test_labels_and_batches(table):
    train, dev, test, labels, _ = load_dataset(table, "review", "stars")
    assert labels == ["bad", "good"] and (len(train), len(dev), len(test)) == (64, 8, 8)
    lengths = [len(t) for t, _ in train]
    b = batches(lengths, 8, seed=0, epoch=0)
    assert sorted(i for x in b for i in x) == list(range(64))  # every row once
    assert b != batches(lengths, 8, seed=0, epoch=1) and b == batches(lengths, 8, seed=0, epoch=0)
    one = Path(table).with_name("one.csv")
    one.write_text("text,label\na,1\nb,1\n")
    with pytest.raises(ValueError, match="distinct label"):
        load_dataset(str(one))


def test_finetune_writes_hf_checkpoints_that_learn(trained):
    root, exact, comet = trained
    for meta in (exact, comet):
        assert meta["loss_last_tenth"] < meta["loss_first_tenth"]  # it learns the separable toy task
    assert exact["dev_accuracy"] == 1.0
    # an HF checkpoint: transformers loads it and agrees with cometpi's exact float path
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(root / "exact", attn_implementation="eager")
    assert hf.config.id2label == {0: "bad", 1: "good"}
    arch, params, meta = checkpoint.load(root / "exact")
    ids, mask = _inputs("bert", "right", seed=1)
    ours = plaintext_forward(arch, params, ids, mask, ApproxConfig.exact())
    with torch.no_grad():
        theirs = hf.double()(input_ids=ids, attention_mask=mask).logits
    assert float((ours - theirs).abs().max()) < 1e-9
    # Comet: a trained per-channel mu in the sidecar, the SMU domain starting at its smallest square
    arch, params, meta = checkpoint.load(root / "comet")
    mu = torch.cat([params[f"layers.{i}.ffn.smu_mu"] for i in range(arch.layers)])
    assert not torch.allclose(mu, torch.full_like(mu, 0.363))  # it was trained
    approx = checkpoint.approx_of(meta)
    # SMU by segments folds mu into the weights: nothing of mu is public (no smu_lo in the card)
    assert approx.smu_mu == "per-channel" and approx.smu_form == "segments" and approx.smu_lo is None
    assert meta["kd"] and meta["teacher"] == "exact"
    server = ModelServer(str(root / "comet"))
    assert server.approx == approx and server.card["approx"]["smu_mu"] == "per-channel"
    assert server.card["approx"]["smu_lo"] is None
    # SMU by rsqrt (Comet's own) needs its domain's lower end: the server derives it from mu (then public)
    rsqrt = ModelServer(str(root / "comet"), {"smu_form": "rsqrt", "relu": "smooth"}).approx
    assert rsqrt.smu_lo == pytest.approx(float(mu.min()) ** 2 * 0.999, rel=1e-6)
    assert ModelServer(str(root / "comet"), {"guess": "constant"}).approx.guess == "constant"
    with pytest.raises(ValueError, match="trained per-channel SMU mu"):
        ModelServer(str(root / "exact"), {"gelu": "smu", "softmax": "relu", "smu_mu": "per-channel", "smu_lo": 0.01})
    assert ModelServer(str(root / "exact")).approx.is_original  # an exact model: the original functions


def test_per_channel_mu_private_matches_plaintext():
    arch, params = from_hf(_tiny("BertForSequenceClassification", seed=7))
    g = torch.Generator().manual_seed(0)
    for i in range(arch.layers):
        params[f"layers.{i}.ffn.smu_mu"] = 0.2 + torch.rand(arch.ffn, generator=g, dtype=torch.float64)
    cfg = variant_config("comet", smu_lo=0.2**2 * 0.999)
    ids, mask = _inputs("bert", "right", seed=8)
    approx = plaintext_forward(arch, params, ids, mask, cfg)
    from cometpi.nn import FloatModel, forward, prepare_params

    ideal = forward(FloatModel(prepare_params(arch, params, cfg), ideal=True), arch, cfg, batch=ids.shape[0],
                    length=ids.shape[1], input_ids=ids, attention_mask=mask)
    assert float((approx - ideal).abs().max()) < 0.05  # Newton's 1e-3 and CrypTen's tanh vs exact
    out, _ = secure(arch, params, ids, mask, cfg)
    assert float((out - approx).abs().max()) < TOL
    # the same model without mu (scalar default) gives other logits: the private mu is used
    scalar = plaintext_forward(arch, params, ids, mask, ApproxConfig())
    assert float((scalar - approx).abs().max()) > 10 * TOL


def test_eval_private_agrees_and_resumes(trained, table, tmp_path):
    root, _, _ = trained
    rec = tmp_path / "rec.jsonl"
    kw = dict(data=table, text_col="review", label_col="stars", private=4, batch=2, records=str(rec),
              approx_overrides={"guess": "constant"}, log=lambda *_: None)
    res = evaluate(str(root / "comet"), **kw)
    p = res["private"]
    assert p["n"] == 4 and p["agreement_with_simulated"] == 1.0
    assert p["online_bytes_per_example"] > 0 and p["rounds_per_batch"] > 0
    assert set(res["plaintext"]) == {"exact", "trained", "simulated"}
    lines = rec.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["n"] == 4
    assert {json.loads(x)["i"] for x in lines[1:]} == set(private_subset(8, 4, 0))
    again = evaluate(str(root / "comet"), **kw)  # resumed: nothing left to run, same records
    assert again["private"] == res["private"] and rec.read_text().splitlines() == lines
    with pytest.raises(ValueError, match="another model"):
        evaluate(str(root / "comet"), **{**kw, "approx_overrides": {}})
    # the results file, its table and plot
    from cometpi.bench.accuracy import report
    from cometpi.evaluate import save_result

    out = tmp_path / "accuracy.json"
    save_result(res, out)
    save_result({**res, "plaintext": {**res["plaintext"], "exact": 0.5}}, out)  # upsert by name: one row
    report(out)
    assert len(json.loads(out.read_text())) == 1
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 3 and "100.00%" in table and "| 50.00 |" in table
    assert f"| {res['epochs']:g} ep, " in table  # the recipe's epochs and the measured training time
    assert (tmp_path / "accuracy_vs_online_bytes.png").stat().st_size > 1000
    plain = tmp_path / "plain" / "accuracy.json"  # no private run yet: a table, and an empty plot
    plain.parent.mkdir()
    save_result({**res, "private": None}, plain)
    report(plain)
    assert "| - | - | - |" in plain.with_suffix(".md").read_text()


def test_demo_classifies_with_three_processes(trained):
    import subprocess
    import sys

    root, _, _ = trained
    r = subprocess.run([sys.executable, "-m", "cometpi", "demo", "--model", str(root / "comet"), "--guess", "constant",
                        "warm and funny", "a tedious mess"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("private:") == 2 and out.count("plaintext:") == 2 and "rounds" in out and "online" in out
    for line in out.splitlines():  # the private label is the plaintext model's
        if "private:" in line:
            assert line.split()[1] == line.split("plaintext:")[1].split()[0]
    assert "dealer and server stopped" in out
    # quiet: the dealer's and the server's JSON session lines go to the log file it names, not the terminal
    assert '"event"' not in r.stdout + r.stderr
    log = out.split("the dealer's and the server's logs: ")[1].split(" (--verbose")[0]
    assert '"event": "session"' in open(log).read()


def test_teacher_must_be_an_existing_exact_checkpoint(trained, tiny_dir, table, tmp_path, capsys):
    """Issue 15: a mistyped --teacher failed with Hugging Face's 'Repo id must be in the form ...', and a
    checkpoint fine-tuned for Comet's replacements was accepted as the KD teacher."""
    from cometpi.cli import main

    root, _, _ = trained
    typo = tmp_path / "runs" / "exatc"
    assert main(["finetune", "--kd", "--teacher", str(typo), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint exists at {typo}" in err and "Repo id" not in err
    from cometpi.finetune import check_teacher

    with pytest.raises(ValueError, match="no config.json"):
        check_teacher(str(tmp_path))
    assert main(["finetune", "--kd", "--teacher", str(root / "comet"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "the KD teacher must be the exact model" in err and "gelu=smu softmax=relu" in err
    with pytest.raises(ValueError, match="KD teacher must be the exact model"):  # the Python API too
        _train(tiny_dir, table, tmp_path / "y", variant="mpcformer", kd=True, teacher=str(root / "comet"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    check_teacher(str(root / "exact"))  # the documented teacher passes


def test_eval_reuses_or_skips_the_plaintext_run(trained, table, tmp_path, capsys, monkeypatch):
    """Issue 15: ``eval --private N`` re-ran the plaintext accuracies on the whole test split every time.
    They are cached by model hash, approximations, tokenized test split, max length and code, and reused
    (said so); ``--skip-plaintext`` simulates only the private rows."""
    from cometpi import evaluate as E
    from cometpi.cli import main

    root, _, _ = trained
    cache = tmp_path / "plain.json"
    logs: list[str] = []
    kw = dict(data=table, text_col="review", label_col="stars", approx_overrides={"guess": "constant"},
              log=logs.append)
    first = evaluate(str(root / "comet"), plaintext_cache=cache, **kw)
    assert set(first["plaintext"]) == {"exact", "trained", "simulated"} and "plaintext_reused_from" not in first
    (entry,) = json.loads(cache.read_text())
    assert entry["key"]["max_length"] == 64 and entry["key"]["split"] == "test" and len(entry["simulated_pred"]) == 8

    def boom(*a, **k):
        raise AssertionError("the plaintext run was repeated")

    monkeypatch.setattr(E, "plaintext", boom)
    args = ["eval", "--model", str(root / "comet"), "--data", table, "--text-col", "review", "--label-col", "stars",
            "--guess", "constant", "--plaintext-cache", str(cache)]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"reusing the plaintext accuracies in {cache}" in out
    assert f"simulated {first['plaintext']['simulated']:.4f}" in out
    with pytest.raises(AssertionError, match="repeated"):  # another max length is another key
        evaluate(str(root / "comet"), plaintext_cache=cache, max_length=16, **kw)
    # --skip-plaintext: no cache, only the private rows simulated; the private run still agrees
    res = evaluate(str(root / "comet"), private=2, batch=2, records=str(tmp_path / "rec.jsonl"), skip_plaintext=True,
                   **kw)
    assert res["plaintext"] == {} and res["plaintext_skipped"] and any("--skip-plaintext" in x for x in logs)
    assert res["private"]["n"] == 2 and res["private"]["agreement_with_simulated"] == 1.0
    with pytest.raises(ValueError, match="nothing to evaluate without --private"):
        evaluate(str(root / "comet"), skip_plaintext=True, **kw)
    assert main([*args, "--private", "2", "--skip-plaintext", "--out", str(tmp_path / "acc.json")]) == 2
    assert "--skip-plaintext writes no plaintext accuracies" in capsys.readouterr().err


def test_variant_configs_name_their_smu_and_relu():
    """comet trains what the private path computes (SMU by segments, the exact ReLU; no public smu_lo);
    comet-rsqrt trains Comet's own constructions (its rsqrt domain needs smu_lo)."""
    new, old = variant_config("comet"), variant_config("comet-rsqrt")
    assert (new.smu_form, new.relu, new.smu_lo) == ("segments", "narrow", None)
    assert (old.smu_form, old.relu) == ("rsqrt", "smooth") and old.smu_lo > 0
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config("comet-typo")
