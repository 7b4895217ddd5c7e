"""A set-level test per run: did tonight's data as a whole shift away from the calibration data?

Per-image flags need strong evidence for each image; a night whose images are each only slightly unusual
flags nothing, yet as a whole it is not the in-distribution data. Under the in-distribution hypothesis
tonight's scores and the held-out calibration scores are exchangeable, so the one-sided Mann-Whitney U
(rank-sum) test of "tonight scores higher" is valid without any assumption on the score's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu, norm


def drift_test(night_scores: np.ndarray, calibration_scores: np.ndarray) -> dict[str, Any]:
    """One-sided Mann-Whitney U of the night's OOD scores against the calibration scores.

    Returns the p-value, the U statistic and the common-language effect size P(s_night > s_cal) + ½P(=)
    (0.5 = no shift). With no scored rows the test is undefined and the p-value is None.
    """
    night = np.asarray(night_scores, dtype=np.float64)
    night = night[np.isfinite(night)]
    calibration = np.asarray(calibration_scores, dtype=np.float64)
    base = {"test": "mann-whitney-u, one-sided (night scores higher)", "n_night": int(night.size)}
    base["n_calibration"] = int(calibration.size)
    if night.size == 0 or calibration.size == 0:
        return {**base, "statistic": None, "p_value": None, "effect": None}
    result = mannwhitneyu(night, calibration, alternative="greater", method="asymptotic")
    effect = float(result.statistic) / (night.size * calibration.size)
    return {**base, "statistic": float(result.statistic), "p_value": float(result.pvalue), "effect": effect}


# ---------------------------------------------------------------------------------------------
# the same test from a sorted, partitioned night: one small part per block, merged in block order


@dataclass(frozen=True)
class RankSumPart:
    """One block's share of the rank-sum test, from night scores sorted in one direction.

    ``twice_u`` is 2U over the block (integer, so parts add exactly); ``at_calibration`` counts the
    block's rows equal to each distinct calibration value; ties among night scores that no calibration
    score equals are runs of the sorted order, which can continue into the neighbouring blocks: the block
    keeps its first and last runs open and sums the tie term t^3 - t of the runs in between.
    """

    n: int
    twice_u: int
    at_calibration: np.ndarray
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    interior_ties: float = 0.0
    runs: int = 0


def _tie_term(t: np.ndarray | int) -> float:
    t = np.asarray(t, dtype=np.float64)
    return float(np.sum(t**3 - t))


class RankSumDrift:
    """:func:`drift_test` over a night too large for one machine, split into blocks of its sorted scores.

    ``part`` runs where a block is (no other block needed), ``result`` merges the parts on the driver in
    block order; together they give :func:`drift_test`'s statistic and tie-corrected p-value.
    """

    def __init__(self, calibration_scores: np.ndarray) -> None:
        calibration = np.asarray(calibration_scores, dtype=np.float64)
        self.calibration = np.sort(calibration)
        self.values, self.counts = np.unique(self.calibration, return_counts=True)

    def part(self, sorted_scores: np.ndarray) -> RankSumPart:
        night = np.asarray(sorted_scores, dtype=np.float64)
        night = night[np.isfinite(night)]
        if night.size > 1 and not (np.all(night[1:] >= night[:-1]) or np.all(night[1:] <= night[:-1])):
            raise ValueError("a block's scores must be sorted")
        below = np.searchsorted(self.calibration, night, side="left")
        at_most = np.searchsorted(self.calibration, night, side="right")
        slot = np.minimum(np.searchsorted(self.values, night), max(len(self.values) - 1, 0))
        hit = (self.values[slot] == night) if len(self.values) else np.zeros(night.size, bool)
        at_calibration = np.bincount(slot[hit], minlength=len(self.values))
        own = night[~hit]
        base = {
            "n": int(night.size),
            "twice_u": int(np.sum(below + at_most)),
            "at_calibration": at_calibration,
        }
        if own.size == 0:
            return RankSumPart(**base)
        starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        lengths = np.diff(np.r_[starts, own.size])
        return RankSumPart(
            **base,
            first=(float(own[0]), int(lengths[0])),
            last=(float(own[-1]), int(lengths[-1])),
            interior_ties=_tie_term(lengths[1:-1]) if lengths.size > 2 else 0.0,
            runs=int(lengths.size),
        )

    def result(self, parts: list[RankSumPart]) -> dict[str, Any]:
        n_night = sum(p.n for p in parts)
        base = {"test": "mann-whitney-u, one-sided (night scores higher)", "n_night": n_night}
        base["n_calibration"] = int(self.calibration.size)
        if n_night == 0 or self.calibration.size == 0:
            return {**base, "statistic": None, "p_value": None, "effect": None}
        ties, open_run = 0.0, None
        for part in parts:
            if part.first is None:
                continue
            value, length = part.first
            if open_run is not None and open_run[0] == value:
                length += open_run[1]
            elif open_run is not None:
                ties += _tie_term(open_run[1])
            if part.runs == 1:
                open_run = (value, length)
                continue
            ties += _tie_term(length) + part.interior_ties
            open_run = part.last
        if open_run is not None:
            ties += _tie_term(open_run[1])
        at_calibration = np.sum([p.at_calibration for p in parts], axis=0)
        ties += _tie_term(self.counts + at_calibration)
        u = sum(p.twice_u for p in parts) / 2
        n1, n2 = n_night, int(self.calibration.size)
        n = n1 + n2
        s = np.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (u - n1 * n2 / 2 - 0.5) / s
        p_value = float(np.clip(norm.sf(z), 0.0, 1.0))
        return {**base, "statistic": float(u), "p_value": p_value, "effect": u / (n1 * n2)}
