"""p-values of every test and of the combination are calibrated on held-out FashionMNIST rows.

The shipped Glow (trained on the train split) is fitted and calibrated on test rows 5000-9999 and scores
test rows 0-4999, which neither the model nor the detector has seen: the share of rows with p <= alpha
must be alpha up to sampling error (+-0.02), for every single test and for the combined test.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradood.config import CONF_DIR, ScoreCorpusConfig, load_config
from gradood.pipeline import ray_job, storage
from gradood.stats import TestName

pytestmark = pytest.mark.slow


def test_held_out_in_distribution_p_values_are_calibrated(local_ray, tmp_path):
    cfg = load_config(
        ScoreCorpusConfig,
        [CONF_DIR / "score_corpus.yaml"],
        [
            "corpus.uri=torchvision://FashionMNIST?split=test",
            "corpus.limit=5000",
            "fit.start=5000",
            "fit.size=5000",
            f"output.uri={tmp_path / 'out'}",
            "extract.shard_size=1024",
        ],
    )
    summary = ray_job.run_score_corpus(cfg)
    assert summary["scored"] == 5000
    scores = storage.read_parquet(storage.join(summary["output"], "scores"))
    columns = {"combined": "p_value", **{t.value: f"p_value:{t.value}" for t in TestName}}
    for test, column in columns.items():
        p = scores.column(column).to_numpy()
        for alpha in (0.01, 0.05, 0.1):
            assert abs(np.mean(p <= alpha) - alpha) <= 0.02, (test, alpha, np.mean(p <= alpha))
    # on in-distribution data BH at 5 % flags (almost) nothing: every flag would be a false discovery
    assert summary["flagged"] <= 0.05 * 5000 * 0.05
