"""Conformal p-values against their definition, their exact validity, q-values against scipy, FDR control,
and the combined test's validity as a p-value."""

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from gradood.stats import (
    CombinedTest,
    ConformalCalibrator,
    DetectorSuite,
    FdrMethod,
    Moments,
    conformal_p_values,
    fdr_flags,
    q_values_from_index,
)
from gradood.stats.conformal import EqualTailedCalibrator, prevalence_floor, storey_pi0


def test_equal_tailed_p_values_follow_the_definition_with_ties():
    rng = np.random.default_rng(10)
    cal, scores = rng.integers(0, 20, 300).astype(float), rng.integers(-2, 23, 500).astype(float)
    high = np.array([(1 + np.sum(cal >= s)) / 301 for s in scores])
    low = np.array([(1 + np.sum(cal <= s)) / 301 for s in scores])
    expected = np.minimum(1.0, 2 * np.minimum(high, low))
    calibrator = EqualTailedCalibrator(cal)
    np.testing.assert_allclose(calibrator.p_value(scores), expected, rtol=0, atol=1e-15)
    # the index keeps p = k / (n + 1), so the run's histogram of k still gives BH
    np.testing.assert_allclose(calibrator.p_index(scores) / 301, expected, rtol=0, atol=1e-15)
    assert calibrator.min_p_value == 2 / 301
    assert ConformalCalibrator.from_dict(calibrator.to_dict()).p_value(scores).tolist() == expected.tolist()


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_equal_tailed_p_values_are_valid_on_a_skewed_null_and_see_both_tails(alpha):
    """On a skewed null (log-likelihoods have a long low tail) the equal-tailed p-value rejects at most
    alpha; a row far below every calibration score gets p = 2 / (n + 1), where one tail would give 1."""
    rng = np.random.default_rng(11)
    n, reps = 39, 6_000
    cal = -rng.gamma(1.5, size=(reps, n))
    test = -rng.gamma(1.5, size=reps)
    p = np.array([EqualTailedCalibrator(c).p_value([s])[0] for c, s in zip(cal, test, strict=True)])
    rate = np.mean(p <= alpha)
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / reps)
    assert rate >= alpha - 0.05 - 3 * np.sqrt(alpha / reps)  # not vacuous: close to alpha from below
    calibrator = EqualTailedCalibrator(cal[0])
    far = np.array([cal[0].min() - 10.0, cal[0].max() + 10.0])
    np.testing.assert_array_equal(calibrator.p_value(far), [2 / (n + 1), 2 / (n + 1)])
    assert ConformalCalibrator(cal[0]).p_value(far[:1])[0] == 1.0  # one tail misses the low row
    # the smooth tail falls on both sides, below log(2 / (n + 1)) beyond the calibration range
    smooth_log_p = calibrator.smooth_log_p(far)
    assert (smooth_log_p < np.log(2 / (n + 1))).all()
    sides = calibrator.side_smooth_log_p(far)
    assert sides[0, 1] < sides[0, 0] and sides[1, 0] < sides[1, 1]


def test_storey_q_values_are_bh_at_q_over_pi0_and_pi0_follows_its_definition():
    rng = np.random.default_rng(12)
    n_cal = 200
    k = np.concatenate([rng.integers(1, n_cal + 2, size=400), np.ones(100, np.int64)])
    p = k / (n_cal + 1)
    pi0 = min(1.0, (1 + np.sum(p > 0.5)) / (len(p) * 0.5))
    counts = np.bincount(k, minlength=n_cal + 2)[1:]
    assert storey_pi0(counts) == pytest.approx(pi0, rel=1e-12)
    assert pi0 < 1  # a fifth of the rows are discoveries: the estimate is below one
    q = q_values_from_index(k, n_cal, FdrMethod.storey)
    np.testing.assert_allclose(q, np.minimum(1.0, pi0 * false_discovery_control(p)), rtol=1e-12)
    assert fdr_flags(q, 0.05).sum() >= fdr_flags(q_values_from_index(k, n_cal), 0.05).sum()


@pytest.mark.parametrize("method", ["bh", "by"])
def test_no_night_below_the_prevalence_floor_gets_a_flag(method):
    """With n_cal = 999 the smallest p is 0.001, so at q = 0.05 BH needs 2 % OOD rows at that p-value:
    20 of 1,000 are all flagged, 19 none (BY divides q by sum 1/i)."""
    n_cal, m, q = 999, 1000, 0.05
    floor = prevalence_floor(1 / (n_cal + 1), q, FdrMethod(method), m)
    c_m = 1.0 if method == "bh" else np.sum(1 / np.arange(1, m + 1))
    assert floor == pytest.approx(0.001 * c_m / q)
    k_ood = int(np.ceil(floor * m - 1e-9))
    for n_ood, expected in ((k_ood, k_ood), (k_ood - 1, 0)):
        k = np.r_[np.ones(n_ood, np.int64), np.full(m - n_ood, 600)]
        flagged = fdr_flags(q_values_from_index(k, n_cal, FdrMethod(method)), q)
        assert flagged.sum() == expected


