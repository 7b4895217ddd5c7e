import json

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from gradood.stats import LogGaussianDetector, Moments, TypicalityTest, log_features

NAMES = [f"layer{j}.weight" for j in range(5)]


def _sqnorms(rng: np.random.Generator, n: int, shift: float | np.ndarray = 0.0) -> np.ndarray:
    """Log-normal squared norms with distinct per-layer location and scale, as float32 like the extractor."""
    mu = np.array([-20.0, -3.0, 0.0, 5.0, 12.0]) + shift
    sigma = np.array([0.1, 1.0, 2.0, 0.5, 3.0])
    return np.exp(mu + sigma * rng.normal(size=(n, 5))).astype(np.float32)


def _reference_logpdf(fit: np.ndarray, test: np.ndarray, ddof: int = 0) -> np.ndarray:
    log_fit, log_test = np.log(fit.astype(np.float64)), np.log(test.astype(np.float64))
    return norm.logpdf(log_test, log_fit.mean(0), log_fit.std(0, ddof=ddof)).sum(axis=1)


@pytest.mark.parametrize("ddof", [0, 1])
def test_fit_and_score_match_scipy(ddof):
    rng = np.random.default_rng(0)
    fit, test = _sqnorms(rng, 300), _sqnorms(rng, 40, shift=0.5)
    det = LogGaussianDetector(ddof=ddof).fit(fit, NAMES)

    logs = np.log(fit.astype(np.float64))
    np.testing.assert_allclose(det.mean_, logs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(det.std_, logs.std(0, ddof=ddof), rtol=1e-12)
    assert det.n_fit_ == 300 and det.layer_names_ == NAMES and det.dropped_layers_ == []
    expected = _reference_logpdf(fit, test, ddof)
    np.testing.assert_allclose(det.score_samples(test), expected, rtol=1e-12)
    np.testing.assert_allclose(det.ood_score(test), -expected, rtol=1e-12)
    z = (np.log(test.astype(np.float64)) - logs.mean(0)) / logs.std(0, ddof=ddof)
    np.testing.assert_allclose(det.zscores(test), z, rtol=1e-12, atol=1e-12)


def test_fit_moments_of_merged_chunks_equals_fit():
    rng = np.random.default_rng(1)
    fit, test = _sqnorms(rng, 257), _sqnorms(rng, 20)
    chunks = np.array_split(fit, [0, 1, 50, 51, 200])
    moments = Moments.merge_all(Moments.from_values(log_features(c, 1e-30)) for c in chunks)
    a = LogGaussianDetector().fit(fit, NAMES)
    b = LogGaussianDetector().fit_moments(moments, NAMES)
    np.testing.assert_allclose(b.mean_, a.mean_, rtol=1e-9)
    np.testing.assert_allclose(b.std_, a.std_, rtol=1e-9)
    np.testing.assert_allclose(b.score_samples(test), a.score_samples(test), rtol=1e-9)
    assert b.n_fit_ == a.n_fit_


def test_zero_variance_layer_is_dropped_and_ignored():
    rng = np.random.default_rng(2)
    fit, test = _sqnorms(rng, 100).astype(np.float64), _sqnorms(rng, 10).astype(np.float64)
    fit[:, 2] = 7.0
    det = LogGaussianDetector().fit(fit, NAMES)
    kept = [0, 1, 3, 4]
    assert det.dropped_layers_ == ["layer2.weight"]
    assert det.layer_names_ == [NAMES[j] for j in kept]
    assert det.all_layer_names_ == NAMES
    assert det.zscores(test).shape == (10, 4)

    expected = _reference_logpdf(fit[:, kept], test[:, kept])
    np.testing.assert_allclose(det.score_samples(test), expected, rtol=1e-12)
    moved = test.copy()
    moved[:, 2] = [0.0, 1e30, *range(1, 9)]
    np.testing.assert_array_equal(det.score_samples(moved), det.score_samples(test))


def test_log_floor_for_exact_zeros():
    rng = np.random.default_rng(3)
    fit = _sqnorms(rng, 50).astype(np.float64)
    fit[:10, 1] = 0.0
    fit[:, 4] = 0.0  # a dead layer: constant at the floor, hence dropped
    floor = 1e-20
    logs = log_features(fit, floor)
    assert np.isfinite(logs).all()
    np.testing.assert_array_equal(logs[:10, 1], np.log(floor))
    det = LogGaussianDetector(min_sqnorm=floor).fit(fit, NAMES)
    assert det.dropped_layers_ == ["layer4.weight"]
    reference = np.log(np.maximum(fit[:, :4], floor))
    np.testing.assert_allclose(det.mean_, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(det.std_, reference.std(0), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_naming_the_column(bad):
    rng = np.random.default_rng(4)
    data = _sqnorms(rng, 20).astype(np.float64)
    det = LogGaussianDetector().fit(data, NAMES)
    data[5, 3] = bad
    with pytest.raises(ValueError, match="column 3"):
        log_features(data, 1e-30)
    with pytest.raises(ValueError, match="column 3"):
        LogGaussianDetector().fit(data, NAMES)
    with pytest.raises(ValueError, match="column 3"):
        det.score_samples(data)


def test_nan_in_dropped_layer_still_raises():
    rng = np.random.default_rng(5)
    fit = _sqnorms(rng, 20).astype(np.float64)
    fit[:, 0] = 1.0
    det = LogGaussianDetector().fit(fit, NAMES)
    fit[0, 0] = np.nan
    with pytest.raises(ValueError, match="column 0"):
        det.score_samples(fit)


def test_top_layers_match_argsort_of_abs_z():
    rng = np.random.default_rng(6)
    fit, test = _sqnorms(rng, 200), _sqnorms(rng, 15, shift=np.array([0.0, -2.0, 0.0, 1.0, 0.0]))
    det = LogGaussianDetector().fit(fit, NAMES)
    logs = np.log(fit.astype(np.float64))
    z = (np.log(test.astype(np.float64)) - logs.mean(0)) / logs.std(0)
    names, top_z = det.top_layers(test, k=3)
    assert top_z.shape == (15, 3) and len(names) == 15
    for i in range(15):
        order = np.argsort(-np.abs(z[i]))[:3]
        assert names[i] == [NAMES[j] for j in order]
        np.testing.assert_allclose(top_z[i], z[i, order], rtol=1e-12)
    assert (top_z < 0).any() and (top_z > 0).any()  # signs kept
    with pytest.raises(ValueError, match="k must be"):
        det.top_layers(test, k=6)


def test_dict_round_trip_gives_identical_scores():
    rng = np.random.default_rng(7)
    fit, test = _sqnorms(rng, 60).astype(np.float64), _sqnorms(rng, 12)
    fit[:, 1] = 3.0
    det = LogGaussianDetector(min_sqnorm=1e-25, min_std=1e-6, ddof=1).fit(fit, NAMES)
    back = LogGaussianDetector.from_dict(json.loads(json.dumps(det.to_dict())))
    assert back.get_params() == det.get_params()
    assert back.dropped_layers_ == det.dropped_layers_ == ["layer1.weight"]
    assert back.n_fit_ == 60
    np.testing.assert_array_equal(back.score_samples(test), det.score_samples(test))
    names_a, z_a = det.top_layers(test, 2)
    names_b, z_b = back.top_layers(test, 2)
    assert names_a == names_b
    np.testing.assert_array_equal(z_a, z_b)
    with pytest.raises(ValueError, match="format_version"):
        LogGaussianDetector.from_dict({**det.to_dict(), "format_version": 99})


def test_not_fitted_and_input_errors():
    det = LogGaussianDetector()
    data = np.ones((3, 5))
    for call in (det.score_samples, det.ood_score, det.zscores, det.top_layers):
        with pytest.raises(NotFittedError):
            call(data)
    with pytest.raises(NotFittedError):
        det.to_dict()

    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="at least 2 rows"):
        det.fit(_sqnorms(rng, 1), NAMES)
    with pytest.raises(ValueError, match="layer names"):
        det.fit(_sqnorms(rng, 10), NAMES[:4])
    with pytest.raises(ValueError, match="unique"):
        det.fit(_sqnorms(rng, 10), ["a"] * 5)
    with pytest.raises(ValueError, match="min_std"):
        det.fit(np.ones((10, 5)), NAMES)
    det.fit(_sqnorms(rng, 10), NAMES)
    with pytest.raises(ValueError, match="5 feature columns"):
        det.score_samples(np.ones((2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        det.score_samples(np.ones(5))


def test_sklearn_estimator_contract():
    det = LogGaussianDetector(min_sqnorm=1e-10, min_std=0.5, ddof=1)
    assert det.get_params() == {"min_sqnorm": 1e-10, "min_std": 0.5, "ddof": 1}
    copy = clone(det)
    assert copy.get_params() == det.get_params() and not hasattr(copy, "mean_")
    rng = np.random.default_rng(9)
    det.fit(_sqnorms(rng, 100), NAMES)
    # layer0 has log-std 0.1 < min_std 0.5 on this data
    assert det.dropped_layers_ == ["layer0.weight"]


def test_typicality_matches_numpy():
    rng = np.random.default_rng(10)
    fit_lp, test_lp = rng.normal(-900.0, 20.0, size=80), rng.normal(-850.0, 30.0, size=9)
    t = TypicalityTest().fit(fit_lp)
    entropy = np.mean(-fit_lp)
    assert t.n_fit_ == 80
    np.testing.assert_allclose(t.entropy_, entropy, rtol=1e-13)
    np.testing.assert_allclose(t.ood_score(test_lp), np.abs(-test_lp - entropy), rtol=1e-12)
    np.testing.assert_array_equal(t.score_samples(test_lp), -t.ood_score(test_lp))

    chunks = np.array_split(-fit_lp, [0, 1, 30])
    merged = TypicalityTest.from_moments(Moments.merge_all(Moments.from_values(c[:, None]) for c in chunks))
    np.testing.assert_allclose(merged.entropy_, entropy, rtol=1e-13)
    assert merged.n_fit_ == 80

    back = TypicalityTest.from_dict(json.loads(json.dumps(t.to_dict())))
    np.testing.assert_array_equal(back.ood_score(test_lp), t.ood_score(test_lp))


def test_typicality_errors():
    with pytest.raises(NotFittedError):
        TypicalityTest().ood_score(np.zeros(3))
    with pytest.raises(ValueError, match="at least 1 row"):
        TypicalityTest().fit(np.zeros(0))
    with pytest.raises(ValueError, match="one column"):
        TypicalityTest.from_moments(Moments.empty(2))
    with pytest.raises(ValueError, match="1-D"):
        TypicalityTest().fit(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        TypicalityTest().fit(np.array([1.0, np.nan]))
