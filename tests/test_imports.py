"""Worker start-up cost: each Ray worker imports only what its stage needs (a second of scipy and
scikit-learn in every extraction actor, or of torch in every scoring actor, adds up on every night)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gradood.stats
from gradood.stats.suite import DetectorSuite

REPO = Path(__file__).resolve().parent.parent


def loaded_after_import(module: str, candidates: list[str]) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {candidates!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_extraction_workers_do_not_import_scipy_or_sklearn():
    assert loaded_after_import("gradood.pipeline.stages", ["torch", "scipy", "sklearn"]) == ["torch"]


def test_scoring_workers_do_not_import_torch():
    assert loaded_after_import("gradood.pipeline.scoring", ["torch", "sklearn"]) == ["sklearn"]


def test_stats_names_load_on_first_use():
    assert loaded_after_import("gradood.stats", ["scipy", "sklearn"]) == []
    values = {name: getattr(gradood.stats, name) for name in gradood.stats.__all__}  # every name resolves
    assert values["DetectorSuite"] is DetectorSuite and values["LOG_PROB_COLUMN"] == "log_prob"
    assert set(gradood.stats.__all__) <= set(dir(gradood.stats))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gradood.stats.nothing  # noqa: B018


def test_reading_the_config_loads_no_statistics_torch_or_ray():
    # the jobs read and check their config (and answer --help) before any heavy import
    assert loaded_after_import("gradood.config", ["scipy", "sklearn", "torch", "ray"]) == []
