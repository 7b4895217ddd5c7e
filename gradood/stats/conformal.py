"""Conformal p-values from held-out in-distribution calibration scores, and false-discovery control.

A test score s (higher = more OOD) gets p = (1 + #{calibration scores >= s}) / (n + 1). It is a valid
p-value (P(p <= a) <= a under the in-distribution hypothesis) when the calibration rows and the test row
are exchangeable, so calibration rows must never be rows a detector was fitted on. The p-values of one
night are positively dependent (PRDS; Bates et al. 2023), so Benjamini-Hochberg over them controls the
false-discovery rate; Benjamini-Yekutieli holds under any dependence.

Conformal p-values take only the n + 1 values k / (n + 1), k = 1 + #{calibration >= s}, so q-values
follow from a histogram of k over the night (no sort of the whole night is needed).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import numpy as np


class FdrMethod(StrEnum):
    """Benjamini-Hochberg (PRDS p-values, as conformal ones are) or Benjamini-Yekutieli (any dependence)."""

    bh = "bh"
    by = "by"


def _finite_1d(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: {int((~np.isfinite(values)).sum())} non-finite values")
    return values


class Combination(StrEnum):
    """How a combined test merges its components' (smooth) log p-values into one statistic.

    ``adaptive`` learns from each night which tests see its OOD rows (:mod:`gradood.stats.adaptive`),
    on top of Fisher's method over the components.
    """

    fisher = "fisher"
    tippett = "tippett"
    adaptive = "adaptive"


def combine_log_p(log_p: np.ndarray, method: Combination) -> tuple[np.ndarray, np.ndarray]:
    """Combined statistic of ``log_p [N, K]`` (higher = more OOD) and each row's smallest component.

    Fisher: -2 sum_k log p_k; Tippett: -min_k log p_k. Neither is a p-value by itself when the
    components are dependent: calibrate the statistic on rows that did not calibrate the components.
    """
    log_p = np.asarray(log_p, dtype=np.float64)
    if Combination(method) is Combination.adaptive:
        raise ValueError("the adaptive combination is fitted per night: see gradood.stats.adaptive")
    if Combination(method) is Combination.fisher:
        stat = -2.0 * log_p.sum(axis=1)
    else:
        stat = -log_p.min(axis=1)
    return stat, np.argmin(log_p, axis=1)


class ConformalCalibrator:
    """Calibration scores of one test, sorted; p-values and a smooth tail for combining tests."""

    def __init__(self, calibration_scores: np.ndarray):
        scores = _finite_1d(calibration_scores, "calibration scores")
        if scores.size == 0:
            raise ValueError("conformal calibration needs at least one calibration score")
        self.scores = np.sort(scores)
        self.n = int(scores.size)
        values, first = np.unique(self.scores, return_index=True)
        # log p at each distinct calibration value: #{c >= u} = n - (rows below u)
        self._knots = values
        self._knot_log_p = np.log((1 + self.n - first) / (self.n + 1))
        self._tail_scale = _tail_scale(self.scores)

    def p_index(self, scores: np.ndarray) -> np.ndarray:
        """k = 1 + #{calibration >= s} in 1..n+1, so that p = k / (n + 1)."""
        s = _finite_1d(scores, "scores")
        return 1 + self.n - np.searchsorted(self.scores, s, side="left")

    def p_value(self, scores: np.ndarray) -> np.ndarray:
        return self.p_index(scores) / (self.n + 1)

    def log_tail(self, scores: np.ndarray) -> np.ndarray:
        """A continuous, non-increasing stand-in for log p used *inside* a combination statistic.

        Between calibration values it interpolates the conformal log p linearly; beyond the largest it
        keeps falling exponentially with the mean excess of the top calibration scores as the scale,
        so rows far outside the calibration range stay ordered instead of all tying at 1 / (n + 1).
        It is not itself a p-value: a combined statistic built from it is calibrated on other rows.
        """
        s = _finite_1d(scores, "scores")
        out = np.interp(s, self._knots, self._knot_log_p)
        above = s > self._knots[-1]
        out[above] = self._knot_log_p[-1] - (s[above] - self._knots[-1]) / self._tail_scale
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalCalibrator:
        return cls(np.asarray(d["scores"], dtype=np.float64))


def _tail_scale(sorted_scores: np.ndarray) -> float:
    """Mean excess of the top 5 % (at least 5) calibration scores over the next one: an exponential tail."""
    n = sorted_scores.size
    k = min(max(5, math.ceil(0.05 * n)), n - 1)
    if k >= 1:
        scale = float(np.mean(sorted_scores[n - k :] - sorted_scores[n - k - 1]))
        if scale > 0:
            return scale
    spread = float(sorted_scores[-1] - sorted_scores[0])
    return spread if spread > 0 else 1.0


def conformal_p_values(calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{calibration >= s}) / (n + 1) for every score s (higher = more OOD)."""
    return ConformalCalibrator(calibration_scores).p_value(scores)


def q_values_from_index(
    p_index: np.ndarray, n_calibration: int, method: FdrMethod = FdrMethod.bh
) -> np.ndarray:
    """BH (or BY) adjusted p-values of conformal p-values k / (n + 1), from a histogram of k.

    Equal to ``scipy.stats.false_discovery_control`` on the p-values: q(k) = min over k' >= k of
    m c(m) (k' / (n + 1)) / #{rows with index <= k'}, capped at 1 (c(m) = 1 for BH, sum_i 1/i for BY).
    """
    k = np.asarray(p_index, dtype=np.int64)
    if k.size == 0:
        return np.zeros(0)
    if k.min() < 1 or k.max() > n_calibration + 1:
        raise ValueError(f"p-value indices must lie in 1..{n_calibration + 1}")
    return q_value_table(p_index_counts(k, n_calibration), method)[k - 1]


def p_index_counts(p_index: np.ndarray, n_calibration: int) -> np.ndarray:
    """How many rows have each p-value index 1..n+1: all BH/BY needs, and it adds across blocks."""
    return np.bincount(np.asarray(p_index, dtype=np.int64), minlength=n_calibration + 2)[1:]


def q_value_table(counts: np.ndarray, method: FdrMethod = FdrMethod.bh) -> np.ndarray:
    """The q-value of each p-value index 1..n+1, given the run's ``counts`` of each index."""
    counts = np.asarray(counts, dtype=np.int64)
    m = int(counts.sum())
    at_most = np.cumsum(counts)
    c_m = 1.0 if FdrMethod(method) is FdrMethod.bh else float(np.sum(1.0 / np.arange(1, m + 1)))
    levels = np.arange(1, counts.size + 1) / counts.size
    with np.errstate(divide="ignore"):
        ratio = np.where(at_most > 0, m * c_m * levels / np.maximum(at_most, 1), np.inf)
    return np.minimum(np.minimum.accumulate(ratio[::-1])[::-1], 1.0)


def fdr_flags(q_values: np.ndarray, fdr: float) -> np.ndarray:
    """Rows flagged at false-discovery rate ``fdr``: exactly the rows BH/BY rejects at that level."""
    if not 0 < fdr < 1:
        raise ValueError(f"the false-discovery rate must be in (0, 1), got {fdr}")
    return np.asarray(q_values) <= fdr