def test_p_values_follow_the_definition_with_ties():
    cal = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    scores = np.array([0.0, 1.0, 2.0, 2.5, 5.0, 6.0])
    brute = [(1 + np.sum(cal >= s)) / (len(cal) + 1) for s in scores]
    np.testing.assert_array_equal(conformal_p_values(cal, scores), brute)
    np.testing.assert_array_equal(conformal_p_values(cal, scores), [1.0, 1.0, 5 / 6, 3 / 6, 2 / 6, 1 / 6])
    rng = np.random.default_rng(0)
    cal, scores = rng.integers(0, 20, 300).astype(float), rng.integers(-2, 23, 500).astype(float)
    brute = [(1 + np.sum(cal >= s)) / 301 for s in scores]
    np.testing.assert_array_equal(ConformalCalibrator(cal).p_value(scores), brute)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.25])
def test_p_values_are_exactly_valid_under_exchangeability(alpha):
    """P(p <= a) = floor(a (n + 1)) / (n + 1) for continuous scores: one calibration point's worth off
    (e.g. #{cal >= s} / (n + 1), or n in place of n + 1) moves the rate by 1 / (n + 1) = 0.05."""
    rng = np.random.default_rng(1)
    n, reps = 19, 40_000
    cal = rng.standard_normal((reps, n))
    test = rng.standard_normal(reps)
    p = np.array([conformal_p_values(c, [s])[0] for c, s in zip(cal, test, strict=True)])
    rate = np.mean(p <= alpha)
    expected = np.floor(alpha * (n + 1) + 1e-9) / (n + 1)
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / reps)  # ~0.004, well under 0.05


def test_smooth_log_p_interpolates_conformal_p_and_keeps_falling_beyond_the_calibration():
    rng = np.random.default_rng(2)
    cal = ConformalCalibrator(rng.normal(size=200))
    knots = np.unique(cal.scores)
    np.testing.assert_allclose(cal.smooth_log_p(knots), np.log(cal.p_value(knots)), rtol=1e-12)
    grid = np.linspace(-5, 12, 2000)
    tail = cal.smooth_log_p(grid)
    assert np.all(np.diff(tail) <= 0) and np.all(tail <= 0)
    above = grid > cal.scores[-1]
    assert np.all(np.diff(tail[above]) < 0)  # far rows stay ordered instead of tying at 1/(n+1)
    assert tail[-1] < np.log(1 / 201) - 10
    # between two knots it lies between their values
    mid = 0.5 * (knots[10] + knots[11])
    assert cal.smooth_log_p([knots[11]])[0] <= cal.smooth_log_p([mid])[0] <= cal.smooth_log_p([knots[10]])[0]


@pytest.mark.parametrize("method", ["bh", "by"])
def test_q_values_from_histogram_equal_scipy(method):
    rng = np.random.default_rng(3)
    n_cal = 50
    for m in (1, 7, 300):
        k = rng.integers(1, n_cal + 2, size=m)
        k[: m // 3] = rng.integers(1, 3, size=m // 3)  # many ties at the smallest p-values
        q = q_values_from_index(k, n_cal, FdrMethod(method))
        expected = false_discovery_control(k / (n_cal + 1), method=method)
        np.testing.assert_allclose(q, expected, rtol=1e-12)
    assert q_values_from_index(np.zeros(0, np.int64), n_cal).size == 0
    with pytest.raises(ValueError, match="indices"):
        q_values_from_index(np.array([0]), n_cal)


def test_flags_are_the_rows_bh_rejects():
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 0.002, size=30)])
    k = np.ceil(p * 1001).astype(np.int64)
    q = q_values_from_index(k, 1000)
    pv = np.sort(k / 1001)
    m = len(pv)
    passing = np.flatnonzero(pv <= 0.05 * np.arange(1, m + 1) / m)
    threshold = pv[passing[-1]] if passing.size else -1
    np.testing.assert_array_equal(fdr_flags(q, 0.05), k / 1001 <= threshold)
    with pytest.raises(ValueError, match="false-discovery rate"):
        fdr_flags(q, 0.0)


@pytest.mark.parametrize("method", ["bh", "storey", "by"])
def test_bh_on_conformal_p_values_controls_the_fdr_on_mixtures(method):
    """Repeated nights: 400 ID rows and 40 shifted OOD rows, calibration of 1000 ID rows each time (BY's
    extra factor, about 6.7 here, needs that resolution to flag anything)."""
    rng = np.random.default_rng(5)
    q, reps, fdp, power = 0.1, 400, [], []
    for _ in range(reps):
        cal = rng.standard_normal(1000)
        null, alt = rng.standard_normal(400), rng.standard_normal(40) + 5.0
        k = ConformalCalibrator(cal).p_index(np.concatenate([null, alt]))
        flagged = fdr_flags(q_values_from_index(k, 1000, FdrMethod(method)), q)
        false = flagged[:400].sum()
        fdp.append(false / max(flagged.sum(), 1))
        power.append(flagged[400:].mean())
    assert np.mean(fdp) <= q + 3 * np.std(fdp) / np.sqrt(reps)
    assert np.mean(power) > 0.2  # the test is not vacuous: real discoveries are made


