"""The feature benchmark runs end to end and writes the records the README's tables are built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_feature_benchmark_writes_complete_records(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "feature_throughput.py"),
        "--models", "vae",
        "--configs", "default",
        "--methods", "engine", "loop",
        "--batch-size", "4",
        "--repeats", "1",
        "--check-rows", "2",
        "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"plain", "engine", "loop"}
    for r in records.values():
        assert {"model", "config", "device", "batch_size", "method", "ratio_vs_plain"} <= set(r)
        assert r["model"] == "vae" and r["batch_size"] == 4 and r["device"] == "cpu"
        assert r["ratio_vs_plain"] > 0 and r["peak_mem_ratio_vs_plain"] > 0
    assert records["plain"]["ratio_vs_plain"] == 1.0
    for method in ("engine", "loop"):
        assert records[method]["max_rel_err"] <= 1e-4
        assert records[method]["max_rel_err_f64"] <= 1e-10
    assert records["engine"]["speedup_vs_loop"] > 0
