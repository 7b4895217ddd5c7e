"""Single OOD tests against scipy / scikit-learn references, fits from merged moments, persistence."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import combine_pvalues, multivariate_normal, norm
from sklearn.covariance import OAS
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import check_estimator

from gradood.stats import (
    ComplexityCorrected,
    DetectorSuite,
    DiagonalGaussian,
    FisherLayers,
    GradNorm,
    Moments,
    NegLogLikelihood,
    ShrinkageGaussian,
    Typicality,
    log_features,
)
from gradood.stats.ood_tests import ood_test_from_dict

NAMES = [f"layer{j}.weight" for j in range(5)]

#: scikit-learn checks that do not apply, with the reason
NOT_APPLICABLE = {
    "check_array_api_input": "the tests compute in float64 numpy; array-API namespaces are not supported",
}


def _log_norms(rng: np.random.Generator, n: int, shift: float | np.ndarray = 0.0) -> np.ndarray:
    """Correlated Gaussian log-norms with distinct per-layer location and scale."""
    mu = np.array([-20.0, -3.0, 0.0, 5.0, 12.0]) + shift
    sigma = np.array([0.1, 1.0, 2.0, 0.5, 3.0])
    mix = np.eye(5) + 0.6 * np.tri(5, k=-1)
    return mu + (rng.normal(size=(n, 5)) @ mix.T) * sigma


@pytest.mark.parametrize(
    "estimator",
    [DiagonalGaussian(), FisherLayers(), ShrinkageGaussian(), Typicality(), NegLogLikelihood(), GradNorm()]
    + [DetectorSuite(), DetectorSuite(combination="tippett", components=("paper", "nll"))],
    ids=lambda e: type(e).__name__,
)
def test_scikit_learn_estimator_checks(estimator):
    results = check_estimator(estimator, on_fail=None)
    assert len(results) > 30
    failed = {r["check_name"]: r["exception"] for r in results if r["status"] == "failed"}
    assert failed == {}
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert skipped <= set(NOT_APPLICABLE), skipped - set(NOT_APPLICABLE)


@pytest.mark.parametrize("ddof", [0, 1])
def test_diagonal_gaussian_matches_scipy(ddof):
    rng = np.random.default_rng(0)
    fit, test = _log_norms(rng, 300), _log_norms(rng, 40, shift=0.5)
    det = DiagonalGaussian(ddof=ddof).fit(fit)
    np.testing.assert_allclose(det.mean_, fit.mean(0), rtol=1e-12)
    np.testing.assert_allclose(det.std_, fit.std(0, ddof=ddof), rtol=1e-12)
    expected = norm.logpdf(test, fit.mean(0), fit.std(0, ddof=ddof)).sum(axis=1)
    np.testing.assert_allclose(det.score_samples(test), expected, rtol=1e-12)
    np.testing.assert_allclose(det.ood_score(test), -expected, rtol=1e-12)
    z = (test - fit.mean(0)) / fit.std(0, ddof=ddof)
    np.testing.assert_allclose(det.zscores(test), z, rtol=1e-12, atol=1e-12)


def test_fisher_layers_is_fishers_method_over_two_sided_p():
    rng = np.random.default_rng(1)
    fit, test = _log_norms(rng, 200), _log_norms(rng, 10, shift=1.0)
    det = FisherLayers().fit(fit)
    p = 2 * norm.sf(np.abs((test - fit.mean(0)) / fit.std(0)))
    expected = [combine_pvalues(row, method="fisher").statistic for row in p]
    np.testing.assert_allclose(det.ood_score(test), expected, rtol=1e-10)


def test_shrinkage_gaussian_matches_sklearn_oas_on_standardised_columns():
    rng = np.random.default_rng(2)
    fit, test = _log_norms(rng, 40), _log_norms(rng, 12, shift=0.3)
    det = ShrinkageGaussian().fit(fit)
    mean, std = fit.mean(0), fit.std(0)
    oas = OAS().fit((fit - mean) / std)
    assert det.shrinkage_ == pytest.approx(oas.shrinkage_, rel=1e-10) and 0 < det.shrinkage_ < 1
    cov = oas.covariance_ * np.outer(std, std)
    expected = multivariate_normal(mean, cov).logpdf(test)
    np.testing.assert_allclose(det.score_samples(test), expected, rtol=1e-9)
    # correlations matter: the diagonal model scores the same rows differently
    assert not np.allclose(
        det.score_samples(test), DiagonalGaussian().fit(fit).score_samples(test), rtol=1e-3
    )


def test_simple_tests_match_their_formulas():
    rng = np.random.default_rng(3)
    fit_lp, test_lp = rng.normal(-900.0, 20.0, size=(80, 1)), rng.normal(-850.0, 30.0, size=(9, 1))
    typ = Typicality().fit(fit_lp)
    assert typ.entropy_ == pytest.approx(-fit_lp.mean(), rel=1e-13)
    np.testing.assert_allclose(typ.ood_score(test_lp), np.abs(-test_lp[:, 0] + fit_lp.mean()), rtol=1e-12)
    np.testing.assert_array_equal(NegLogLikelihood().fit(fit_lp).ood_score(test_lp), -test_lp[:, 0])
    logs = _log_norms(rng, 7)
    np.testing.assert_allclose(
        GradNorm().fit(logs).ood_score(logs), np.log(np.exp(logs).sum(axis=1)), rtol=1e-12
    )
    assert GradNorm().fit(logs).ood_score(logs)[0] == pytest.approx(logsumexp(logs[0]))
    # typicality's signed statistic: positive = less likely than typical, |statistic| = ood_score
    np.testing.assert_allclose(typ.statistic(test_lp), -test_lp[:, 0] - typ.entropy_, rtol=1e-12)
    assert Typicality.two_sided and not NegLogLikelihood.two_sided and not GradNorm.two_sided


def test_complexity_corrected_is_the_likelihood_bits_beyond_the_png_size():
    rng = np.random.default_rng(5)
    rows = np.column_stack([rng.normal(-900.0, 20.0, 9), rng.normal(2000.0, 100.0, 9)])  # nats, bits
    test = ComplexityCorrected().fit(rows)
    np.testing.assert_allclose(test.ood_score(rows), -rows[:, 0] / np.log(2) - rows[:, 1], rtol=1e-12)
    assert not ComplexityCorrected.two_sided
    back = ood_test_from_dict(json.loads(json.dumps(test.to_dict())))
    np.testing.assert_array_equal(back.ood_score(rows), test.ood_score(rows))
    with pytest.raises(ValueError, match="log p and complexity bits"):
        ComplexityCorrected().fit(rows[:, :1]).ood_score(rows[:, :1])


def _with_complexity(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Log-norms, log p in nats and PNG bits that track log p (a simpler image is more likely)."""
    bits = rng.normal(3000.0, 300.0, n)
    log_prob = -np.log(2) * (bits + rng.normal(200.0, 10.0, n))  # -log2 p = bits + 200 +- 10
    columns = [*NAMES, "log_prob", "complexity_bits"]
    return pd.DataFrame(np.column_stack([_log_norms(rng, n), log_prob, bits]), columns=columns)


