"""Mergeable sufficient statistics (count, mean, co-moment matrix) of per-row feature vectors.

Shards of the fit set are summarised independently and merged in any order and grouping (Chan,
Golub & LeVeque 1979), so a distributed reducer gets the same fit as a single pass. The co-moment
matrix C = sum_i (x_i - mean)(x_i - mean)^T carries both the per-layer variances (its diagonal, what
the paper's diagonal Gaussian needs) and the covariances a full-covariance Gaussian needs. Sums of
squares would cancel catastrophically for values far from zero; deviations from the mean do not.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


def check_finite(values: np.ndarray, what: str) -> None:
    """Raise ValueError naming the first column (and row) holding NaN or inf; never repair silently."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what}: non-finite value {values[row, col]!r} in column {col} (row {row}); "
            f"{int(bad.sum())} non-finite entries in all"
        )


def as_matrix(values: np.ndarray, what: str) -> np.ndarray:
    """A float64 ``[N, L]`` copy-free view where possible; anything but 2-D is a caller bug."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [rows, layers], got shape {values.shape}")
    return values


@dataclass
class Moments:
    """Count, mean ``[L]`` and co-moment matrix ``[L, L]`` (sum of outer products of deviations)."""

    count: int
    mean: np.ndarray
    comoment: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.comoment = np.asarray(self.comoment, dtype=np.float64)
        n = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.count < 0 or self.mean.ndim != 1 or self.comoment.shape != (n, n):
            raise ValueError(
                f"invalid moments: count={self.count}, mean shape {self.mean.shape}, "
                f"comoment shape {self.comoment.shape}"
            )

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    @property
    def m2(self) -> np.ndarray:
        """Per-feature sum of squared deviations (the co-moment diagonal)."""
        return np.diagonal(self.comoment).copy()

    @classmethod
    def empty(cls, num_features: int) -> Moments:
        return cls(0, np.zeros(num_features), np.zeros((num_features, num_features)))

    @classmethod
    def from_values(cls, values: np.ndarray) -> Moments:
        """Two passes over one chunk ``[N, L]``: the mean first, then outer products of deviations."""
        values = as_matrix(values, "Moments.from_values")
        check_finite(values, "Moments.from_values")
        if values.shape[0] == 0:
            return cls.empty(values.shape[1])
        mean = values.mean(axis=0)
        centred = values - mean
        return cls(values.shape[0], mean, centred.T @ centred)

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both chunks (Chan et al.'s pairwise update, with co-moments)."""
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge moments of {self.num_features} and {other.num_features} features")
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.comoment.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.comoment.copy())
        count = self.count + other.count
        delta = other.mean - self.mean
        # stepping from one mean by a fraction of delta keeps the large common offset out of the sum
        mean = self.mean + delta * (other.count / count)
        comoment = (
            self.comoment + other.comoment + np.outer(delta, delta) * (self.count * other.count / count)
        )
        return Moments(count, mean, comoment)

    @classmethod
    def merge_all(cls, parts: Iterable[Moments]) -> Moments:
        parts = list(parts)
        if not parts:
            raise ValueError("merge_all needs at least one Moments (the feature count is unknown otherwise)")
        return functools.reduce(cls.merge, parts)

    def select(self, columns: np.ndarray | list[int]) -> Moments:
        """The statistics of a subset of the features (what a detector on those columns needs)."""
        idx = np.asarray(columns, dtype=np.int64)
        return Moments(self.count, self.mean[idx], self.comoment[np.ix_(idx, idx)])

    def _dof(self, ddof: int) -> int:
        if self.count - ddof <= 0:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} rows, have {self.count}")
        return self.count - ddof

    def variance(self, ddof: int = 0) -> np.ndarray:
        return self.m2 / self._dof(ddof)

    def std(self, ddof: int = 0) -> np.ndarray:
        return np.sqrt(self.variance(ddof))

    def covariance(self, ddof: int = 0) -> np.ndarray:
        return self.comoment / self._dof(ddof)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "comoment": self.comoment.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Moments:
        return cls(d["count"], np.asarray(d["mean"], np.float64), np.asarray(d["comoment"], np.float64))
