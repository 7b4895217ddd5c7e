"""Every model family goes through the real path: trained by Ray Train (the job trains a missing model
first), then features, reducer, detector and ranked scores on a corpus with a corrupt file."""

from __future__ import annotations

import json
import math

import pytest

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.models.checkpoint import load_checkpoint
from gradood.pipeline import ray_job
from tests.pipeline_fixtures import write_png_folder

pytestmark = pytest.mark.slow

TINY = {
    "ddpm": {
        "dim": 8,
        "dim_mults": [1, 2],
        "norm_groups": 4,
        "attn_heads": 2,
        "attn_dim_head": 4,
        "timesteps": 20,
        "linear_attn_levels": [1],
    },
    "vae": {"hidden_channels": 8, "latent_dim": 4},
    "pixelcnn": {"channels": 8, "num_layers": 2, "head_channels": 8},
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_trains_on_ray_train_and_scores_end_to_end(local_ray, family, tmp_path):
    corpus = write_png_folder(tmp_path / "corpus", n_id=6, n_ood=3)
    params = [f"model.params.{k}={json.dumps(v)}" for k, v in TINY[family].items()]
    cfg = load_config(
        ScoreCorpusConfig,
        [],
        [
            f"model={family}",
            *params,
            f"model.checkpoint={tmp_path / 'ckpt'}",
            "train.if_missing=true",
            "train.size=64",
            "train.holdout_fraction=0",  # the fit set: the rows after the 64 trained on
            "train.epochs=1",
            "train.batch_size=16",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            f"train.runs_uri={tmp_path / 'ray_train'}",
            f"corpus.uri={corpus}",
            f"output.uri={tmp_path / 'out'}",
            "fit.size=20",
            "extract.batch_size=8",
            "extract.shard_size=8",
            "extract.num_workers=1",
        ],
    )
    summary = ray_job.run_score_corpus(cfg)

    model, meta = load_checkpoint(tmp_path / "ckpt")
    assert model.name == family and meta["training"]["epochs_done"] == 1
    assert summary["scored"] == 9 and summary["rejected"] == 1 and summary["inputs"] == 10
    detector = storage.read_json(str(tmp_path / "out" / "detector.json"))
    assert detector["model_fingerprint"] == meta["fingerprint"] and detector["model"]["name"] == family
    scores = storage.read_parquet(storage.join(summary["output"], "scores")).to_pylist()
    assert [r["rank"] for r in scores] == list(range(1, 10))
    assert all(math.isfinite(r["ood_score"]) for r in scores), [r["ood_score"] for r in scores]
    ranked = [r["ood_score"] for r in sorted(scores, key=lambda r: r["rank"])]
    assert ranked == sorted(ranked, reverse=True)  # rank 1 = most OOD
