"""The feature benchmark runs end to end and writes the records docs/results.md's tables are built from."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs the benchmark script in its own process

REPO = Path(__file__).resolve().parents[1]


def _run_benchmark(tmp_path: Path, *methods: str) -> dict[str, dict]:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "feature_throughput.py"),
        "--models", "vae",
        "--configs", "default",
        "--methods", *methods,
        "--batch-size", "4",
        "--repeats", "1",
        "--check-rows", "2",
        "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    return {r["method"]: r for r in json.loads(out.read_text())}


def test_feature_benchmark_writes_complete_records(tmp_path):
    records = _run_benchmark(tmp_path, "engine", "loop")
    assert set(records) == {"plain", "engine", "loop"}
    plain = records["plain"]
    for r in records.values():
        assert {"model", "config", "device", "batch_size", "method", "ratio_vs_plain"} <= set(r)
        assert r["model"] == "vae" and r["batch_size"] == 4 and r["device"] == "cpu"
        _assert_ratios_are_measured(r, plain)
    assert plain["ratio_vs_plain"] == 1.0
    for method in ("engine", "loop"):
        assert records[method]["max_rel_err"] <= 1e-4
        assert records[method]["max_rel_err_f64"] <= 1e-10
    speedup = records["loop"]["time_s"] / records["engine"]["time_s"]
    assert records["engine"]["speedup_vs_loop"] == pytest.approx(speedup, rel=1e-9)


def _assert_ratios_are_measured(record: dict, plain: dict) -> None:
    """Every ratio is the quotient of the measurements stored beside it, in the same run."""
    assert record["time_s"] == statistics.median(record["times_s"]) and record["time_s"] > 0
    assert record["ratio_vs_plain"] == pytest.approx(record["time_s"] / plain["time_s"], rel=1e-9)
    assert record["rows_per_s"] == pytest.approx(record["batch_size"] / record["time_s"], rel=1e-9)
    mem_ratio = record["peak_mem_bytes"] / plain["peak_mem_bytes"]
    assert record["peak_mem_ratio_vs_plain"] == pytest.approx(mem_ratio, rel=1e-9)


def test_third_party_methods_are_timed_or_refused_with_the_reason(tmp_path):
    """Opacus handles the VAE exactly; BackPACK silently skips its GroupNorm parameters, which the
    benchmark must turn into a refusal naming them rather than time a partial answer.

    Both libraries come with the extra 'bench', which the setup script installs: a missing one fails here.
    """
    import backpack  # noqa: F401
    import opacus  # noqa: F401

    records = _run_benchmark(tmp_path, "opacus", "backpack")
    assert records["opacus"]["max_rel_err"] <= 1e-4
    _assert_ratios_are_measured(records["opacus"], records["plain"])
    assert "error" not in records["opacus"]
    assert "encoder.net.0.1.weight" in records["backpack"]["error"]
    assert "ratio_vs_plain" not in records["backpack"]
