"""Conformal p-values from held-out in-distribution calibration scores, and false-discovery control.

A test score s (higher = more OOD) gets p = (1 + #{calibration scores >= s}) / (n + 1). It is a valid
p-value (P(p <= a) <= a under the in-distribution hypothesis) when the calibration rows and the test row
are exchangeable, so calibration rows must never be rows a detector was fitted on. The p-values of one
night are positively dependent (PRDS; Bates et al. 2023), so Benjamini-Hochberg over them controls the
false-discovery rate; Benjamini-Yekutieli holds under any dependence.

A two-sided statistic (one whose in-distribution values can be too low as well as too high, such as
-log p(x), which likelihood models put too *low* for simple images) gets the equal-tailed conformal
p-value p = min(1, 2 min(p_low, p_high)), each side conformal against the same calibration rows
(:class:`EqualTailedCalibrator`); it stays valid, since P(p <= a) <= P(p_low <= a/2) + P(p_high <= a/2).

Conformal p-values take only the n + 1 values k / (n + 1) (an equal-tailed one k = min(n + 1, 2 k_side)),
so q-values follow from a histogram of k over the night (no sort of the whole night is needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradood.core.choices import Combination, FdrMethod

#: Storey's lambda: pi0_hat = (1 + #{p > lambda}) / (m (1 - lambda))
STOREY_LAMBDA = 0.5


def _finite_1d(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: {int((~np.isfinite(values)).sum())} non-finite values")
    return values


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

    def smooth_log_p(self, scores: np.ndarray) -> np.ndarray:
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
        if d.get("sides", 1) == 2:
            return EqualTailedCalibrator(np.asarray(d["scores"], dtype=np.float64))
        return cls(np.asarray(d["scores"], dtype=np.float64))

    def side_smooth_log_p(self, scores: np.ndarray) -> np.ndarray:
        """``[N, sides]`` smooth log p of each side (one column here: high scores are OOD)."""
        return self.smooth_log_p(scores)[:, None]

    @property
    def min_p_value(self) -> float:
        """The smallest p-value this calibration can give: 1 / (n + 1)."""
        return 1.0 / (self.n + 1)


class EqualTailedCalibrator(ConformalCalibrator):
    """Equal-tailed conformal p-values of a two-sided statistic: p = min(1, 2 min(p_low, p_high)).

    ``p_high`` is the one-sided conformal p-value of s, ``p_low`` that of -s, against the same calibration
    scores. The index is k = min(n + 1, 2 min(k_low, k_high)), so p = k / (n + 1) as for a one-sided test
    and the run's q-values still come from a histogram of k; the smallest p is 2 / (n + 1).
    """

    def __init__(self, calibration_scores: np.ndarray):
        super().__init__(calibration_scores)
        self._low = ConformalCalibrator(-self.scores)

    def p_index(self, scores: np.ndarray) -> np.ndarray:
        s = _finite_1d(scores, "scores")
        one_sided = np.minimum(super().p_index(s), self._low.p_index(-s))
        return np.minimum(self.n + 1, 2 * one_sided)

    def side_smooth_log_p(self, scores: np.ndarray) -> np.ndarray:
        """``[N, 2]``: the smooth log p of the high side and of the low side."""
        s = _finite_1d(scores, "scores")
        return np.column_stack([super().smooth_log_p(s), self._low.smooth_log_p(-s)])

    def smooth_log_p(self, scores: np.ndarray) -> np.ndarray:
        """The smooth equal-tailed log p: min(0, log 2 + the smaller side's smooth log p)."""
        return np.minimum(0.0, math.log(2.0) + self.side_smooth_log_p(scores).min(axis=1))

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.tolist(), "sides": 2}

    @property
    def min_p_value(self) -> float:
        return min(1.0, 2.0 / (self.n + 1))


