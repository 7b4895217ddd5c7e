"""p-values of every test and of the combination are calibrated on held-out FashionMNIST rows.

The shipped default model (trained on train rows 0-49,999) is fitted and calibrated on test rows
5000-9999 and scores test rows 0-4999, which neither the model nor the detector has seen: the share of
rows with p <= alpha must be alpha up to four standard errors of the night's and the calibration set's
sampling, for every single test (typicality's
equal-tailed p-values included) and for the combined test. The
night's adaptive test, trained on a subsample of the night (``detect.adaptive_rows``), is the one an
in-process fit on the same rows gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradood.config import CONF_DIR, ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.pipeline import ray_job
from gradood.pipeline.tables import feature_matrix
from gradood.stats import DetectorSuite, TestName
from gradood.stats.adaptive import training_mask, training_rate

pytestmark = pytest.mark.slow


def test_held_out_in_distribution_p_values_are_calibrated(local_ray, tmp_path):
    cfg = load_config(
        ScoreCorpusConfig,
        [CONF_DIR / "score_corpus.yaml"],
        [
            "corpus.uri=torchvision://FashionMNIST?split=test",
            "corpus.size=5000",
            "fit.uri=torchvision://FashionMNIST?split=test",
            "fit.start=5000",
            "fit.size=5000",
            f"output.uri={tmp_path / 'out'}",
            "extract.shard_size=1024",
            "detect.adaptive_rows=3000",
        ],
    )
    summary = ray_job.run_score_corpus(cfg)
    assert summary["scored"] == 5000
    scores = storage.read_parquet(storage.join(summary["output"], "scores"))
    n_part_1, n_part_2 = DetectorSuite.from_dict(
        storage.read_json(storage.join(cfg.output.uri, "detector.json"))["suite"]
    ).n_calibration_
    columns = {
        "combined": ("p_value", n_part_2),
        **{t.value: (f"p_value:{t.value}", n_part_1) for t in TestName},
    }
    for test, (column, n_cal) in columns.items():
        p = scores.column(column).to_numpy()
        for alpha in (0.01, 0.05, 0.1):
            # the share of p <= alpha varies with the night's rows and with the calibration rows drawn
            se = np.sqrt(alpha * (1 - alpha) * (1 / p.size + 1 / n_cal))
            assert abs(np.mean(p <= alpha) - alpha) <= 4 * se, (test, alpha, np.mean(p <= alpha), 4 * se)
    # on in-distribution data BH at 5 % flags (almost) nothing: every flag would be a false discovery
    assert summary["flagged"] <= 0.05 * 5000 * 0.05

    # the night's adaptive test: a subsample of part 2 and the night, picked by row id, trained it
    detector = storage.read_json(storage.join(cfg.output.uri, "detector.json"))
    suite = DetectorSuite.from_dict(detector["suite"])
    features = storage.read_parquet(storage.join(summary["output"], "features")).sort_by("row_index")
    tails = suite.tails(feature_matrix(features, detector["layers"], cfg.fit.min_sqnorm))
    rate = training_rate(3000, 5000 + suite.n_calibration_[1])
    night = suite.adapt_to_night(tails[training_mask(0, features.column("id").to_pylist(), rate)], rate, 0)
    assert summary["adaptive_training_rows"] == night.training_rows_
    assert abs(night.training_rows_["night"] - rate * 5000) < 0.1 * rate * 5000
    assert np.unique(night.model_.decision_function(tails)).size > 10  # it did learn a function
    by_id = {r["id"]: r for r in scores.select(["id", "ood_score", "p_value"]).to_pylist()}
    statistic = night.statistic(tails)
    p_value = night.calibrator_.p_value(statistic)
    for k, row_id in enumerate(features.column("id").to_pylist()):
        assert by_id[row_id]["ood_score"] == pytest.approx(statistic[k], rel=1e-12)
        assert by_id[row_id]["p_value"] == p_value[k]
