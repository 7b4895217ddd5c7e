"""A combination of the suite's tests learned from the night itself, with p-values that stay valid.

The fixed combinations (Fisher, Tippett) weigh every component the same on every night, so a source that
only one component sees is diluted by the others. The adaptive combination (AdaDetect; Marandon, Lei,
Mary and Roquain, Ann. Statist. 2024) instead trains a classifier to tell a reference sample of
in-distribution rows (class 0: calibration part 1) from the *unlabelled union* of calibration part 2 and
the night's rows (class 1). Where the night holds OOD rows, the classifier learns which tests see them.

Why the p-values stay valid: the classifier sees part 2 and the night's rows as one unordered set with one
label, so for an in-distribution night row, its statistic and the part-2 statistics are exchangeable,
and its conformal p-value against part 2 is super-uniform; Benjamini-Hochberg over a night's p-values
keeps its false-discovery rate (Marandon et al., Theorem 3.3). Above ``detect.adaptive_rows`` a subsample
of that union trains it, every row with the same chance (a uniform of (seed, side, row id) below a rate);
a row that trained it and one that did not are then not exchangeable, so the guarantee holds on average
over the draw of the subsample rather than for each draw. Putting part 2 in class 0 instead would break
it: the in-sample night rows would score higher than part 2 (tested).

The classifier is monotone (a larger -log p of any test never lowers the statistic), so it can only
re-weigh and threshold the tests, never reward a row for looking *more* typical. On a night that is
almost all in-distribution it learns noise, so the night's combined test is Fisher's method over two
tails: the fixed combination's and the classifier's, both calibrated on part 1. It is close to the fixed
combination when the night holds few OOD rows and close to the classifier when it holds many
(``benchmarks/adaptive_combination.py``); its conformal p-value against part 2 is valid either way,
since both tails are functions of part 1 and of the unordered union only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from gradood.seeding import row_uniforms
from gradood.stats.conformal import ConformalCalibrator

#: the stream of the per-row uniforms that pick the rows training a night's classifier (one per side, so
#: that a calibration row and a night row with the same id, as sets of B>1 have, draw independently)
TRAINING_STREAM = "adaptive-training"
CALIBRATION_SIDE, NIGHT_SIDE = "calibration", "night"


class AdaptiveCombination(ClassifierMixin, BaseEstimator):
    """Monotone gradient-boosted classifier of reference (y=0) vs unlabelled (y=1) rows of -log p tails.

    ``X`` holds one column per component test: -log p~_k, the suite's smooth tails (higher = more OOD).
    The two classes weigh the same in total whatever their sizes; ``decision_function`` is the statistic.
    """

    def __init__(
        self,
        max_iter: int = 100,
        learning_rate: float = 0.1,
        min_samples_leaf: int = 40,
        random_state: int = 0,
    ):
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.min_samples_leaf = min_samples_leaf
        self.random_state = random_state

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # reference against unlabelled rows, nothing else
        return tags

    def fit(self, X: Any, y: Any) -> AdaptiveCombination:  # noqa: N803
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        if type_of_target(y) == "multiclass":
            raise ValueError("Only binary classification is supported: reference (0) and unlabelled (1) rows")
        self.classes_, y = np.unique(y, return_inverse=True)
        if self.classes_.size != 2:
            raise ValueError("need 2 classes, reference (0) and unlabelled (1) rows; got 1 class")
        counts = np.bincount(y, minlength=2)
        weight = (0.5 * len(y) / counts)[y]
        self.model_ = HistGradientBoostingClassifier(
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            min_samples_leaf=self.min_samples_leaf,
            monotonic_cst=[1] * X.shape[1],
            early_stopping=False,
            random_state=self.random_state,
        ).fit(X, y, sample_weight=weight)
        self.n_rows_fitted_ = counts
        self.n_iter_ = self.model_.n_iter_
        return self

    def decision_function(self, X: Any) -> np.ndarray:  # noqa: N803
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False, ensure_min_samples=0)
        return self.model_.decision_function(X) if len(X) else np.zeros(0)

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        check_is_fitted(self)
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


def training_mask(seed: int, row_ids: Sequence[str], rate: float, side: str = NIGHT_SIDE) -> np.ndarray:
    """Which rows of the unlabelled union train the classifier: each with probability ``rate``, by a
    uniform of (seed, side, row id), so a rerun, another shard layout and an in-process loop pick the
    same; ``side`` is the night's rows or calibration part 2's."""
    if rate >= 1:
        return np.ones(len(row_ids), bool)
    return row_uniforms(seed, row_ids, f"{TRAINING_STREAM}:{side}") < rate


def training_rate(max_rows: int, union_rows: int) -> float:
    """The share of the union (calibration part 2 and the night) that trains the classifier."""
    return 1.0 if union_rows <= max_rows else max_rows / union_rows


@dataclass(frozen=True)
class CalibrationTails:
    """-log p~ of every test (columns ``tests``) for calibration parts 1 and 2, and part 2's row ids."""

    tests: list[str]
    part_1: np.ndarray
    part_2: np.ndarray
    part_2_ids: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tests": self.tests,
            "part_1": self.part_1.tolist(),
            "part_2": self.part_2.tolist(),
            "part_2_ids": self.part_2_ids,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationTails:
        k = len(d["tests"])
        arrays = [np.asarray(d[p], np.float64).reshape(-1, k) for p in ("part_1", "part_2")]
        return cls(list(d["tests"]), *arrays, [str(i) for i in d["part_2_ids"]])


