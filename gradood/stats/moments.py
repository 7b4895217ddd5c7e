"""Mergeable sufficient statistics (count, mean, sum of squared deviations) of per-layer values.

Shards of the fit set are summarised independently and merged in any order and grouping (Chan,
Golub & LeVeque 1979), so a distributed reducer gets the same Gaussian fit as a single pass. Sums
of squares would cancel catastrophically for values far from zero; deviations from the mean do not.
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
    """Count, mean and sum of squared deviations (``m2``) per layer; ``mean``/``m2`` float64 ``[L]``."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.m2 = np.asarray(self.m2, dtype=np.float64)
        if self.count < 0 or self.mean.ndim != 1 or self.mean.shape != self.m2.shape:
            raise ValueError(
                f"invalid moments: count={self.count}, mean shape {self.mean.shape}, m2 shape {self.m2.shape}"
            )

    @property
    def num_layers(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def empty(cls, num_layers: int) -> Moments:
        return cls(0, np.zeros(num_layers), np.zeros(num_layers))

    @classmethod
    def from_values(cls, values: np.ndarray) -> Moments:
        """Two passes over one chunk ``[N, L]``: the mean first, then squared deviations from it."""
        values = as_matrix(values, "Moments.from_values")
        check_finite(values, "Moments.from_values")
        if values.shape[0] == 0:
            return cls.empty(values.shape[1])
        mean = values.mean(axis=0)
        return cls(values.shape[0], mean, np.square(values - mean).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both chunks (Chan et al.'s pairwise update)."""
        if other.num_layers != self.num_layers:
            raise ValueError(f"cannot merge moments of {self.num_layers} and {other.num_layers} layers")
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.m2.copy())
        count = self.count + other.count
        delta = other.mean - self.mean
        # stepping from one mean by a fraction of delta keeps the large common offset out of the sum
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @classmethod
    def merge_all(cls, parts: Iterable[Moments]) -> Moments:
        parts = list(parts)
        if not parts:
            raise ValueError("merge_all needs at least one Moments (the layer count is unknown otherwise)")
        return functools.reduce(cls.merge, parts)

    def variance(self, ddof: int = 0) -> np.ndarray:
        if self.count - ddof <= 0:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} rows, have {self.count}")
        return self.m2 / (self.count - ddof)

    def std(self, ddof: int = 0) -> np.ndarray:
        return np.sqrt(self.variance(ddof))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Moments:
        return cls(d["count"], np.asarray(d["mean"], dtype=np.float64), np.asarray(d["m2"], dtype=np.float64))