def _correlated_features(rng, n, d=6, shift=0.0):
    mix = np.eye(d) + 0.5 * np.tri(d, k=-1)
    x = rng.standard_normal((n, d)) @ mix.T + shift
    x[:, -1] = -800 + 20 * x[:, -1]  # log p(x) on its own scale
    return x


@pytest.mark.parametrize("combination", ["fisher", "tippett"])
def test_combined_p_value_is_valid_although_components_are_dependent(combination):
    """P(p <= a) over repeated (fit, calibration, test) draws equals floor(a (n2 + 1)) / (n2 + 1)."""
    rng = np.random.default_rng(6)
    n2, reps, per_rep = 19, 600, 50
    names = [f"l{j}" for j in range(5)] + ["log_prob"]
    rates = {0.05: [], 0.1: []}
    for _ in range(reps):
        fit = _correlated_features(rng, 60)
        cal_1, cal_2, test = (_correlated_features(rng, n) for n in (40, n2, per_rep))
        suite = DetectorSuite(combination=combination).fit_parts(
            Moments.from_values(fit), cal_1, cal_2, names
        )
        p = suite.p_value(test)
        for a in rates:
            rates[a].append(np.mean(p <= a))
    for a, values in rates.items():
        expected = np.floor(a * (n2 + 1) + 1e-9) / (n2 + 1)
        assert abs(np.mean(values) - expected) < 4 * np.std(values) / np.sqrt(reps), (a, np.mean(values))


def test_combined_test_separates_what_either_component_sees():
    """A shift in log p alone (typicality sees it) and one in the layer correlations alone (fullcov sees
    it) are both caught by the combination; the row's driver names the component that saw it."""
    rng = np.random.default_rng(7)
    names = [f"l{j}" for j in range(5)] + ["log_prob"]
    suite = DetectorSuite().fit(_correlated_features(rng, 3000))
    id_rows = _correlated_features(rng, 300)
    lp_shift = id_rows.copy()
    lp_shift[:, -1] += 120
    result = suite.score_all(lp_shift)
    assert np.mean(suite.p_value(lp_shift) <= 0.01) > 0.9
    assert np.mean(result["driver"] != "paper") > 0.9  # the paper's test never reads log p
    decorrelated = id_rows.copy()  # the same marginals per layer, the correlations gone
    decorrelated[:, :5] = rng.standard_normal((300, 5)) * id_rows[:, :5].std(0) + id_rows[:, :5].mean(0)
    assert np.mean(suite.p_value(decorrelated) <= 0.05) > np.mean(suite.p_value(id_rows) <= 0.05) + 0.1
    flagged = suite.p_value(decorrelated) <= 0.05
    assert np.mean(suite.score_all(decorrelated)["driver"][flagged] == "fullcov") > 0.5
    assert len(names) == suite.n_features_in_


def test_combined_test_follows_its_definition():
    rng = np.random.default_rng(3)
    part_1, part_2, night = rng.normal(size=(200, 2)), rng.normal(size=(150, 2)), rng.normal(size=(40, 2))
    components = [ConformalCalibrator(part_1[:, 0]), EqualTailedCalibrator(part_1[:, 1])]
    for rule, merge in (("fisher", lambda lp: -2 * lp.sum(axis=1)), ("tippett", lambda lp: -lp.min(axis=1))):
        test = CombinedTest(components, rule).calibrate(part_2)

        def by_hand(x, merge=merge):
            return merge(np.column_stack([c.smooth_log_p(x[:, k]) for k, c in enumerate(components)]))

        stat, smallest = test.statistic(night)
        np.testing.assert_array_equal(stat, by_hand(night))
        log_p = np.column_stack([c.smooth_log_p(night[:, k]) for k, c in enumerate(components)])
        np.testing.assert_array_equal(smallest, np.argmin(log_p, axis=1))
        calibration = by_hand(part_2)
        expected = np.array([1 + np.sum(calibration >= s) for s in stat])  # p = k / (n + 1)
        np.testing.assert_array_equal(test.p_index(stat), expected)
        assert test.calibrator.n == 150


def test_combined_test_refuses_the_adaptive_rule_no_components_and_no_calibration():
    calibrator = ConformalCalibrator(np.arange(10.0))
    with pytest.raises(ValueError, match="fisher or tippett"):
        CombinedTest([calibrator], "adaptive")
    with pytest.raises(ValueError, match="at least one component"):
        CombinedTest([], "fisher")
    with pytest.raises(ValueError, match="not calibrated"):
        CombinedTest([calibrator], "fisher").p_index(np.zeros(3))
