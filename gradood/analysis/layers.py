"""Per-layer statistics of log f_j (paper Figs. 4 and 6, and its normality claim), on numpy arrays.

Inputs are ``[N, L]`` float64 matrices of log f_j (rows: images or groups of B images; columns: layers in
parameter order, see :func:`gradood.features.feature_layer_names`). Nothing here reads files or models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special, stats

from gradood.stats import auroc


def layer_separation(id_logs: np.ndarray, ood_logs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer and OOD source, the AUROC of log f_j alone (OOD positive, higher log f_j = more OOD);
    ``"separation"`` is the criterion the shown layers are picked by: the mean over sources of
    |2 AUROC - 1| (0: the layer does not tell the source from ID; 1: it separates it perfectly, in either
    direction)."""
    out = {
        name: np.array([auroc(id_logs[:, j], logs[:, j]) for j in range(id_logs.shape[1])])
        for name, logs in ood_logs.items()
    }
    out["separation"] = np.mean([np.abs(2 * a - 1) for a in out.values()], axis=0)
    return out


def choose_layers(
    separation: np.ndarray, seed: int, n_separating: int, n_random: int
) -> dict[str, list[int]]:
    """Indices of the ``n_separating`` most separating layers (ties by parameter order) and of
    ``n_random`` others drawn without replacement by ``numpy.random.default_rng(seed)``."""
    order = np.argsort(-np.asarray(separation), kind="stable")
    top = [int(j) for j in order[:n_separating]]
    rest = np.setdiff1d(np.arange(len(separation)), top)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else []
    return {"separating": top, "random": sorted(int(j) for j in drawn)}


def histograms(values: Mapping[str, np.ndarray], bins: int) -> dict[str, Any]:
    """Density histograms of one layer's log f_j per source on shared bin edges (the pooled range)."""
    pooled = np.concatenate([np.asarray(v, np.float64) for v in values.values()])
    edges = np.histogram_bin_edges(pooled, bins=bins)
    return {
        "edges": edges,
        "density": {k: np.histogram(v, bins=edges, density=True)[0] for k, v in values.items()},
    }


