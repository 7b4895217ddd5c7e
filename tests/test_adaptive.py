"""The adaptive combination's p-values are valid because the classifier treats calibration part 2 and
the night's rows as one unlabelled set; the same classifier with part 2 labelled as reference is not."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.estimator_checks import check_estimator

from gradood.stats import DetectorSuite
from gradood.stats.adaptive import (
    AdaptiveCombination,
    AdaptiveNight,
    CalibrationTails,
    adaptive_p_values,
    training_mask,
    training_rate,
)
from gradood.stats.conformal import ConformalCalibrator

#: a flexible classifier (small leaves, many rounds) so that in-sample rows would stand out if they could
FLEXIBLE = {"max_iter": 30, "min_samples_leaf": 3, "learning_rate": 0.3}
N_REFERENCE, N_CALIBRATION, N_NULL, N_OOD, ALPHA = 60, 19, 40, 40, 0.1


def _draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    reference = rng.normal(size=(N_REFERENCE, 3))
    calibration = rng.normal(size=(N_CALIBRATION, 3))
    night = rng.normal(size=(N_NULL + N_OOD, 3))
    night[N_NULL:, 0] += 2.0  # the OOD rows: only the first test sees them
    return reference, calibration, night


def _naive_p_values(reference: np.ndarray, calibration: np.ndarray, night: np.ndarray) -> np.ndarray:
    """Part 2 labelled as reference: the night's rows are the only in-sample class-1 rows."""
    x = np.vstack([reference, calibration, night])
    y = np.r_[np.zeros(len(reference) + len(calibration), int), np.ones(len(night), int)]
    model = AdaptiveCombination(**FLEXIBLE).fit(x, y)
    return ConformalCalibrator(model.decision_function(calibration)).p_value(model.decision_function(night))


def test_in_distribution_rows_are_not_rejected_more_often_than_alpha_and_the_naive_split_is():
    rng = np.random.default_rng(0)
    symmetric, naive, power = [], [], []
    for _ in range(120):
        reference, calibration, night = _draw(rng)
        _, p, _ = adaptive_p_values(reference, calibration, night, **FLEXIBLE)
        symmetric.append(np.mean(p[:N_NULL] <= ALPHA))
        power.append(np.mean(p[N_NULL:] <= ALPHA))
        naive.append(np.mean(_naive_p_values(reference, calibration, night)[:N_NULL] <= ALPHA))
    # exchangeable part 2 and null night rows: P(p <= 0.1) <= floor(0.1 * 20) / 20 = 0.1 (ties only lower it)
    se = np.std(symmetric) / np.sqrt(len(symmetric))
    assert np.mean(symmetric) <= ALPHA + 3 * se
    assert np.mean(symmetric) >= ALPHA - 0.04  # valid, not vacuous
    assert np.mean(naive) > ALPHA + 0.1  # in-sample night rows look OOD
    assert np.mean(power) > 0.3  # and the learned statistic does find the shifted rows


def test_the_statistic_is_monotone_in_every_test_and_reproducible():
    rng = np.random.default_rng(1)
    reference, calibration, night = _draw(rng)
    stat, p, model = adaptive_p_values(reference, calibration, night)
    again, p_again, _ = adaptive_p_values(reference, calibration, night)
    np.testing.assert_array_equal(stat, again)
    np.testing.assert_array_equal(p, p_again)
    grid = np.linspace(-3, 5, 50)
    for k in range(3):
        probe = np.zeros((50, 3))
        probe[:, k] = grid
        assert np.all(np.diff(model.decision_function(probe)) >= -1e-12)


