"""Benchmarks run end to end (small shapes) and write the documented JSON fields."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "cometpi", "bench", *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_bench_ops_writes_measured_and_documented_costs(tmp_path):
    out = tmp_path / "ops.jsonl"
    run("ops", "--ops", "mul", "matmul_private", "--transport", "inproc", "--reps", "1", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = [r for r in rows if "bytes_online" in r]
    assert {r["op"] for r in ops} == {"mul", "matmul_private"}
    for r in ops:
        assert r["bytes_online"] == r["bytes_online_theory"] and r["rounds"] == r["rounds_theory"]
        for key in ("params", "shape", "bytes_offline", "seconds", "git_sha", "config_hash", "projected_seconds"):
            assert key in r
    assert any(r["op"] == "ring_matmul" for r in rows)
    assert (tmp_path / "ops.md").exists()


def test_bench_nonlinear_quick(tmp_path):
    out = tmp_path / "nl.jsonl"
    run("nonlinear", "--quick", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rsqrt = [r for r in rows if r["op"] == "rsqrt" and "unusable" not in r]
    # target 1e-3, plus one ulp (2^-16) relative to the smallest output counted (|ref| >= 0.01): at the
    # top of the row-sum domain (2^14) rsqrt is 0.0078, only 512 ulp, and 40 Newton steps of floors add up
    assert rsqrt and all(r["max_rel_err"] <= 1e-3 + 2.0**-16 / 0.01 for r in rsqrt)
    assert any(r["method"] == "thermometer" and r["iterations"] == 2 and r["sigma"] is None
               for r in rsqrt)  # 2 Newton steps from 4 thresholds per octave
    assert any(r["sigma"] == 40 for r in rsqrt)
    assert any(r["method"] == "insecure_comet_small_flood" for r in rsqrt)
    assert {r["op"] for r in rows} >= {"rsqrt", "gelu", "softmax", "layernorm", "rsqrt_error_vs_iterations"}
    for name in ("nonlinear_error_vs_iterations.png", "smu_vs_gelu.png", "nl.md"):
        assert (tmp_path / name).stat().st_size > 1000 or name.endswith(".md")


@pytest.mark.slow
def test_bench_model_quick(tmp_path):
    """Three processes, BERT-base with 1 and 2 layers at seq 8 (about 1.5 minutes): make test-slow."""
    out = tmp_path / "model.jsonl"
    run("model", "--quick", "--out", str(out), timeout=900)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    one, two = row["measured"]["1"], row["measured"]["2"]
    assert row["bytes_online"] == one["bytes_online"] + 11 * (two["bytes_online"] - one["bytes_online"])
    assert set(row["by_layer_type"]) >= {"embedding", "linear", "softmax", "gelu", "layernorm", "head"}
    assert row["seconds_dealer_prefetched"] > 0 and (tmp_path / "model_bytes_by_layer_type.png").exists()
