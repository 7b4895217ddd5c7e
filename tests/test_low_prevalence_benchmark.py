"""The low-prevalence benchmark's night statistics: the excess probability of its selection rule is
valid for exchangeable rows and sees an extreme source, and the cross-fitted classifier does not depend on
the order of the union (so part 2 and the night are treated alike)."""

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


def _null_log_p(benchmark, trials: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array(
        [benchmark.union_excess_log_p(rng.normal(size=300), rng.normal(size=700)) for _ in range(trials)]
    )


def _assert_super_uniform(log_p: np.ndarray, alphas: tuple[float, ...]) -> None:
    for alpha in alphas:
        share = float(np.mean(log_p <= np.log(alpha)))
        assert share <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / log_p.size), (alpha, share)


def test_union_excess_is_a_valid_probability_for_exchangeable_rows(benchmark):
    _assert_super_uniform(_null_log_p(benchmark, 2000, 0), (0.05, 0.2))


def test_one_depth_is_exact_for_exchangeable_rows(benchmark, monkeypatch):
    # one depth, no Bonferroni slack: the count beyond the reference's largest row is negative-
    # hypergeometric, so the probability is close to uniform (an off-by-one in the tail would not be)
    monkeypatch.setattr(benchmark, "EXCESS_DEPTHS", (1,))
    log_p = _null_log_p(benchmark, 2000, 1)
    _assert_super_uniform(log_p, (0.2, 0.5))
    assert np.mean(log_p <= np.log(0.5)) > 0.4  # not conservative to the point of never firing


def test_union_excess_sees_a_few_extreme_rows(benchmark):
    rng = np.random.default_rng(1)
    reference, union = rng.normal(size=3000), rng.normal(size=7000)
    assert benchmark.union_excess_log_p(reference, union) > np.log(0.05)
    union[:20] = 10.0  # 20 rows beyond every reference row: a 0.3 % source at the far end of one tail
    # about 1e-3 (measured 7e-4): a reference of 3,000 rows cannot make 20 rows among 7,000 surer
    assert benchmark.union_excess_log_p(reference, union) < np.log(0.01)


def test_crossfit_scores_do_not_depend_on_the_union_order(benchmark):
    rng = np.random.default_rng(2)
    part_1, union = rng.normal(size=(400, 3)), rng.normal(size=(600, 3))
    union[:10] += 4.0
    scores = benchmark.crossfit(part_1, union, seed=0)(union)
    order = rng.permutation(len(union))
    shuffled = benchmark.crossfit(part_1, union[order], seed=0)(union[order])
    np.testing.assert_allclose(shuffled, scores[order], rtol=0, atol=1e-12)
    assert scores[:10].mean() > np.quantile(scores[10:], 0.9)  # the shifted rows stand out of sample
