"""Detectors fitted on held-out in-distribution data; both follow scikit-learn's estimator contract.

``score_samples`` is higher for more in-distribution inputs (scikit-learn's convention) and
``ood_score`` is its negation, higher for more out-of-distribution inputs (the paper's S(x)).
Fitting goes through :class:`Moments`, so a fit on one array and a fit on merged per-shard
statistics share one code path and agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from gradood.stats.moments import Moments, as_matrix, check_finite

FORMAT_VERSION = 1

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_features(sqnorms: np.ndarray, min_sqnorm: float) -> np.ndarray:
    """``log(max(f, min_sqnorm))`` in float64.

    The floor turns exact zeros (dead layers) into a finite value; tiny negative values, which ghost
    norms can produce by cancellation, land on it too. NaN or inf means a broken extraction upstream
    and raises ValueError naming the column.
    """
    sqnorms = as_matrix(sqnorms, "squared gradient norms")
    check_finite(sqnorms, "squared gradient norms")
    return np.log(np.maximum(sqnorms, min_sqnorm))


def _check_format(d: dict[str, Any], kind: str) -> None:
    if d.get("kind") != kind or d.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"expected a {kind} of format_version {FORMAT_VERSION}, "
            f"got kind={d.get('kind')!r} format_version={d.get('format_version')!r}"
        )


class LogGaussianDetector(BaseEstimator):
    """One Gaussian per layer on the log squared gradient norm; layers treated as independent.

    Layers whose log-norm hardly varies on the fit set (std < ``min_std``) would dominate every score
    through a near-zero variance, so they are dropped and listed in ``dropped_layers_``.
    """

    def __init__(self, min_sqnorm: float = 1e-30, min_std: float = 1e-12, ddof: int = 0):
        self.min_sqnorm = min_sqnorm
        self.min_std = min_std
        self.ddof = ddof

    def fit(self, sqnorms: np.ndarray, layer_names: Sequence[str]) -> LogGaussianDetector:
        """Fit on raw squared norms ``[N, L]`` of held-out in-distribution rows."""
        self._check_params()
        return self.fit_moments(Moments.from_values(log_features(sqnorms, self.min_sqnorm)), layer_names)

    def fit_moments(self, moments: Moments, layer_names: Sequence[str]) -> LogGaussianDetector:
        """Fit from merged :class:`Moments` of ``log_features`` (how the distributed reducer fits)."""
        self._check_params()
        names = [str(n) for n in layer_names]
        if len(names) != moments.num_layers:
            raise ValueError(f"{len(names)} layer names for {moments.num_layers} feature columns")
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")
        if moments.count < 2:
            raise ValueError(f"fitting needs at least 2 rows, got {moments.count}")
        std = moments.std(self.ddof)
        keep = std >= self.min_std
        if not keep.any():
            raise ValueError(f"every layer has a log-norm std below min_std={self.min_std}")
        self._set_fitted(
            all_names=names,
            kept=[n for n, k in zip(names, keep, strict=True) if k],
            mean=moments.mean[keep],
            std=std[keep],
            n_fit=moments.count,
        )
        return self

    def _check_params(self) -> None:
        if not self.min_sqnorm > 0:
            raise ValueError(f"min_sqnorm must be > 0 (it is the floor inside a log), got {self.min_sqnorm}")
        if not self.min_std >= 0:
            raise ValueError(f"min_std must be >= 0, got {self.min_std}")

    def _set_fitted(
        self, all_names: list[str], kept: list[str], mean: np.ndarray, std: np.ndarray, n_fit: int
    ) -> None:
        self.all_layer_names_ = all_names
        self.layer_names_ = kept
        kept_set = set(kept)
        self.dropped_layers_ = [n for n in all_names if n not in kept_set]
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.std_ = np.asarray(std, dtype=np.float64)
        self.n_fit_ = int(n_fit)
        column = {n: i for i, n in enumerate(all_names)}
        self.kept_columns_ = np.array([column[n] for n in kept], dtype=np.int64)

    def zscores(self, sqnorms: np.ndarray) -> np.ndarray:
        """``(log f_j - mu_j) / sigma_j`` for the kept layers, ``[N, L_kept]``."""
        check_is_fitted(self)
        sqnorms = as_matrix(sqnorms, "squared gradient norms")
        if sqnorms.shape[1] != len(self.all_layer_names_):
            raise ValueError(
                f"expected {len(self.all_layer_names_)} feature columns (the fit's layers), "
                f"got {sqnorms.shape[1]}"
            )
        # the whole input is checked, so an error names the caller's column and a dropped layer's NaN
        # (a broken extraction) is not hidden
        logs = log_features(sqnorms, self.min_sqnorm)[:, self.kept_columns_]
        return (logs - self.mean_) / self.std_

    def score_samples(self, sqnorms: np.ndarray) -> np.ndarray:
        """Sum over kept layers of ``log N(log f_j; mu_j, sigma_j^2)``; higher = more in-distribution."""
        z = self.zscores(sqnorms)
        return -0.5 * np.square(z).sum(axis=1) - (np.log(self.std_).sum() + _LOG_SQRT_2PI * z.shape[1])

    def ood_score(self, sqnorms: np.ndarray) -> np.ndarray:
        """The paper's S(x) = -score_samples; higher = more out-of-distribution."""
        return -self.score_samples(sqnorms)

    def top_layers(self, sqnorms: np.ndarray, k: int = 3) -> tuple[list[list[str]], np.ndarray]:
        """Per row, the ``k`` kept layers with the largest ``|z|`` (largest first) and their signed z."""
        z = self.zscores(sqnorms)
        if not 1 <= k <= z.shape[1]:
            raise ValueError(f"k must be in [1, {z.shape[1]}] (the number of kept layers), got {k}")
        order = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :k]
        names = [[self.layer_names_[j] for j in row] for row in order]
        return names, np.take_along_axis(z, order, axis=1)

    def to_dict(self) -> dict[str, Any]:
        """All parameters and fitted state as plain JSON types; floats survive a JSON round trip exactly."""
        check_is_fitted(self)
        return {
            "kind": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "params": self.get_params(),
            "all_layer_names": list(self.all_layer_names_),
            "layer_names": list(self.layer_names_),
            "mean": self.mean_.tolist(),
            "std": self.std_.tolist(),
            "n_fit": self.n_fit_,
            "dropped_layers": list(self.dropped_layers_),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogGaussianDetector:
        _check_format(d, cls.__name__)
        det = cls(**d["params"])
        det._set_fitted(d["all_layer_names"], d["layer_names"], d["mean"], d["std"], d["n_fit"])
        if det.dropped_layers_ != list(d["dropped_layers"]):
            raise ValueError("inconsistent detector dict: dropped_layers do not match the layer lists")
        return det


def _nll_column(log_prob: np.ndarray) -> np.ndarray:
    log_prob = np.asarray(log_prob, dtype=np.float64)
    if log_prob.ndim != 1:
        raise ValueError(f"log_prob: expected a 1-D array [rows], got shape {log_prob.shape}")
    nll = -log_prob[:, None]
    check_finite(nll, "log_prob")
    return nll


class TypicalityTest(BaseEstimator):
    """Nalisnick et al.'s typicality baseline: distance of the NLL from the fit set's mean NLL (H_hat)."""

    def fit(self, log_prob: np.ndarray) -> TypicalityTest:
        """Fit on per-row log-likelihoods ``[N]`` of held-out in-distribution rows."""
        return self._set_fitted(Moments.from_values(_nll_column(log_prob)))

    @classmethod
    def from_moments(cls, m: Moments) -> TypicalityTest:
        """Fit from merged :class:`Moments` with one column holding ``-log_prob``."""
        if m.num_layers != 1:
            raise ValueError(f"typicality moments must have one column (-log_prob), got {m.num_layers}")
        return cls()._set_fitted(m)

    def _set_fitted(self, m: Moments) -> TypicalityTest:
        if m.count < 1:
            raise ValueError("fitting the typicality test needs at least 1 row")
        self.entropy_ = float(m.mean[0])
        self.n_fit_ = m.count
        return self

    def ood_score(self, log_prob: np.ndarray) -> np.ndarray:
        """``|-log_prob - entropy_|``; higher = more out-of-distribution."""
        check_is_fitted(self)
        return np.abs(_nll_column(log_prob)[:, 0] - self.entropy_)

    def score_samples(self, log_prob: np.ndarray) -> np.ndarray:
        """``-ood_score``; higher = more in-distribution."""
        return -self.ood_score(log_prob)

    def to_dict(self) -> dict[str, Any]:
        check_is_fitted(self)
        return {
            "kind": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "entropy": self.entropy_,
            "n_fit": self.n_fit_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TypicalityTest:
        _check_format(d, cls.__name__)
        det = cls()
        det.entropy_ = float(d["entropy"])
        det.n_fit_ = int(d["n_fit"])
        return det
