"""benchmarks/gpu_check.sh runs its steps on the CPU in dry mode (the GPU run is the same script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradood.pipeline.stages import extraction_device

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_both_records(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = json.loads((tmp_path / "features_cuda.json").read_text())
    assert {r["method"] for r in records} == {"plain", "engine", "loop", "vmap"}
    assert all(r["device"] == "cpu" and r["model"] == "vae" for r in records)
    summary = json.loads((tmp_path / "job_summary.json").read_text())
    assert summary["inputs"] == 22 and summary["scored"] == 20 and summary["run_id"] == "gpu-check"


def test_cpu_workers_never_touch_cuda(monkeypatch):
    def fail():
        raise AssertionError("a CPU worker asked for CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", fail)
    assert extraction_device(False) == torch.device("cpu")


def test_gpu_worker_without_cuda_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        extraction_device(True)
