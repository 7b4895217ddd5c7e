import numpy as np
from scipy.stats import mannwhitneyu

from gradood.stats.drift import drift_test


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
