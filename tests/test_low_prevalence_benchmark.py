"""The low-prevalence benchmark's night-selection rule: its excess probability is valid for exchangeable
rows and sees an extreme source, so the rule only depends on what it should."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "benchmarks"))
        yield importlib.import_module("low_prevalence")


def test_union_excess_is_a_valid_probability_for_exchangeable_rows(benchmark):
    rng = np.random.default_rng(0)
    trials, alphas = 2000, (0.05, 0.2)
    log_p = np.array(
        [benchmark.union_excess_log_p(rng.normal(size=300), rng.normal(size=700)) for _ in range(trials)]
    )
    for alpha in alphas:
        share = float(np.mean(log_p <= np.log(alpha)))
        assert share <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials), (alpha, share)
    # not vacuous: the Bonferroni bound over three depths is used, not a probability stuck at 1
    assert np.mean(log_p <= np.log(0.2)) > 0.05


def test_union_excess_sees_a_few_extreme_rows(benchmark):
    rng = np.random.default_rng(1)
    reference, union = rng.normal(size=3000), rng.normal(size=7000)
    assert benchmark.union_excess_log_p(reference, union) > np.log(0.05)
    union[:20] = 10.0  # 20 rows beyond every reference row: a 0.3 % source at the far end of one tail
    # about 1e-3 (measured 7e-4): a reference of 3,000 rows cannot make 20 rows among 7,000 surer
    assert benchmark.union_excess_log_p(reference, union) < np.log(0.01)
