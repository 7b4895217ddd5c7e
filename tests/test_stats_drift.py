import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from gradood.stats.drift import RankSumDrift, drift_test


def test_drift_test_matches_scipy_and_effect_size():
    rng = np.random.default_rng(0)
    cal, night = rng.normal(size=300), rng.normal(0.3, 1.0, size=200)
    out = drift_test(night, cal)
    ref = mannwhitneyu(night, cal, alternative="greater", method="asymptotic")
    assert out["p_value"] == ref.pvalue and out["statistic"] == ref.statistic
    pairs = (night[:, None] > cal[None, :]).mean() + 0.5 * (night[:, None] == cal[None, :]).mean()
    assert abs(out["effect"] - pairs) < 1e-12 and out["effect"] > 0.55
    assert out["p_value"] < 1e-3 and out["n_night"] == 200 and out["n_calibration"] == 300


def test_drift_p_value_is_uniform_without_shift_and_small_with_one():
    rng = np.random.default_rng(1)
    p = np.array([drift_test(rng.normal(size=100), rng.normal(size=200))["p_value"] for _ in range(2000)])
    for alpha in (0.01, 0.05, 0.1):
        assert abs(np.mean(p <= alpha) - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / 2000)
    shifted = [drift_test(rng.normal(0.5, 1, size=100), rng.normal(size=200))["p_value"] for _ in range(200)]
    assert np.mean(np.array(shifted) <= 0.05) > 0.9


def test_empty_night_has_no_p_value():
    out = drift_test(np.zeros(0), np.ones(5))
    assert out["p_value"] is None and out["n_night"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_from_sorted_blocks_equals_the_whole_night(seed):
    """Parts of a sorted night, cut anywhere (inside runs of ties too), merge to scipy's tie-corrected
    test."""
    rng = np.random.default_rng(seed)
    calibration = np.round(rng.normal(size=300), 1)  # ties inside the calibration sample
    night = np.concatenate(
        [np.round(rng.normal(0.3, 1, size=500), 1), np.full(40, 7.77), np.full(3, calibration[0])]
    )  # ties with calibration values, and a long run of night-only ties (duplicate images)
    whole = drift_test(night, calibration)
    drift = RankSumDrift(calibration)
    ordered = np.sort(night)[::-1]
    for cuts in ([], [1, 2, 3, 20, 21, 541], sorted(rng.choice(np.arange(1, night.size), 30, replace=False))):
        parts = [drift.part(block) for block in np.split(ordered, cuts)]
        merged = drift.result(parts)
        assert merged["statistic"] == whole["statistic"]
        np.testing.assert_allclose(merged["p_value"], whole["p_value"], rtol=1e-10)
        assert merged["n_night"] == night.size
    assert drift.result([])["p_value"] is None
    with pytest.raises(ValueError, match="sorted"):
        drift.part(np.array([1.0, 3.0, 2.0]))