class AdaptiveNight:
    """One night's combined test: Fisher over the fixed combination's tail and the classifier's tail
    (both calibrated on part 1), with its own conformal calibration on part 2.

    ``fixed_columns`` holds, per component of the fixed combination, its columns of the tails: one (an
    int) for a
    one-sided test, (high, low) for a two-sided one, whose -log p~ is then the equal-tailed
    max(0, max(high, low) - log 2). The fixed statistic is Fisher's, 2 sum_k -log p~_k, as
    :func:`gradood.stats.conformal.combine_log_p` computes it.
    """

    def __init__(
        self, calibration: CalibrationTails, fixed_columns: Sequence[int | Sequence[int]], **params: Any
    ):
        self.calibration = calibration
        self.fixed_columns = [np.atleast_1d(np.asarray(c, int)) for c in fixed_columns]
        self.params = params

    def fit(self, night_tails: np.ndarray, rate: float, seed: int) -> AdaptiveNight:
        """Train on part 1 (reference) against the training rows of part 2 and ``night_tails`` (the night's
        training rows, already picked with :func:`training_mask` at the same ``rate``)."""
        cal = self.calibration
        keep = training_mask(seed, cal.part_2_ids, rate, CALIBRATION_SIDE)
        night_tails = np.asarray(night_tails, np.float64).reshape(-1, len(cal.tests))
        x = np.vstack([cal.part_1, cal.part_2[keep], night_tails])
        y = np.r_[np.zeros(len(cal.part_1), int), np.ones(int(keep.sum()) + len(night_tails), int)]
        self.model_ = AdaptiveCombination(random_state=seed, **self.params).fit(x, y)
        self.fixed_tail_ = ConformalCalibrator(self._fixed(cal.part_1))
        self.adaptive_tail_ = ConformalCalibrator(self.model_.decision_function(cal.part_1))
        self.calibrator_ = ConformalCalibrator(self.statistic(cal.part_2))
        self.training_rows_ = {
            "reference": len(cal.part_1),
            "part_2": int(keep.sum()),
            "night": len(night_tails),
        }
        return self

    def _fixed(self, tails: np.ndarray) -> np.ndarray:
        return 2.0 * sum(component_tail(tails, columns) for columns in self.fixed_columns)

    def statistic(self, tails: np.ndarray) -> np.ndarray:
        """The night's combined statistic of rows with -log p~ ``tails`` (higher = more OOD)."""
        tails = np.asarray(tails, np.float64)
        fixed = self.fixed_tail_.smooth_log_p(self._fixed(tails))
        return -(fixed + self.adaptive_tail_.smooth_log_p(self.model_.decision_function(tails)))


def component_tail(tails: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """-log p~ of one test from its one-sided tail columns: the column itself, or for a two-sided test
    (high, low) the equal-tailed -log min(1, 2 min(p~_high, p~_low))."""
    if len(columns) == 1:
        return tails[:, columns[0]]
    return np.maximum(0.0, tails[:, columns].max(axis=1) - math.log(2.0))


def adaptive_p_values(
    reference: np.ndarray, calibration: np.ndarray, night: np.ndarray, **params: Any
) -> tuple[np.ndarray, np.ndarray, AdaptiveCombination]:
    """The classifier alone: statistic and conformal p-value of every night row, from tails of the
    reference (part 1), calibration (part 2) and night rows (each ``[n, K]``, the same K tests)."""
    reference, calibration, night = (np.asarray(a, np.float64) for a in (reference, calibration, night))
    union = np.vstack([calibration, night])
    y = np.r_[np.zeros(len(reference), int), np.ones(len(union), int)]
    model = AdaptiveCombination(**params).fit(np.vstack([reference, union]), y)
    statistic = model.decision_function(night)
    calibrator = ConformalCalibrator(model.decision_function(calibration))
    return statistic, calibrator.p_value(statistic), model
