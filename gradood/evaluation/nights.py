"""Realistic nights: mostly in-distribution, a share pi of one OOD source, as a lake's night is.

The grid's own night is mostly OOD, which says how well a test ranks but not what its flags do when a
new kind of image is 0.5-10 % of a night. Here each night is ``night_rows`` rows: ``round(pi * night_rows)``
of one far-OOD source and the rest in-distribution rows the models never saw, drawn again for every
draw. The conformal guarantee is about a calibration set and a night that are exchangeable, so each draw
also re-draws calibration part 2: the night's in-distribution rows and part 2 are disjoint random
subsets of one held-out pool (part 2 of the fit set and the grid's held-out FashionMNIST rows). A fixed
part 2 against a fixed pool would measure one split only: the same few atypical in-distribution images
would count as false discoveries in every night.

Two tests, both calibrated on part 2: the default (the adaptive combination, refitted on each night,
as the job does) and the fixed Fisher combination of its components. Per night: how many rows BH (and
Storey's adaptive BH) flag at the target, the share of the OOD rows flagged (power), the share of flags
that are in-distribution (the false-discovery proportion, FDP; the FDR is its mean), and the TPR at a
false-positive rate of 0.1 % and 1 % (threshold set on the night's in-distribution rows).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradood.stats.adaptive import (
    AdaptiveNight,
    CalibrationTails,
    component_tail,
    training_mask,
    training_rate,
)
from gradood.stats.conformal import ConformalCalibrator, FdrMethod, fdr_flags, q_values_from_index
from gradood.stats.suite import DetectorSuite

#: OOD shares of the nights, and the false-positive rates of the TPR columns
PREVALENCES = (0.005, 0.01, 0.02, 0.05, 0.1)
TPR_FPRS = (0.001, 0.01)
FLAG_METHODS = (FdrMethod.bh, FdrMethod.storey)
ADAPTIVE, FIXED = "combined", "combined_fisher"


@dataclass(frozen=True)
class NightPool:
    """A grid run's rows to draw nights from: every corpus row's source, id and tails (-log p~ of every
    test's sides), and the suite whose calibration parts hold the rest of the held-out pool."""

    source: np.ndarray
    ids: list[str]
    tails: np.ndarray
    suite: DetectorSuite
    seed: int
    adaptive_rows: int

    def held_out(self, id_source: str) -> tuple[np.ndarray, list[str]]:
        """The held-out pool's tails and ids: calibration part 2, then the corpus's in-distribution rows."""
        part_2 = self.suite.calibration_tails_
        is_id = self.source == id_source
        corpus_ids = [i for i, keep in zip(self.ids, is_id, strict=True) if keep]
        ids = [f"part-2:{i}" for i in part_2.part_2_ids] + corpus_ids
        return np.vstack([part_2.part_2, self.tails[is_id]]), ids


def tpr_at_fpr(id_scores: np.ndarray, ood_scores: np.ndarray, fpr: float) -> float:
    """Share of OOD rows scoring above the threshold that lets at most ``fpr`` of the ID rows through
    (floor(fpr * n_id) ID rows above it; higher score = more OOD, ties at the threshold are negatives)."""
    id_scores = np.sort(np.asarray(id_scores, np.float64))[::-1]
    if id_scores.size == 0 or np.size(ood_scores) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * id_scores.size + 1e-9))
    if allowed >= id_scores.size:
        return 1.0
    return float(np.mean(np.asarray(ood_scores) > id_scores[allowed]))