def test_the_suite_fits_the_complexity_test_only_where_the_features_have_its_column():
    rng = np.random.default_rng(6)
    fit = _with_complexity(rng, 3000)
    suite = DetectorSuite(calibration_fraction=0.6).fit(fit)
    assert list(suite.tests_)[-1] == "complexity" and suite.tail_order[-1] == "complexity"
    # a simple image: short PNG and high likelihood, both typical alone; beyond its size it is surprising
    odd = fit.iloc[:3].copy()
    odd["complexity_bits"] = 2500.0
    odd["log_prob"] = -np.log(2) * (2500.0 + 260.0)
    scores = suite.score_all(odd, combined=False)
    np.testing.assert_allclose(scores["complexity"]["score"], 260.0, rtol=1e-9)
    calibration = suite.calibrators_["complexity"]
    stat = scores["complexity"]["score"]
    expected = (1 + (calibration.scores[None, :] >= stat[:, None]).sum(axis=1)) / (calibration.n + 1)
    np.testing.assert_allclose(scores["complexity"]["p_index"] / (calibration.n + 1), expected)
    assert (scores["complexity"]["p_index"] == 1).all()  # beyond every calibration row
    assert (scores["typicality"]["p_index"] > 0.05 * (suite.calibration_size("typicality") + 1)).all()
    # the layers' tests read the layers only: the paper's test is that of the log-norm columns alone
    alone = DetectorSuite(calibration_fraction=0.6).fit(fit[NAMES + ["log_prob"]])
    np.testing.assert_allclose(
        suite.test_scores("paper", odd), alone.test_scores("paper", odd[alone.feature_names_in_])
    )
    assert "complexity" not in alone.tests_ and "complexity" not in alone.tail_order
    with pytest.raises(ValueError, match="complexity_bits"):
        DetectorSuite(components=("paper", "complexity")).fit(fit[NAMES + ["log_prob"]])
    back = DetectorSuite.from_dict(json.loads(json.dumps(suite.to_dict(), sort_keys=True)))  # as stored
    np.testing.assert_array_equal(
        back.score_all(odd, combined=False)["complexity"]["score"], scores["complexity"]["score"]
    )