def correlation_decay(
    logs: np.ndarray, permutations: int = 500, seed: int = 0, positions: np.ndarray | None = None
) -> dict[str, Any]:
    """Pearson correlation of log f_j between layers against their index distance d = |i - k|.

    ``positions``: each column's index in the model's parameter order (default 0..L-1; pass them when
    some layers were dropped). Constant columns are left out. Per distance: mean |rho| and mean rho
    over the pairs at that distance.
    The decay statistic is Spearman's rank correlation between d and |rho| over all pairs (negative: nearer
    layers are more correlated); its p-value comes from permuting the layer order (``permutations`` draws,
    add-one, one-sided), the null that correlation does not depend on position in the network (pairs
    are not independent, so scipy's p-value would not be valid). ``near``/``far``: mean |rho| at the
    smallest distance (1 unless layers were dropped) and at d >= half the span of positions.
    """
    pos = np.arange(logs.shape[1]) if positions is None else np.asarray(positions, np.int64)
    keep = np.flatnonzero(np.std(logs, axis=0) > 0)
    corr = np.corrcoef(logs[:, keep], rowvar=False)
    n, pos = len(keep), pos[keep]
    if n < 3:
        raise ValueError(f"correlation decay needs at least 3 non-constant layers, got {n}")
    iu, ku = np.triu_indices(n, k=1)
    dist = np.abs(pos[ku] - pos[iu])
    abs_r = np.abs(corr[iu, ku])
    rho_obs = _spearman(dist, abs_r)
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for b in range(permutations):
        perm = pos[rng.permutation(n)]
        null[b] = _spearman(np.abs(perm[ku] - perm[iu]), abs_r)
    distance = np.unique(dist)
    at = np.searchsorted(distance, dist)
    counts = np.bincount(at, minlength=len(distance))
    span = int(pos.max() - pos.min())
    return {
        "columns": keep,
        "corr": corr,
        "distance": distance,
        "mean_abs_corr": np.bincount(at, weights=abs_r) / counts,
        "mean_corr": np.bincount(at, weights=corr[iu, ku]) / counts,
        "pairs": counts,
        "spearman": rho_obs,
        "p_value": float((1 + np.sum(null <= rho_obs)) / (permutations + 1)),
        "near": float(abs_r[dist == distance[0]].mean()),
        "far": float(abs_r[dist >= span / 2].mean()),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def normality(logs: np.ndarray, alpha: float) -> dict[str, Any]:
    """Per layer: D'Agostino-Pearson K^2 (``scipy.stats.normaltest``) and Shapiro-Wilk on log f_j, sample
    skewness and excess kurtosis, and the QQ correlation (``scipy.stats.probplot``'s r). A layer passes
    when a test does not reject normality at ``alpha``; ``share_*`` are the shares of passing layers, also
    with Bonferroni's correction over the L layers (alpha / L), the family-wise reading."""
    n_layers = logs.shape[1]
    k2 = stats.normaltest(logs, axis=0)
    shapiro = np.array([stats.shapiro(logs[:, j]) for j in range(n_layers)])
    qq_r = np.array([stats.probplot(logs[:, j])[1][2] for j in range(n_layers)])
    out = {
        "normaltest_stat": np.asarray(k2.statistic),
        "normaltest_p": np.asarray(k2.pvalue),
        "shapiro_stat": shapiro[:, 0],
        "shapiro_p": shapiro[:, 1],
        "skew": stats.skew(logs, axis=0),
        "excess_kurtosis": stats.kurtosis(logs, axis=0),
        "qq_r": qq_r,
        "alpha": alpha,
        "n": logs.shape[0],
    }
    for test in ("normaltest", "shapiro"):
        p = out[f"{test}_p"]
        out[f"share_{test}"] = float(np.mean(p >= alpha))
        out[f"share_{test}_bonferroni"] = float(np.mean(p >= alpha / n_layers))
    return out


def qq_data(values: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Standard-normal quantiles at ``probs`` and the standardised sample quantiles at the same levels."""
    v = np.asarray(values, np.float64)
    z = (v - v.mean()) / v.std(ddof=1)
    return {"theoretical": stats.norm.ppf(probs), "sample": np.quantile(z, probs)}


def gamma_shape_mle(x: np.ndarray) -> float:
    """MLE of the gamma shape a (location 0): the root of log a - digamma(a) = log mean(x) - mean(log x)."""
    s = float(np.log(np.mean(x)) - np.mean(np.log(x)))
    if not s > 0:
        raise ValueError("gamma MLE needs positive values that are not all equal")
    a = (3 - s + np.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)  # Minka's starting point, then Newton
    for _ in range(50):
        step = (np.log(a) - special.digamma(a) - s) / (1 / a - special.polygamma(1, a))
        a = max(a - step, a / 10)
        if abs(step) < 1e-12 * a:
            break
    return float(a)


def scaled_chi2_fit(f: np.ndarray) -> dict[str, float]:
    """Fit f ~ c * chi2_k, i.e. f ~ Gamma(shape k/2, scale 2c), by moments and by maximum likelihood.

    Moments: E f = c k, Var f = 2 c^2 k, so c = Var / (2 mean), k = 2 mean^2 / Var. MLE: the gamma shape
    from :func:`gamma_shape_mle`, scale = mean / shape. Goodness of fit: the Kolmogorov-Smirnov distance
    of f to the MLE fit, and of log f to the normal with its sample mean and std (the log-normal reading
    the detector uses); the smaller one describes f better. NaN for layers with a zero norm.
    """
    f = np.asarray(f, np.float64)
    nan = float("nan")
    if np.any(f <= 0) or np.ptp(f) == 0:
        return dict(k_moments=nan, c_moments=nan, k_mle=nan, c_mle=nan, ks_chi2=nan, ks_lognormal=nan)
    mean, var = f.mean(), f.var(ddof=1)
    a = gamma_shape_mle(f)
    scale = mean / a
    log_f = np.log(f)
    return {
        "k_moments": float(2 * mean**2 / var),
        "c_moments": float(var / (2 * mean)),
        "k_mle": 2 * a,
        "c_mle": float(scale / 2),
        "ks_chi2": float(stats.kstest(f, stats.gamma(a, scale=scale).cdf).statistic),
        "ks_lognormal": float(stats.kstest(log_f, stats.norm(log_f.mean(), log_f.std(ddof=1)).cdf).statistic),
    }


def chi2_fits(sqnorms: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`scaled_chi2_fit` of every column, as arrays keyed like its result."""
    fits = [scaled_chi2_fit(sqnorms[:, j]) for j in range(sqnorms.shape[1])]
    return {key: np.array([fit[key] for fit in fits]) for key in fits[0]} if fits else {}


def group_sources(member_sources: Sequence[Sequence[str]]) -> list[str | None]:
    """Each feature row's source, or None when its members come from more than one source."""
    return [s[0] if s and all(m == s[0] for m in s) else None for s in member_sources]
