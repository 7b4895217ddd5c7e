"""jobs/analyse.py: each statistic against numpy/scipy references on synthetic data, Prop. 1 for every
family, and one small end-to-end run on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from gradood.analysis import AffineMap, LogitMap, TransformedInput, invariance_check, layers
from gradood.analysis import fisher as fim
from gradood.analysis.config import default_family, load_analyse_config
from gradood.core.cli import ConfigError
from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.features import feature_layer_names
from gradood.models.base import DensityModel
from gradood.models.checkpoint import load_checkpoint
from gradood.seeding import draw_noise
from tests.pipeline_fixtures import stop_shared_ray

PRETRAINED = Path(__file__).resolve().parent.parent / "gradood" / "pretrained"


def shipped(family: str) -> DensityModel:
    return load_checkpoint(PRETRAINED / f"{family}_fmnist_small")[0]


def test_layer_separation_is_the_per_layer_auroc():
    rng = np.random.default_rng(0)
    id_logs = rng.normal(size=(200, 3))
    ood = {"a": rng.normal([0.0, 1.0, -2.0], size=(150, 3)), "b": rng.normal([0.5, 0.0, 0.0], size=(80, 3))}
    sep = layers.layer_separation(id_logs, ood)
    labels = lambda n_ood: np.r_[np.zeros(200), np.ones(n_ood)]  # noqa: E731
    for name, logs in ood.items():
        for j in range(3):
            expected = roc_auc_score(labels(len(logs)), np.r_[id_logs[:, j], logs[:, j]])
            assert sep[name][j] == pytest.approx(expected, abs=1e-12)
    expected = (np.abs(2 * sep["a"] - 1) + np.abs(2 * sep["b"] - 1)) / 2
    np.testing.assert_allclose(sep["separation"], expected)
    assert int(np.argmax(sep["separation"])) == 2  # the layer shifted by two standard deviations


def test_choose_layers_top_then_seeded_random():
    separation = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.05, 0.4])
    chosen = layers.choose_layers(separation, seed=3, n_separating=2, n_random=3)
    assert chosen["separating"] == [1, 3]
    assert layers.choose_layers(separation, seed=3, n_separating=2, n_random=3) == chosen
    assert set(chosen["random"]).isdisjoint(chosen["separating"]) and len(set(chosen["random"])) == 3
    draws = {tuple(layers.choose_layers(separation, s, 2, 3)["random"]) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_histograms_share_edges_and_match_numpy():
    rng = np.random.default_rng(1)
    values = {"id": rng.normal(size=300), "ood": rng.normal(3, 2, size=100)}
    h = layers.histograms(values, bins=25)
    pooled = np.r_[values["id"], values["ood"]]
    np.testing.assert_allclose(h["edges"], np.linspace(pooled.min(), pooled.max(), 26))
    for key, v in values.items():
        np.testing.assert_allclose(h["density"][key], np.histogram(v, h["edges"], density=True)[0])
        assert np.sum(h["density"][key] * np.diff(h["edges"])) == pytest.approx(1.0)


def ar1_columns(n: int, n_layers: int, phi: float, seed: int) -> np.ndarray:
    """Columns with corr(i, k) = phi^|i - k| (a stationary AR(1) across layers)."""
    rng = np.random.default_rng(seed)
    cols = [rng.normal(size=n)]
    for _ in range(n_layers - 1):
        cols.append(phi * cols[-1] + np.sqrt(1 - phi**2) * rng.normal(size=n))
    return np.column_stack(cols)


def test_correlation_decay_recovers_an_ar1_structure():
    logs = ar1_columns(4000, 12, 0.8, seed=2)
    res = layers.correlation_decay(logs, permutations=200, seed=0)
    corr = np.corrcoef(logs, rowvar=False)
    for d in (1, 3, 7):
        expected = np.mean(np.abs(np.diagonal(corr, offset=d)))
        at = int(np.flatnonzero(res["distance"] == d)[0])
        assert res["mean_abs_corr"][at] == pytest.approx(expected, abs=1e-12)
        assert res["mean_abs_corr"][at] == pytest.approx(0.8**d, abs=0.05)
        assert res["pairs"][at] == 12 - d
    assert res["spearman"] < -0.8 and res["p_value"] < 0.01
    assert res["near"] == pytest.approx(np.mean(np.abs(np.diagonal(corr, 1))))

    # no structure: the permutation p-value is not small
    flat = layers.correlation_decay(np.random.default_rng(4).normal(size=(4000, 12)), 200, seed=0)
    assert flat["p_value"] > 0.05

    # dropped layers: distances are in the model's parameter order
    gap = layers.correlation_decay(logs[:, [0, 1, 5, 6, 7]], 50, positions=np.array([0, 1, 5, 6, 7]))
    assert gap["distance"].tolist() == [1, 2, 4, 5, 6, 7]


def test_normality_matches_scipy_and_counts_passing_layers():
    rng = np.random.default_rng(5)
    normal = rng.normal(size=(1000, 6))
    skewed = rng.exponential(size=(1000, 4))
    logs = np.column_stack([normal, skewed])
    res = layers.normality(logs, alpha=0.05)
    for j in range(10):
        k2 = stats.normaltest(logs[:, j])
        assert res["normaltest_stat"][j] == pytest.approx(k2.statistic)
        assert res["normaltest_p"][j] == pytest.approx(k2.pvalue)
        assert res["shapiro_p"][j] == pytest.approx(stats.shapiro(logs[:, j]).pvalue)
        assert res["skew"][j] == pytest.approx(stats.skew(logs[:, j]))
    expected = np.mean(res["normaltest_p"] >= 0.05)
    assert res["share_normaltest"] == expected
    assert np.all(res["normaltest_p"][6:] < 1e-6)  # exponential columns are rejected
    assert res["share_normaltest_bonferroni"] == np.mean(res["normaltest_p"] >= 0.005)


def test_qq_data_against_probplot():
    v = np.random.default_rng(6).gamma(3.0, size=500)
    probs = np.linspace(0.01, 0.99, 21)
    q = layers.qq_data(v, probs)
    np.testing.assert_allclose(q["theoretical"], stats.norm.ppf(probs))
    z = (v - v.mean()) / v.std(ddof=1)
    np.testing.assert_allclose(q["sample"], np.quantile(z, probs))
    assert q["sample"][-1] > q["theoretical"][-1]  # right-skewed: the upper tail is heavier


@pytest.mark.parametrize("k", [2.0, 7.5, 40.0])
def test_scaled_chi2_fit_recovers_k_and_c(k):
    c = 0.3
    f = c * np.random.default_rng(7).chisquare(k, size=20000)
    fit = layers.scaled_chi2_fit(f)
    shape, _, scale = stats.gamma.fit(f, floc=0)
    assert fit["k_mle"] == pytest.approx(2 * shape, rel=1e-4)
    assert fit["c_mle"] == pytest.approx(scale / 2, rel=1e-4)
    assert fit["k_mle"] == pytest.approx(k, rel=0.05) and fit["c_mle"] == pytest.approx(c, rel=0.05)
    assert fit["k_moments"] == pytest.approx(k, rel=0.1) and fit["c_moments"] == pytest.approx(c, rel=0.1)
    assert fit["ks_chi2"] < 0.015
    if k <= 7.5:  # far from log-normal at small k
        assert fit["ks_chi2"] < fit["ks_lognormal"]


def test_scaled_chi2_fit_prefers_the_lognormal_for_lognormal_data():
    f = np.exp(np.random.default_rng(8).normal(0, 1.5, size=5000))
    fit = layers.scaled_chi2_fit(f)
    assert fit["ks_lognormal"] < 0.02 < fit["ks_chi2"]
    assert np.isnan(layers.scaled_chi2_fit(np.r_[f, 0.0])["k_mle"])


def test_fisher_matrix_normalisation_and_dominance():
    rng = np.random.default_rng(9)
    g = rng.normal(size=(500, 6)) * np.array([1, 2, 3, 4, 5, 6])
    f = fim.fisher_matrix(g)
    np.testing.assert_allclose(f, np.einsum("ni,nk->ik", g, g) / 500)
    r = fim.normalised(f)
    np.testing.assert_allclose(np.diag(r), 1.0)
    np.testing.assert_allclose(r[1, 4], abs(f[1, 4]) / np.sqrt(f[1, 1] * f[4, 4]))
    hand = np.array([[4.0, -1.0], [-1.0, 2.0]])
    assert fim.diagonal_dominance(hand) == pytest.approx(3.0)

    # independent coordinates: the measured ratio is the null's; a common factor makes it far smaller
    null = fim.null_dominance(g, permutations=20, seed=0)
    assert fim.diagonal_dominance(f) == pytest.approx(null, rel=0.3)
    common = g + 5 * rng.normal(size=(500, 1))
    assert fim.diagonal_dominance(fim.fisher_matrix(common)) < 0.2 * fim.null_dominance(common, 20, 0)
    blocks = fim.block_structure(fim.fisher_matrix(common), np.array([0, 0, 0, 1, 1, 1]))
    assert blocks["across_layers"] > 0.5


def test_slice_gradients_match_per_row_autograd():
    model = shipped("vae")
    names = feature_layer_names(model)
    layers_ = [names[0], names[-1]]
    weights = fim.choose_weights(model, layers_, k=50, seed=0)
    params = dict(model.named_parameters())
    assert [len(v) for v in weights.values()] == [min(50, params[n].numel()) for n in layers_]
    assert all(len(np.unique(v)) == len(v) for v in weights.values())
    assert {k: v.tolist() for k, v in fim.choose_weights(model, layers_, 50, 0).items()} == {
        k: v.tolist() for k, v in weights.items()
    }
    x = torch.from_numpy(load_fashion_mnist("test")[0][:3].copy()).float().unsqueeze(1)
    ids = ["a", "b", "c"]
    noise = draw_noise(model.noise_spec(), ids, 0)
    g = fim.slice_gradients(model, x, noise, weights, chunk_size=2)
    for i in range(3):
        lp = model.log_prob(x[i : i + 1], {k: v[i : i + 1] for k, v in noise.items()}).sum()
        grads = torch.autograd.grad(lp, [params[n] for n in layers_])
        expected = np.concatenate(
            [gr.flatten()[weights[n]].numpy() for gr, n in zip(grads, layers_, strict=True)]
        )
        np.testing.assert_allclose(g[i], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_fisher_source_resolution():
    assert fim.resolve_source(shipped("vae"), "auto")[0] == "samples"
    assert fim.resolve_source(shipped("pixelcnn"), "auto")[0] == "data"
    assert fim.resolve_source(shipped("pixelcnn"), "samples")[0] == "samples"

    class NoSampler(DensityModel):
        name = "no_sampler"

    assert fim.resolve_source(NoSampler(), "auto")[0] == "data"
    with pytest.raises(ValueError, match="does not implement sample"):
        fim.resolve_source(NoSampler(), "samples")
    glow = shipped("glow")
    (a, discarded), (b, _) = fim.draw_samples(glow, 150, seed=1), fim.draw_samples(glow, 150, seed=1)
    assert torch.equal(a, b) and a.shape == (150, 1, 28, 28) and float(a.min()) >= 0 and float(a.max()) <= 255
    assert discarded > 0  # at temperature 1 the small Glow's reverse pass overflows on some draws


def test_transformed_input_log_det_is_the_jacobian_of_the_inverse():
    """The maps' log-dets against torch's Jacobian (slogdet) on one 28x28 row, float64."""
    y = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand((1, 28, 28), generator=gen, dtype=torch.float64) + 0.5
    for transform in (LogitMap(0.05), AffineMap(scale, torch.randn(1, 28, 28, dtype=torch.float64))):
        jac = torch.autograd.functional.jacobian(lambda t, m=transform: m.inverse(t)[0], y).reshape(784, 784)
        _, logabs = torch.linalg.slogdet(jac)
        assert float(transform.inverse(y)[1]) == pytest.approx(float(logabs), abs=1e-9)
        x = transform.inverse(y)[0]
        torch.testing.assert_close(transform(x), y)


@pytest.mark.parametrize(
    ("family", "snap"), [("glow", None), ("ddpm", False), ("pixelcnn", False), ("vae", None)]
)
def test_invariance_prop1(family, snap):
    """Prop. 1: same per-layer features at y = T(x), log p shifted by log|det J_{T^-1}(y)|."""
    model = shipped(family)
    x = torch.from_numpy(load_fashion_mnist("test")[0][:3].copy()).float().unsqueeze(1)
    noise = draw_noise(model.noise_spec(), ["r0", "r1", "r2"], 0)
    res = invariance_check(model, x, noise, LogitMap(0.05), snap=snap)
    assert res["max_rel_feature_diff"] < 1e-10
    assert res["max_shift_error"] < 1e-9 * np.max(np.abs(res["log_prob"]))
    np.testing.assert_allclose(res["log_prob_transformed"] - res["log_prob"], res["log_det"], atol=1e-8)
    assert (
        np.ptp(res["log_det"]) > 1.0 and np.min(np.abs(res["log_det"])) > 100
    )  # a real, image-dependent shift
    assert res["control_max_rel_feature_diff"] > 1e-3  # the features do move with the input
    if family == "glow":
        assert res["input"] == "dequantised x + u" and res["snap"] is False
        engine = invariance_check(model, x, noise, LogitMap(0.05), method="engine")
        assert engine["max_rel_feature_diff"] < 1e-10


def test_vae_needs_snapping_to_pixel_levels():
    """The VAE's discretised likelihood tests x against bin edges: a round trip 1e-14 off moves an edge
    pixel into another bin, so without snapping the features differ (which is why snap defaults on)."""
    model = shipped("vae")
    x = torch.from_numpy(load_fashion_mnist("test")[0][:3].copy()).float().unsqueeze(1)
    noise = draw_noise(model.noise_spec(), ["r0", "r1", "r2"], 0)
    assert invariance_check(model, x, noise, LogitMap(0.05), snap=False)["max_rel_feature_diff"] > 1e-3
    wrapped = TransformedInput(model, LogitMap(0.05))
    assert feature_layer_names(wrapped) == [f"inner.{n}" for n in feature_layer_names(model)]
    with pytest.raises(NotImplementedError):
        wrapped.hparams()


def test_config_defaults_follow_the_project_default_model():
    cfg = load_analyse_config([])
    assert cfg.model.name == default_family() and cfg.model.checkpoint.endswith(
        f"{default_family()}_fmnist_small"
    )
    glow = load_analyse_config(["model=glow", "analyse.fisher_weights=10"])
    assert glow.model.name == "glow" and "latent_dim" not in glow.model.params
    assert glow.analyse.fisher_weights == 10
    with pytest.raises(ConfigError, match=r"^unknown key analyse\.nonsense"):
        load_analyse_config(["analyse.nonsense=1"])
    with pytest.raises(ConfigError, match="group_sizes"):
        load_analyse_config(["analyse.group_sizes=[5]"])


@pytest.mark.slow
def test_end_to_end_on_local_ray(tmp_path):
    import ray

    from gradood.analysis.run import run_analysis

    out = tmp_path / "analyse"
    cfg = load_analyse_config(
        [
            f"output.uri={out}",
            "fit.size=120",
            "analyse.id_rows=40",
            "analyse.rows_per_source=20",
            "analyse.sources=[uniform_noise,fashion_mnist_inverted]",
            "analyse.fisher_samples=40",
            "analyse.fisher_null_permutations=3",
            "analyse.permutations=50",
            "analyse.invariance_rows=2",
            "extract.shard_size=120",
        ]
    )
    stop_shared_ray()
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:
        summary = run_analysis(cfg, "test")
    finally:
        ray.shutdown()
    expected_pngs = {"histograms_b1.png", "histograms_b5.png", "scatter_b1.png", "fisher_slices.png"}
    expected_pngs |= {"correlation_decay.png", "qq.png", "normality.png"}
    assert set(summary["figures"]) == expected_pngs
    for name in expected_pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((out / "analysis.json").read_text())
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and html.count("data:image/png;base64,") == 7

    # the JSON's numbers are recomputable from the feature files
    fit = pq.read_table(out / "fit" / "features").to_pandas()
    assert len(fit) == 120 == numbers["layers"]["fit_rows"]
    kept = numbers["layers"]["kept"]
    logs = np.log(np.maximum(fit[[f"sqnorm:{n}" for n in kept]].to_numpy(), 1e-30))
    p = stats.normaltest(logs, axis=0).pvalue
    normality = numbers["layers"]["normality"]
    np.testing.assert_allclose(normality["normaltest_p"], p)
    assert normality["share_normaltest"] == pytest.approx(np.mean(p >= 0.05))
    b5 = numbers["layers"]["per_group_size"]["5"]
    assert b5["counts"] == {"fashion_mnist": 8, "uniform_noise": 4, "fashion_mnist_inverted": 4}
    corpus = pq.read_table(out / "corpus_b1" / "features").to_pandas()
    assert len(corpus) == 80
    fisher = numbers["fisher"]
    assert fisher["source"] == "samples" and fisher["n"] == 40  # the VAE samples in one pass
    for entry in fisher["layers"].values():
        f = np.array(entry["fisher"])
        assert entry["dominance"] == pytest.approx(fim.diagonal_dominance(f))

    # every claim's sentence carries its own numbers
    claims = {c["claim"]: c for c in numbers["claims"]}
    assert len(claims) == 5
    decay = next(c for c in claims.values() if "decays" in c["claim"])
    assert f"{numbers['layers']['correlation']['spearman']:.2f}" in decay["text"]
    assert decay["verdict"] in html
    invariance = next(c for c in claims.values() if "Prop. 1" in c["claim"])
    assert invariance["verdict"] == "holds"
