"""Costs and results, below everything that reports them (evaluate, the demo, the benchmarks): the
per-layer-type breakdown of a meter report, the commit a figure was measured at, and result files
written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

LAYER_TYPES = {"embedding": "embedding", "ln": "layernorm", "softmax": "softmax", "gelu": "gelu",
               "matmul_private": "linear", "matmul": "attention matmul", "head": "head", "rotary": "rotary",
               "gate": "swiglu gate"}


def breakdown(spans: dict) -> dict[str, dict]:
    """Online/offline traffic and seconds per layer type from a meter report's spans."""
    out: dict[str, dict] = {}
    for path, rec in spans.items():
        parts = path.split("/")
        first = next((p for p in parts if p in LAYER_TYPES), None)
        if first is None or parts[-1] != first or parts.index(first) != len(parts) - 1:
            continue
        t = out.setdefault(LAYER_TYPES[first], {"online_bytes": 0, "offline_bytes": 0, "rounds": 0, "seconds": 0.0})
        t["online_bytes"] += rec["online"]["bytes_sent"] + rec["online"]["bytes_recv"]
        t["offline_bytes"] += rec["offline"]["bytes_sent"] + rec["offline"]["bytes_recv"]
        t["rounds"] += rec["online"]["rounds"]
        t["seconds"] += rec["seconds"]
    return out


def git_sha() -> str:
    """Short HEAD sha, with ``+dirty`` when tracked files have uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(out: Path, rows: list[dict], md: str) -> None:
    """The rows as JSON lines at ``out`` and the markdown table beside it (.md), each written atomically."""
    atomic_write(out, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md + "\n"))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder and rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))