class CombinedTest:
    """Components' smooth tail p-values merged into one statistic, calibrated on other rows.

    Each component's conformal calibrator turns its statistic into :meth:`ConformalCalibrator.smooth_log_p`;
    ``combination`` (Fisher's or Tippett's method) merges them; the merged statistic is calibrated
    conformally on rows none of the components was calibrated on (calibration part 2), which keeps the
    combined p-value valid however the components depend on each other.
    """

    def __init__(
        self,
        components: Sequence[ConformalCalibrator],
        combination: Combination,
        calibrator: ConformalCalibrator | None = None,
    ):
        if Combination(combination) is Combination.adaptive:
            raise ValueError("a combined test's fixed rule is fisher or tippett; adaptive builds on fisher")
        if not components:
            raise ValueError("the combination needs at least one component test")
        self.components = list(components)
        self.combination = Combination(combination)
        self.calibrator = calibrator

    def calibrate(self, statistics: np.ndarray) -> CombinedTest:
        """Calibrate on the components' statistics of calibration rows (columns in component order)."""
        self.calibrator = ConformalCalibrator(self.statistic(statistics)[0])
        return self

    def statistic(self, statistics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The combined statistic (higher = more OOD) of rows given their components' statistics
        ``[N, components]``, and per row the index of the component with the smallest tail p."""
        statistics = np.asarray(statistics, np.float64).reshape(-1, len(self.components))
        log_p = np.column_stack([c.smooth_log_p(statistics[:, k]) for k, c in enumerate(self.components)])
        return combine_log_p(log_p, self.combination)

    def p_index(self, statistic: np.ndarray) -> np.ndarray:
        """Conformal p-value indices (p = k / (n + 1)) of combined statistics."""
        if self.calibrator is None:
            raise ValueError("the combined test is not calibrated; call calibrate first")
        return self.calibrator.p_index(statistic)


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


def prevalence_floor(min_p_value: float, fdr: float, method: FdrMethod, m: int) -> float:
    """The smallest share of a night's m rows that can be OOD and still give one flag.

    BH flags the k rows with the smallest p-values only if p_(k) <= k q / m: if the OOD rows are a share
    pi of the night and all reach the smallest possible p-value, they are flagged only when
    min_p <= pi q, whatever m is. BY divides q by sum_{i<=m} 1/i. Storey's method runs BH at
    q / pi0_hat, so its floor is pi0_hat times BH's; pi0_hat is near 1 on a mostly in-distribution night,
    and the BH floor is what it is stated as.
    """
    if not 0 < fdr < 1:
        raise ValueError(f"the false-discovery rate must be in (0, 1), got {fdr}")
    c_m = float(np.sum(1.0 / np.arange(1, max(m, 1) + 1))) if FdrMethod(method) is FdrMethod.by else 1.0
    return min(1.0, min_p_value * c_m / fdr)


def q_values_from_index(
    p_index: np.ndarray, n_calibration: int, method: FdrMethod = FdrMethod.bh
) -> np.ndarray:
    """BH (or BY) adjusted p-values of conformal p-values k / (n + 1), from a histogram of k.

    Equal to ``scipy.stats.false_discovery_control`` on the p-values: q(k) = min over k' >= k of
    m c(m) (k' / (n + 1)) / #{rows with index <= k'}, capped at 1 (c(m) = 1 for BH, sum_i 1/i for BY,
    pi0_hat for Storey's method, from the same histogram: :func:`storey_pi0`).
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
    levels = np.arange(1, counts.size + 1) / counts.size
    method = FdrMethod(method)
    if method is FdrMethod.bh:
        c_m = 1.0
    elif method is FdrMethod.storey:
        c_m = storey_pi0(counts)
    else:
        c_m = float(np.sum(1.0 / np.arange(1, m + 1)))
    with np.errstate(divide="ignore"):
        ratio = np.where(at_most > 0, m * c_m * levels / np.maximum(at_most, 1), np.inf)
    return np.minimum(np.minimum.accumulate(ratio[::-1])[::-1], 1.0)


def storey_pi0(counts: np.ndarray, lam: float = STOREY_LAMBDA) -> float:
    """Storey's estimate of the in-distribution share, min(1, (1 + #{p > lambda}) / (m (1 - lambda))),
    from the histogram of p-value indices 1..n+1 (p = k / (n + 1)); the +1 keeps it valid for conformal
    p-values (Marandon et al. 2024)."""
    counts = np.asarray(counts, dtype=np.int64)
    m = int(counts.sum())
    if m == 0:
        return 1.0
    levels = np.arange(1, counts.size + 1) / counts.size
    above = int(counts[levels > lam].sum())
    return min(1.0, (1 + above) / (m * (1 - lam)))


def fdr_flags(q_values: np.ndarray, fdr: float) -> np.ndarray:
    """Rows flagged at false-discovery rate ``fdr``: exactly the rows BH/BY rejects at that level."""
    if not 0 < fdr < 1:
        raise ValueError(f"the false-discovery rate must be in (0, 1), got {fdr}")
    return np.asarray(q_values) <= fdr
