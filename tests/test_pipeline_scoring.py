"""The Ray scoring stage on synthetic feature files: flags, and the tests that drove them, reconcile with
the scores it writes, for a fixed and for the adaptive combination."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.pipeline.score import score_run
from gradood.pipeline.tables import feature_table, suite_feature_names
from gradood.report.run import ErrorReasons, render_run_report
from gradood.stats import DetectorSuite, Moments

LAYERS = ["a.weight", "b.weight", "c.weight"]


def rows(
    rng: np.random.Generator, n: int, layer_shift: float = 0.0, log_prob_shift: float = 0.0
) -> np.ndarray:
    """Feature rows [log f_j..., log p]: in-distribution, or shifted in one layer or in log p."""
    x = rng.normal(size=(n, len(LAYERS) + 1))
    x[:, 0] += layer_shift
    x[:, -1] += log_prob_shift
    return x


@pytest.mark.parametrize("combination", ["fisher", "adaptive"])
def test_flags_by_driving_test_reconcile_with_the_scores(local_ray, tmp_path, combination):
    rng = np.random.default_rng(0)
    cal_1, cal_2 = rows(rng, 600), rows(rng, 600)
    suite = DetectorSuite(combination=combination).fit_parts(
        Moments.from_values(rows(rng, 2000)), cal_1, cal_2, suite_feature_names(LAYERS)
    )
    detector = {"suite": suite.to_dict(), "layers": LAYERS, "fit": {"min_sqnorm": 1e-30}}
    # a night of 300 in-distribution rows, 40 rows far out in a layer and 40 far out in log p
    night = np.vstack([rows(rng, 300), rows(rng, 40, layer_shift=6.0), rows(rng, 40, log_prob_shift=-8.0)])
    ids = [f"/lake/{'id' if i < 300 else 'new'}/{i:04d}.png" for i in range(len(night))]
    features = tmp_path / "features"
    for k, part in enumerate(np.array_split(np.arange(len(night)), 3)):  # three feature files
        table = feature_table(
            [ids[i] for i in part], part, np.ones(len(part), int), night[part, -1], np.exp(night[part, :-1]),
            LAYERS, {},
        )  # fmt: skip
        storage.write_parquet(table, str(features / f"part-{k:06d}.parquet"))
    cfg = load_config(ScoreCorpusConfig, [], [f"detect.combination={combination}", "extract.num_workers=1"])

    result = score_run(str(features), str(tmp_path / "scores"), detector, cfg, {}, "/lake")

    scores = storage.read_parquet(str(tmp_path / "scores")).to_pandas()
    flagged = scores[scores["flagged"]]
    assert result.flagged == len(flagged) > 40
    assert result.flagged_by_driver == Counter(flagged["driver"])
    assert list(result.flagged_by_driver.values()) == sorted(result.flagged_by_driver.values(), reverse=True)
    # the rows out in log p are driven by a test of log p, those out in a layer by one of the layers
    new = flagged[flagged["id"].str.contains("/new/")]
    out_in_log_p = new["id"].map(lambda i: int(i[-8:-4]) >= 340)
    assert set(new.loc[out_in_log_p, "driver"]) <= {"typicality", "nll", "fullcov"}
    assert set(new.loc[~out_in_log_p, "driver"]) <= {"paper", "fullcov", "fisher_layers", "gradnorm"}
    assert (result.adaptive_training_rows is None) == (combination == "fisher")

    # the morning report lists them, most first
    summary = {
        "run_id": "night", "corpus": "/lake", "test": "combined", "inputs": 380, "scored": 380,
        "rejected": 0, "skipped": 0, "group_size": 1, "feature_rows": 380, "fdr": 0.05, "fdr_method": "bh",
        "flagged": result.flagged, "flagged_by_driver": result.flagged_by_driver, "incomplete_sets": 0,
        "resumed_shards": 0, "drift": result.drift,
    }  # fmt: skip
    page = render_run_report(summary, [], result.histograms, result.score_edges, ErrorReasons({}, {}), {})
    table = page[page.index("Flagged rows by the test that drove them") :]
    cells = [f'<td>{name}</td><td class="num">{n}</td>' for name, n in result.flagged_by_driver.items()]
    positions = [table.index(cell) for cell in cells]
    assert positions == sorted(positions)
