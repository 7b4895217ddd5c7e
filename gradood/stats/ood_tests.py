"""Single OOD tests over gradient features, each a scikit-learn estimator.

Every test takes a float matrix ``X [rows, features]`` (a pandas DataFrame sets ``feature_names_in_``),
``fit(X)`` returns self, ``score_samples`` is higher for more in-distribution rows (scikit-learn's
convention) and ``ood_score`` is its negation (higher = more OOD). Tests with parameters also fit from
merged :class:`Moments` (``fit_moments``), so the distributed reducer and a one-array fit share one code
path. In gradood the columns are log f_j (one per layer) and, where a test says so, log p(x):

- ``DiagonalGaussian`` — the paper's S(x): independent Gaussians on log f_j;
- ``ShrinkageGaussian`` — a full-covariance Gaussian with OAS shrinkage on standardised columns;
- ``FisherLayers`` — Fisher's method -2 sum_j log p_j over two-sided per-layer normal p-values;
- ``GradNorm`` — the naive score: log of the total squared gradient norm, log sum_j f_j;
- ``Typicality`` — |-log p(x) - H_hat| (Nalisnick et al.'s typicality test); two-sided: its signed
  ``statistic`` -log p(x) - H_hat is calibrated equal-tailed, since in-distribution log-likelihoods are
  skewed and simple images get *higher* likelihoods than the training data;
- ``NegLogLikelihood`` — -log p(x), the likelihood score the paper shows failing.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

from gradood.stats.moments import Moments

FORMAT_VERSION = 5

_LOG_2PI = math.log(2 * math.pi)


def check_format(d: dict[str, Any], kind: str) -> None:
    if d.get("kind") != kind or d.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"expected a {kind} of format_version {FORMAT_VERSION}, got kind={d.get('kind')!r} "
            f"format_version={d.get('format_version')!r}; refit the detector with this gradood version"
        )


class OODTest(BaseEstimator):
    """Shared fit/score plumbing; subclasses set ``_fitted`` and implement ``_fit`` and ``_score``."""

    #: fitted attributes saved by ``to_dict`` (besides n_features_in_ / feature_names_in_)
    _fitted: ClassVar[tuple[str, ...]] = ()
    _min_rows: ClassVar[int] = 1
    #: two-sided tests are calibrated on their signed ``statistic`` with equal-tailed p-values; a
    #: one-sided test's statistic is its ood_score
    two_sided: ClassVar[bool] = False

    def fit(self, X: Any, y: None = None) -> OODTest:  # noqa: N803 (scikit-learn's name)
        """Fit on held-out in-distribution rows; ``y`` is ignored (scikit-learn's signature)."""
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=self._min_rows)
        self._fit(Moments.from_values(X))
        return self

    def fit_moments(self, moments: Moments, feature_names: list[str] | None = None) -> OODTest:
        """Fit from merged :class:`Moments` of the columns (how the distributed reducer fits)."""
        if moments.count < self._min_rows:
            raise ValueError(
                f"{type(self).__name__} needs at least {self._min_rows} rows, got {moments.count}"
            )
        self.n_features_in_ = moments.num_features
        if feature_names is not None:
            if len(feature_names) != moments.num_features:
                raise ValueError(f"{len(feature_names)} feature names for {moments.num_features} columns")
            self.feature_names_in_ = np.asarray(feature_names, dtype=object)
        self._fit(moments)
        return self

    def _fit(self, moments: Moments) -> None:
        self.n_fit_ = moments.count

    def _validated(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    def score_samples(self, X: Any) -> np.ndarray:  # noqa: N803
        """Higher = more in-distribution."""
        return -self._score(self._validated(X))

    def ood_score(self, X: Any) -> np.ndarray:  # noqa: N803
        """Higher = more out-of-distribution."""
        return self._score(self._validated(X))

    def ood_score_of(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """:meth:`ood_score` of rows already validated."""
        return self._score(X)

    def statistic(self, X: Any) -> np.ndarray:  # noqa: N803
        """What conformal calibration ranks: ood_score, or for a two-sided test its signed deviation."""
        return self.statistic_of(self._validated(X))

    def statistic_of(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """:meth:`statistic` of rows already validated (the suite passes column slices of its matrix)."""
        return self._score(X)

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Parameters and fitted state as plain JSON types; floats survive a JSON round trip exactly."""
        check_is_fitted(self)
        names = getattr(self, "feature_names_in_", None)
        return {
            "kind": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "params": self.get_params(),
            "n_features_in": int(self.n_features_in_),
            "feature_names_in": None if names is None else [str(n) for n in names],
            "fitted": {k: _to_json(getattr(self, k)) for k in ("n_fit_", *self._fitted)},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODTest:
        check_format(d, cls.__name__)
        test = cls(**d["params"])
        test.n_features_in_ = int(d["n_features_in"])
        if d["feature_names_in"] is not None:
            test.feature_names_in_ = np.asarray(d["feature_names_in"], dtype=object)
        for key, value in d["fitted"].items():
            setattr(test, key, np.asarray(value) if isinstance(value, list) else value)
        return test


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class DiagonalGaussian(OODTest):
    """One Gaussian per column, columns independent: S(x) = -sum_j log N(x_j; mu_j, sigma_j^2).

    Columns whose std on the fit rows is below ``min_std`` would dominate every score through a
    near-zero variance, so they are dropped (``kept_`` is False for them).
    """

    _fitted = ("mean_", "std_", "kept_")
    _min_rows = 2

    def __init__(self, min_std: float = 1e-12, ddof: int = 0):
        self.min_std = min_std
        self.ddof = ddof

    def _fit(self, moments: Moments) -> None:
        if not self.min_std >= 0:
            raise ValueError(f"min_std must be >= 0, got {self.min_std}")
        super()._fit(moments)
        std = moments.std(self.ddof)
        kept = std >= self.min_std
        if not kept.any():
            raise ValueError(f"every column has a std below min_std={self.min_std}")
        self.kept_ = kept
        self.mean_ = moments.mean[kept]
        self.std_ = std[kept]

    def zscores(self, X: Any) -> np.ndarray:  # noqa: N803
        """``(x_j - mu_j) / sigma_j`` for the kept columns, ``[N, kept]``."""
        return self.zscores_of(self._validated(X))

    def zscores_of(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """:meth:`zscores` of rows already validated (the suite passes column slices of its matrix)."""
        return (X[:, np.asarray(self.kept_, bool)] - self.mean_) / self.std_

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        z = self.zscores_of(X)
        return 0.5 * np.square(z).sum(axis=1) + np.log(self.std_).sum() + 0.5 * _LOG_2PI * z.shape[1]


class FisherLayers(DiagonalGaussian):
    """Fisher's method over per-column two-sided normal p-values: -2 sum_j log(2 Phi(-|z_j|)).

    (The paper's reference code sums 2 min(cdf, 1 - cdf) instead, which is not Fisher's method.)
    """

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        log_p = math.log(2.0) + norm.logsf(np.abs(self.zscores_of(X)))
        return -2.0 * log_p.sum(axis=1)


class ShrinkageGaussian(OODTest):
    """Full-covariance Gaussian on standardised columns, the correlation matrix shrunk by OAS.

    OAS (Chen et al. 2010) needs only the count and the empirical covariance, so it fits from merged
    moments; Ledoit-Wolf's shrinkage needs fourth moments, which do not merge as cheaply. Standardising
    first keeps layers with large log-norm spread from setting the shrinkage target for all others.
    Columns with std below ``min_std`` are dropped as in :class:`DiagonalGaussian`.
    """

    _fitted = ("mean_", "std_", "kept_", "precision_", "logdet_", "shrinkage_")
    _min_rows = 2

    def __init__(self, min_std: float = 1e-12):
        self.min_std = min_std

    def _fit(self, moments: Moments) -> None:
        super()._fit(moments)
        std = moments.std()
        kept = std >= self.min_std
        if not kept.any():
            raise ValueError(f"every column has a std below min_std={self.min_std}")
        idx = np.flatnonzero(kept)
        corr = moments.covariance()[np.ix_(idx, idx)] / np.outer(std[idx], std[idx])
        shrunk, self.shrinkage_ = oas_shrink(corr, moments.count)
        chol = np.linalg.cholesky(shrunk)
        inv_chol = np.linalg.solve(chol, np.eye(len(idx)))
        self.precision_ = inv_chol.T @ inv_chol
        self.logdet_ = float(2 * np.log(np.diag(chol)).sum() + 2 * np.log(std[idx]).sum())
        self.kept_, self.mean_, self.std_ = kept, moments.mean[idx], std[idx]

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        z = (X[:, np.asarray(self.kept_, bool)] - self.mean_) / self.std_
        mahalanobis = np.einsum("ij,jk,ik->i", z, self.precision_, z)
        return 0.5 * (mahalanobis + self.logdet_ + _LOG_2PI * z.shape[1])


def oas_shrink(cov: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """scikit-learn's OAS estimate from an empirical covariance (ddof=0) and the row count."""
    p = cov.shape[0]
    if p == 1:
        return cov.copy(), 0.0
    alpha = np.mean(cov**2)
    mu = np.trace(cov) / p
    den = (n + 1) * (alpha - mu**2 / p)
    shrinkage = 1.0 if den == 0 else min((alpha + mu**2) / den, 1.0)
    shrunk = (1.0 - shrinkage) * cov
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk, float(shrinkage)


class Typicality(OODTest):
    """|-sum_d x_d - H_hat|, with H_hat the fit rows' mean of -sum_d x_d (columns: log-likelihood terms).

    Two-sided: the signed ``statistic`` -sum_d x_d - H_hat is positive for rows less likely than typical
    and negative for rows more likely, and each side is calibrated on its own (equal-tailed).
    """

    _fitted = ("entropy_",)
    two_sided = True

    def _fit(self, moments: Moments) -> None:
        super()._fit(moments)
        self.entropy_ = float(-moments.mean.sum())

    def statistic_of(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return -X.sum(axis=1) - self.entropy_

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return np.abs(self.statistic_of(X))


class NegLogLikelihood(OODTest):
    """-sum_d x_d: the likelihood score (columns: log-likelihood terms); nothing to fit but the width."""

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return -X.sum(axis=1)


class ComplexityCorrected(OODTest):
    """-log2 p(x) - L(x): the likelihood in bits minus the input's compressed size in bits (columns: log p
    in nats, then L(x) from :func:`gradood.stats.layout.png_bits`); Serra et al. 2020's S(x).

    A simple image (a digit, a glyph) has a high likelihood because it is simple, and a short PNG for the
    same reason: subtracting L(x) leaves what the model finds surprising beyond the input's complexity.
    Higher = more OOD; nothing to fit.
    """

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        if X.shape[1] != 2:
            raise ValueError(f"ComplexityCorrected reads log p and complexity bits, got {X.shape[1]} columns")
        return -X[:, 0] / np.log(2.0) - X[:, 1]


class GradNorm(OODTest):
    """log sum_j exp(x_j) over log-norm columns: the log squared norm of the whole gradient."""

    def _score(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return logsumexp(X, axis=1)


TESTS: dict[str, type[OODTest]] = {
    cls.__name__: cls
    for cls in (
        DiagonalGaussian,
        FisherLayers,
        ShrinkageGaussian,
        Typicality,
        NegLogLikelihood,
        ComplexityCorrected,
        GradNorm,
    )
}


def ood_test_from_dict(d: dict[str, Any]) -> OODTest:
    """Rebuild any saved test; an unknown kind or an old format is refused with the reason."""
    kind = d.get("kind")
    if kind not in TESTS:
        raise ValueError(f"unknown OOD test kind {kind!r}; known: {', '.join(sorted(TESTS))}")
    return TESTS[kind].from_dict(d)
