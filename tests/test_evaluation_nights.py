"""Realistic nights of the evaluation grid: TPR at a fixed FPR against its definition, night draws, and
the per-night flags, power and FDP against BH computed by scipy on the same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from gradood.evaluation.nights import (
    PREVALENCES,
    NightPool,
    draw_night,
    night_metrics,
    night_rng,
    summarise_nights,
    tpr_at_fpr,
)
from gradood.stats import DetectorSuite
from gradood.stats.adaptive import component_tail
from gradood.stats.conformal import ConformalCalibrator


def test_tpr_at_fpr_is_the_best_tpr_whose_fpr_stays_at_or_below_the_target():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(size=2000), rng.normal(2.0, 1.0, size=300)
    for fpr in (0.001, 0.01, 0.1):
        best = 0.0
        for t in np.concatenate([id_scores, ood_scores]):
            if np.mean(id_scores > t) <= fpr:
                best = max(best, float(np.mean(ood_scores > t)))
        assert tpr_at_fpr(id_scores, ood_scores, fpr) == best
    assert tpr_at_fpr(np.zeros(10), np.ones(3), 0.0) == 1.0  # perfectly separated: no ID row above
    assert tpr_at_fpr(np.ones(10), np.ones(3), 0.0) == 0.0  # ties at the threshold are negatives


def test_a_night_draws_its_share_of_ood_rows_and_a_disjoint_calibration_and_is_reproducible():
    ood_rows = np.arange(3000, 4000)
    for prevalence in PREVALENCES:
        rng = np.random.default_rng(1)
        night_id, calibration, ood = draw_night(rng, 3000, 500, ood_rows, 2000, prevalence)
        k = round(prevalence * 2000)
        assert len(ood) == len(set(ood.tolist())) == k and set(ood.tolist()) <= set(ood_rows.tolist())
        assert len(night_id) == 2000 - k and len(calibration) == 500
        assert not set(night_id.tolist()) & set(calibration.tolist())  # never a row on both sides
        assert max(night_id.max(), calibration.max()) < 3000
        again = draw_night(np.random.default_rng(1), 3000, 500, ood_rows, 2000, prevalence)
        for x, y in zip((night_id, calibration, ood), again, strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="needs"):
        draw_night(np.random.default_rng(1), 3000, 500, ood_rows[:5], 2000, 0.01)
    with pytest.raises(ValueError, match="needs"):
        draw_night(np.random.default_rng(1), 2000, 500, ood_rows, 2000, 0.01)


def _pool(rng: np.random.Generator) -> NightPool:
    fit = rng.normal(size=(3000, 4))
    fit[:, -1] = -800 + 20 * fit[:, -1]
    suite = DetectorSuite(
        combination="adaptive", calibration_fraction=0.8, part_2_fraction=0.5, random_state=0
    ).fit(fit)
    rows = rng.normal(size=(600, 4))
    rows[:, -1] = -800 + 20 * rows[:, -1]
    rows[400:, :3] += 3.0  # the OOD source: larger gradients
    source = np.array(["id"] * 400 + ["ood"] * 200)
    ids = [f"row-{i}" for i in range(len(rows))]
    return NightPool(source, ids, suite.tails(rows), suite, 0, 20_000)


def test_night_metrics_count_flags_power_and_fdp_as_bh_on_the_nights_rows():
    pool = _pool(np.random.default_rng(2))
    out = list(night_metrics(pool, ["ood"], "id", 200, 2, 0.1))
    assert {r["test"] for r in out} == {"combined", "combined_fisher"}
    assert len(out) == len(PREVALENCES) * 2 * 2 * 2  # prevalences x draws x tests x methods
    held_tails, _ = pool.held_out("id")
    n_cal = len(pool.suite.calibration_tails_.part_2)
    assert len(held_tails) == n_cal + 400
    columns = [pool.suite.tail_columns(c) for c in pool.suite.components]

    def fixed(tails: np.ndarray) -> np.ndarray:
        return 2.0 * sum(component_tail(tails, np.asarray(c)) for c in columns)

    for prevalence in PREVALENCES:
        row = next(
            r for r in out
            if r["test"] == "combined_fisher" and r["method"] == "bh" and r["draw"] == 1
            and r["prevalence"] == prevalence
        )  # fmt: skip
        night_id, cal, ood = draw_night(
            night_rng(0, "ood", prevalence, 1),
            len(held_tails),
            n_cal,
            np.flatnonzero(pool.source == "ood"),
            200,
            prevalence,
        )
        tails = np.vstack([held_tails[night_id], pool.tails[ood]])
        p = ConformalCalibrator(fixed(held_tails[cal])).p_value(fixed(tails))
        flags = false_discovery_control(p) <= 0.1
        is_ood = np.r_[np.zeros(len(night_id), bool), np.ones(len(ood), bool)]
        assert row["n_ood"] == len(ood) == round(prevalence * 200) and row["n_calibration"] == n_cal
        assert row["flagged"] == int(flags.sum())
        assert row["power"] == pytest.approx(flags[is_ood].mean())
        expected_fdp = flags[~is_ood].sum() / flags.sum() if flags.any() else 0.0
        assert row["fdp"] == pytest.approx(expected_fdp)
    # the OOD rows are far out: the default catches most of them once the night has a few
    combined = [r for r in out if r["test"] == "combined" and r["prevalence"] == 0.1]
    assert np.mean([r["power"] for r in combined]) > 0.5
    summary = summarise_nights(pd.DataFrame([{"family": "synthetic", **r} for r in out]))
    assert set(summary["draws"]) == {2}
    assert len(summary) == len(PREVALENCES) * 2 * 2
