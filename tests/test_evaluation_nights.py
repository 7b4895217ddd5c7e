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


def test_a_night_draws_its_share_of_ood_rows_and_is_reproducible():
    id_rows, ood_rows = np.arange(2000), np.arange(2000, 3000)
    for prevalence in PREVALENCES:
        rows = draw_night(np.random.default_rng(1), id_rows, ood_rows, 2000, prevalence)
        assert len(rows) == len(set(rows.tolist())) == 2000
        assert int((rows >= 2000).sum()) == round(prevalence * 2000)
        again = draw_night(np.random.default_rng(1), id_rows, ood_rows, 2000, prevalence)
        np.testing.assert_array_equal(rows, again)
    with pytest.raises(ValueError, match="needs"):
        draw_night(np.random.default_rng(1), id_rows, ood_rows[:5], 2000, 0.01)


def _pool(rng: np.random.Generator) -> tuple[NightPool, np.ndarray]:
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
    return NightPool(source, ids, suite.tails(rows), suite, 0, 20_000), rows


def test_night_metrics_count_flags_power_and_fdp_as_bh_on_the_nights_rows():
    rng = np.random.default_rng(2)
    pool, rows = _pool(rng)
    score = pool.suite.test_scores("paper", rows)
    p_index = pool.suite.calibrator("paper").p_index(score)
    n_cal = pool.suite.calibration_size("paper")
    fixed = {"paper": (score, p_index, n_cal)}
    out = list(night_metrics(pool, fixed, "combined", ["ood"], "id", 200, 2, 0.1))
    assert {r["detector"] for r in out} == {"combined", "paper"}
    assert len(out) == len(PREVALENCES) * 2 * 2 * 2  # prevalences x draws x detectors x methods
    for prevalence in PREVALENCES:
        row = next(
            r for r in out
            if r["detector"] == "paper" and r["method"] == "bh" and r["draw"] == 1
            and r["prevalence"] == prevalence
        )  # fmt: skip
        night = draw_night(
            night_rng(0, "ood", prevalence, 1),
            np.flatnonzero(pool.source == "id"),
            np.flatnonzero(pool.source == "ood"),
            200,
            prevalence,
        )
        flags = false_discovery_control(p_index[night] / (n_cal + 1)) <= 0.1
        is_ood = pool.source[night] == "ood"
        assert row["n_ood"] == int(is_ood.sum()) == round(prevalence * 200)
        assert row["flagged"] == int(flags.sum())
        assert row["power"] == pytest.approx(flags[is_ood].mean())
        expected_fdp = flags[~is_ood].sum() / flags.sum() if flags.any() else 0.0
        assert row["fdp"] == pytest.approx(expected_fdp)
    # the OOD rows are far out: the default catches most of them once the night has a few
    combined = [r for r in out if r["detector"] == "combined" and r["prevalence"] == 0.1]
    assert np.mean([r["power"] for r in combined]) > 0.5
    summary = summarise_nights(pd.DataFrame([{"family": "synthetic", **r} for r in out]))
    assert set(summary["draws"]) == {2}
    assert len(summary) == len(PREVALENCES) * 2 * 2