def test_the_suite_calibrates_typicality_on_both_tails_and_names_the_side():
    """A row far *more likely* than every calibration row is as far out for typicality as one far less
    likely: p = 2 / (n + 1) on both sides (one tail would give the too-likely row p = 1), and the
    adaptive test's inputs and drivers keep the sides apart."""
    rng = np.random.default_rng(8)
    fit = rng.normal(size=(2000, 4))
    fit[:, -1] = -800 - 20 * rng.gamma(2.0, size=2000)  # skewed log-likelihood: a long unlikely tail
    suite = DetectorSuite(combination="adaptive", calibration_fraction=0.8, part_2_fraction=0.5).fit(fit)
    rows = np.zeros((3, 4))
    rows[:, -1] = [fit[:, -1].max() + 200, fit[:, -1].min() - 200, np.median(fit[:, -1])]
    result = suite.score_all(rows, combined=False)
    n = suite.calibration_size("typicality")
    assert n == suite.n_calibration_[0] and suite.calibrator("typicality").min_p_value == 2 / (n + 1)
    p = result["typicality"]["p_index"] / (n + 1)
    np.testing.assert_array_equal(p[:2], [2 / (n + 1), 2 / (n + 1)])
    assert p[2] > 0.5
    assert (result["typicality"]["score"][:2] > result["typicality"]["score"][2]).all()
    tails = suite.tails(rows)
    low, high = (suite.tail_order.index(f"typicality:{side}") for side in ("low", "high"))
    assert tails[0, low] > 5 and tails[0, high] == 0  # too likely: only the low side is out
    assert tails[1, high] > 5 and tails[1, low] == 0
    night = suite.adapt_to_night(suite.tails(fit[:200]), 1.0, seed=0)
    drivers = suite.score_all(rows, night)["driver"]
    assert drivers[0] == "typicality:low"  # the too-likely row is flagged by its low side


@pytest.mark.parametrize("cls", [DiagonalGaussian, FisherLayers, ShrinkageGaussian, Typicality])
def test_fit_from_merged_chunks_equals_one_array_fit(cls):
    rng = np.random.default_rng(4)
    fit, test = _log_norms(rng, 257), _log_norms(rng, 20, shift=0.2)
    chunks = np.array_split(fit, [0, 1, 50, 51, 200])
    merged = Moments.merge_all(Moments.from_values(c) for c in chunks)
    a, b = cls().fit(fit), cls().fit_moments(merged, NAMES)
    np.testing.assert_allclose(b.score_samples(test), a.score_samples(test), rtol=1e-9)
    assert list(b.feature_names_in_) == NAMES and b.n_fit_ == a.n_fit_ == 257


def test_constant_column_is_dropped_and_ignored():
    rng = np.random.default_rng(5)
    fit, test = _log_norms(rng, 100), _log_norms(rng, 10)
    fit[:, 2] = 7.0
    for cls in (DiagonalGaussian, ShrinkageGaussian):
        det = cls().fit(fit)
        assert det.kept_.tolist() == [True, True, False, True, True]
        moved = test.copy()
        moved[:, 2] = np.arange(10) * 1e6
        np.testing.assert_array_equal(det.score_samples(moved), det.score_samples(test))
    kept = [0, 1, 3, 4]
    expected = norm.logpdf(test[:, kept], fit[:, kept].mean(0), fit[:, kept].std(0)).sum(axis=1)
    np.testing.assert_allclose(DiagonalGaussian().fit(fit).score_samples(test), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="min_std"):
        DiagonalGaussian().fit(np.ones((10, 3)))


def test_log_features_floor_and_non_finite():
    sq = np.array([[0.0, 1.0], [-1e-12, np.e]])
    np.testing.assert_allclose(log_features(sq, 1e-20), [[np.log(1e-20), 0.0], [np.log(1e-20), 1.0]])
    with pytest.raises(ValueError, match="column 1"):
        log_features(np.array([[1.0, np.nan]]), 1e-30)


def test_feature_names_from_a_dataframe_and_column_check():
    rng = np.random.default_rng(6)
    frame = pd.DataFrame(_log_norms(rng, 30), columns=NAMES)
    det = DiagonalGaussian().fit(frame)
    assert list(det.feature_names_in_) == NAMES
    with pytest.raises(ValueError, match="features"):
        det.score_samples(np.ones((2, 4)))
    with pytest.raises(NotFittedError):
        DiagonalGaussian().score_samples(np.ones((2, 5)))


@pytest.mark.parametrize("cls", [DiagonalGaussian, FisherLayers, ShrinkageGaussian, Typicality, GradNorm])
def test_dict_round_trip_gives_identical_scores_and_checks_the_format(cls):
    rng = np.random.default_rng(7)
    fit, test = _log_norms(rng, 60), _log_norms(rng, 12)
    det = cls().fit_moments(Moments.from_values(fit), NAMES)
    saved = json.loads(json.dumps(det.to_dict()))
    back = ood_test_from_dict(saved)
    assert type(back) is cls and back.get_params() == det.get_params()
    np.testing.assert_array_equal(back.score_samples(test), det.score_samples(test))
    with pytest.raises(ValueError, match="format_version"):
        ood_test_from_dict({**saved, "format_version": 1})
    with pytest.raises(ValueError, match="unknown OOD test"):
        ood_test_from_dict({**saved, "kind": "Nope"})