def draw_night(
    rng: np.random.Generator, held_out: int, n_calibration: int, ood_rows: np.ndarray, size: int,
    prevalence: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One night's draw: positions in the held-out pool of its in-distribution rows and of the
    calibration rows (disjoint), and its OOD rows (``round(prevalence * size)`` of ``ood_rows``)."""
    k = int(round(prevalence * size))
    if k < 1 or k > ood_rows.size or size - k + n_calibration > held_out:
        raise ValueError(
            f"a night of {size} rows at {prevalence:.3%} OOD needs {k} >= 1 of {ood_rows.size} OOD rows "
            f"and {size - k} + {n_calibration} calibration rows of {held_out} held-out rows"
        )
    order = rng.permutation(held_out)
    night_id, calibration = order[: size - k], order[size - k : size - k + n_calibration]
    return np.sort(night_id), np.sort(calibration), np.sort(rng.choice(ood_rows, k, replace=False))


def night_rng(seed: int, source: str, prevalence: float, draw: int) -> np.random.Generator:
    """The generator of one night's draw: from the seed, the source, the OOD share and the draw."""
    return np.random.default_rng([seed, zlib.crc32(source.encode()), round(prevalence * 1e6), draw])


def night_tests(
    pool: NightPool, night_tails: np.ndarray, night_ids: list[str], cal_tails: np.ndarray, cal_ids: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """(scores, p-value indices, n_cal) of the night's rows for the adaptive default, refitted on this
    night as the job fits it, and for the fixed Fisher combination, both calibrated on ``cal_tails``."""
    suite = pool.suite
    columns = [suite.tail_columns(c) for c in suite.components]
    calibration = CalibrationTails(
        suite.calibration_tails_.tests, suite.calibration_tails_.part_1, cal_tails, cal_ids
    )
    rate = training_rate(pool.adaptive_rows, len(night_ids) + len(cal_ids))
    train = training_mask(pool.seed, night_ids, rate)
    night = AdaptiveNight(calibration, columns).fit(night_tails[train], rate, pool.seed)
    adaptive = night.statistic(night_tails)

    def fixed(tails: np.ndarray) -> np.ndarray:
        return 2.0 * sum(component_tail(tails, np.asarray(c)) for c in columns)

    fixed_calibrator = ConformalCalibrator(fixed(cal_tails))
    stat = fixed(night_tails)
    return {
        ADAPTIVE: (adaptive, night.calibrator_.p_index(adaptive), night.calibrator_.n),
        FIXED: (stat, fixed_calibrator.p_index(stat), fixed_calibrator.n),
    }


def night_metrics(
    pool: NightPool, far_sources: list[str], id_source: str, size: int, draws: int, fdr: float
) -> Iterator[dict]:
    """One row per (source, prevalence, draw, test, flag method); a share that gives a night of ``size``
    rows no OOD row, or more than the source has, is left out."""
    held_tails, held_ids = pool.held_out(id_source)
    n_calibration = len(pool.suite.calibration_tails_.part_2)
    for source in far_sources:
        ood_rows = np.flatnonzero(pool.source == source)
        for prevalence in PREVALENCES:
            if not 1 <= round(prevalence * size) <= ood_rows.size:
                continue
            for draw in range(draws):
                rng = night_rng(pool.seed, source, prevalence, draw)
                night_id, cal, ood = draw_night(rng, len(held_ids), n_calibration, ood_rows, size, prevalence)
                night_tails = np.vstack([held_tails[night_id], pool.tails[ood]])
                night_ids = [held_ids[i] for i in night_id] + [pool.ids[i] for i in ood]
                is_ood = np.r_[np.zeros(len(night_id), bool), np.ones(len(ood), bool)]
                tests = night_tests(pool, night_tails, night_ids, held_tails[cal],
                                            [held_ids[i] for i in cal])  # fmt: skip
                for name, (score, p_index, n_cal) in tests.items():
                    tpr = {
                        f"tpr_at_fpr_{fpr:g}": tpr_at_fpr(score[~is_ood], score[is_ood], fpr)
                        for fpr in TPR_FPRS
                    }
                    for method in FLAG_METHODS:
                        flags = fdr_flags(q_values_from_index(p_index, n_cal, method), fdr)
                        n_flagged = int(flags.sum())
                        yield {
                            "source": source, "prevalence": prevalence, "draw": draw, "test": name,
                            "method": method.value, "n_rows": len(is_ood), "n_ood": int(is_ood.sum()),
                            "n_calibration": n_cal, "flagged": n_flagged,
                            "power": float(flags[is_ood].mean()),
                            "fdp": float(flags[~is_ood].sum() / n_flagged) if n_flagged else 0.0,
                            **tpr,
                        }  # fmt: skip


def summarise_nights(nights: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over draws per (family, source, prevalence, test, method)."""
    keys = ["family", "source", "prevalence", "test", "method"]
    metrics = ["power", "fdp", "flagged", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"]
    grouped = nights.groupby(keys, sort=False)[metrics]
    out = grouped.mean().add_prefix("mean_").join(grouped.std(ddof=1).add_prefix("std_"))
    out["draws"] = grouped.size()
    return out.reset_index()
