"""Ranking a run block by block equals ranking it in one place (scipy's BH, numpy's lexsort, scipy's U)."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import false_discovery_control

from gradood.pipeline.ranking import (
    FIRST_COLUMNS,
    block_stats,
    finish_block,
    merge_flagged_by_driver,
    merge_histograms,
    merge_stats,
    top_level_group,
)
from gradood.stats.conformal import FdrMethod
from gradood.stats.drift import RankSumDrift, drift_test


def scored_rows(rng, n, n_calibration, root="/corpus"):
    folders = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    n_rows = np.where(rng.random(n) < 0.05, 1, 2)  # sets of 2; 5 % lost a member
    return pa.table(
        {
            "id": [f"{root}/{f}/{i}.png" for i, f in enumerate(folders)],
            "ood_score": np.round(rng.normal(size=n), 2),  # ties, broken by row order
            # a tenth of the rows far out, so that some are flagged
            "p_value": np.where(rng.random(n) < 0.1, 1, rng.integers(1, n_calibration + 2, n))
            / (n_calibration + 1),
            "driver": np.array(["paper", "fullcov", "typicality"])[rng.integers(0, 3, n)].tolist(),
            "log_prob": rng.normal(size=n),
            "n_rows": n_rows,
            "complete_set": n_rows == 2,
            "row_index": rng.permutation(n) * 2,
        }
    )


@pytest.mark.parametrize("method", ["bh", "by"])
def test_blockwise_ranking_equals_the_whole_run(method):
    rng = np.random.default_rng(3)
    n, n_cal, fdr = 3000, 200, 0.1
    table = scored_rows(rng, n, n_cal)
    complete = table.column("complete_set").to_numpy()
    score, row_index = table.column("ood_score").to_numpy(), table.column("row_index").to_numpy()
    order = np.lexsort((row_index, -score, ~complete))
    ordered = table.take(pa.array(order))
    calibration = np.round(rng.normal(size=n_cal), 2)
    drift = RankSumDrift(calibration)

    cuts = np.r_[0, np.sort(rng.choice(np.arange(1, n), 7, replace=False)), n]
    blocks = [ordered.slice(lo, hi - lo) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    run = merge_stats([block_stats(b, n_cal, drift) for b in blocks], n_cal, FdrMethod(method), drift)
    finished = [
        finish_block(b, first, run, n_calibration=n_cal, fdr=fdr, corpus_uri="/corpus", top_k=25)
        for b, first in zip(blocks, run.first_ranks, strict=True)
    ]
    out = pa.concat_tables([t for t, _ in finished])

    assert out.column_names[: len(FIRST_COLUMNS)] == FIRST_COLUMNS
    np.testing.assert_array_equal(out.column("rank").to_numpy(), np.arange(1, n + 1))
    np.testing.assert_array_equal(out.column("row_index").to_numpy(), row_index[order])
    done = out.column("complete_set").to_numpy()
    assert done[: done.sum()].all() and not done[done.sum() :].any()  # complete sets rank first
    p = out.column("p_value").to_numpy()
    assert np.isnan(p[~done]).all()
    expected_q = false_discovery_control(p[done], method=method)
    np.testing.assert_allclose(out.column("q_value").to_numpy()[done], expected_q, rtol=1e-12)
    flagged = out.column("flagged").to_numpy()
    np.testing.assert_array_equal(flagged[done], expected_q <= fdr)
    assert not flagged[~done].any() and sum(f.flagged for _, f in finished) == flagged.sum()
    by_driver = merge_flagged_by_driver([f for _, f in finished])
    assert by_driver == Counter(np.asarray(out.column("driver").to_pylist())[flagged].tolist())
    assert list(by_driver.values()) == sorted(by_driver.values(), reverse=True)
    assert len(by_driver) == (3 if method == "bh" else 0)  # BY's threshold is below the far rows' p = 1/201

    reference = drift_test(out.column("ood_score").to_numpy()[done], calibration)
    assert run.drift["statistic"] == reference["statistic"]
    np.testing.assert_allclose(run.drift["p_value"], reference["p_value"], rtol=1e-10)

    top = [row for _, f in finished for row in f.top]
    assert [r["rank"] for r in top] == list(range(1, 26))
    assert [r["id"] for r in top] == out.column("id").to_pylist()[:25]

    hist = merge_histograms([f for _, f in finished])
    groups = np.array([top_level_group(i, "/corpus") for i in out.column("id").to_pylist()])
    edges = np.histogram_bin_edges(out.column("ood_score").to_numpy(), bins=40)
    np.testing.assert_allclose(run.score_edges, edges)
    for name in ("a", "b", "c"):
        mask = groups == name
        assert hist[name].rows == mask.sum()
        np.testing.assert_array_equal(
            hist[name].score_counts, np.histogram(out.column("ood_score").to_numpy()[mask], edges)[0]
        )
        np.testing.assert_array_equal(
            hist[name].p_counts, np.histogram(p[mask & done], np.linspace(0, 1, 21))[0]
        )


def test_an_empty_block_contributes_nothing():
    drift = RankSumDrift(np.arange(5.0))
    stats = block_stats(pa.table({}), 10, drift)
    assert stats.num_rows == 0 and stats.score_range is None and stats.p_index_counts.sum() == 0
    run = merge_stats([stats], 10, FdrMethod.bh, drift)
    assert run.complete_sets == 0 and run.score_edges is None and run.drift["p_value"] is None


def test_a_p_value_off_the_calibration_grid_is_refused():
    rng = np.random.default_rng(0)
    block = scored_rows(rng, 5, 10)
    block = block.set_column(1, "ood_score", pa.array(np.arange(5.0)[::-1]))  # sorted, as blocks are
    block = block.set_column(2, "p_value", pa.array([0.0, 0.5, 0.5, 0.5, 0.5]))  # 0 is not k / 11
    block = block.set_column(6, "complete_set", pa.array(np.ones(5, bool)))
    drift = RankSumDrift(np.arange(10.0))
    run = merge_stats([block_stats(block, 10, drift)], 10, FdrMethod.bh, drift)
    with pytest.raises(ValueError, match="k / 11"):
        finish_block(block, 1, run, n_calibration=10, fdr=0.1, corpus_uri="/corpus", top_k=1)