def test_a_nights_combined_test_is_valid_and_sees_what_one_test_sees():
    """Fisher over the fixed combination's tail and the classifier's: valid, and it finds rows that only a
    test outside the fixed combination sees."""
    rng = np.random.default_rng(3)
    ids = [f"cal-{i}" for i in range(N_CALIBRATION)]
    null_rate, fixed_power, night_power = [], [], []
    for _ in range(80):
        reference, calibration, night = _draw(rng)
        tails = CalibrationTails(["a", "b", "c"], reference, calibration, ids)
        # the fixed combination reads tests b and c; only test a sees the shifted rows
        test = AdaptiveNight(tails, [1, 2], **FLEXIBLE).fit(night, 1.0, seed=0)
        p = test.calibrator_.p_value(test.statistic(night))
        null_rate.append(np.mean(p[:N_NULL] <= ALPHA))
        night_power.append(np.mean(p[N_NULL:] <= ALPHA))
        fixed = 2 * calibration[:, 1:].sum(1), 2 * night[:, 1:].sum(1)
        fixed_power.append(np.mean(ConformalCalibrator(fixed[0]).p_value(fixed[1])[N_NULL:] <= ALPHA))
    assert np.mean(null_rate) <= ALPHA + 3 * np.std(null_rate) / np.sqrt(len(null_rate))
    assert np.mean(null_rate) >= ALPHA - 0.04
    assert np.mean(fixed_power) < ALPHA + 0.05  # the fixed combination is blind to test a
    assert np.mean(night_power) > 0.3


def test_training_rows_are_picked_by_row_id_with_one_rate():
    ids = [f"row-{i}" for i in range(4000)]
    mask = training_mask(7, ids, 0.25)
    assert abs(mask.mean() - 0.25) < 0.03
    np.testing.assert_array_equal(training_mask(7, ids[::-1], 0.25), mask[::-1])  # order-free
    assert training_mask(7, ids, 1.0).all() and not np.array_equal(training_mask(8, ids, 0.25), mask)
    assert training_rate(100, 400) == 0.25 and training_rate(100, 50) == 1.0
    with pytest.raises(ValueError, match="reference"):
        AdaptiveCombination().fit(np.zeros((10, 2)), np.zeros(10, int))


def test_an_adaptive_suite_needs_its_night_and_round_trips():
    rng = np.random.default_rng(4)
    x = pd.DataFrame(rng.normal(size=(300, 5)), columns=["a", "b", "c", "d", "log_prob"])
    suite = DetectorSuite(combination="adaptive").fit(x)
    with pytest.raises(ValueError, match="night"):
        suite.score_all(x)
    # ranking by a single test needs no night: the same scores, no combination
    single = suite.score_all(x, combined=False)
    assert "combined" not in single and "driver" not in single
    paper = DetectorSuite(combination="fisher").fit(x).score_all(x)["paper"]
    np.testing.assert_array_equal(single["paper"]["p_index"], paper["p_index"])
    night = suite.adapt_to_night(suite.tails(x.to_numpy()[:50]), 1.0, seed=0)
    with pytest.raises(ValueError, match="fisher"):
        DetectorSuite().fit(x).score_all(x, night)
    loaded = DetectorSuite.from_dict(json.loads(json.dumps(suite.to_dict())))
    again = loaded.adapt_to_night(loaded.tails(x.to_numpy()[:50]), 1.0, seed=0)
    a, b = suite.score_all(x, night), loaded.score_all(x, again)
    np.testing.assert_array_equal(a["combined"]["p_index"], b["combined"]["p_index"])
    np.testing.assert_array_equal(a["driver"], b["driver"])
    assert night.training_rows_ == {
        "reference": suite.n_calibration_[0],
        "part_2": suite.n_calibration_[1],
        "night": 50,
    }


def test_scikit_learn_estimator_checks():
    expected = {
        "check_classifiers_train": "monotone increasing in every input by design; the check's blobs need a "
        "decreasing feature",
        "check_array_api_input": "float64 numpy only",
    }
    results = check_estimator(AdaptiveCombination(), on_fail=None, expected_failed_checks=expected)
    assert len(results) > 40
    assert {r["check_name"] for r in results if r["status"] == "failed"} == set()
    assert {r["check_name"] for r in results if r["status"] in ("xfail", "skipped")} <= set(expected)
