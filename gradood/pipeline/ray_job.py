"""The score-corpus job on Ray, a thin orchestrator over the stages' modules:

model (trained first when missing) -> fit-set features -> reducer -> calibrated detector suite
(:mod:`~gradood.pipeline.fit`) -> corpus features (:mod:`~gradood.pipeline.extract`) -> scores, ranks
and FDR flags (:mod:`~gradood.pipeline.score`) -> summary (:mod:`~gradood.pipeline.summary`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

import gradood
from gradood.config import ScoreCorpusConfig, TrainJobConfig, to_yaml
from gradood.data.sources import open_source
from gradood.features import feature_layer_names
from gradood.models.checkpoint import WEIGHTS_FILE, checkpoint_exists, model_from_bytes, read_checkpoint_meta
from gradood.pipeline import storage
from gradood.pipeline.extract import init_ray, log, run_extraction
from gradood.pipeline.fit import check_detector, load_or_fit_detector
from gradood.pipeline.score import SCORE_CONVENTION, score_features, write_scores
from gradood.pipeline.summary import demo_report, print_summary


def ensure_model(cfg: ScoreCorpusConfig) -> str:
    """The checkpoint directory, trained through Ray Train first when missing and train.if_missing."""
    ckpt = storage.absolute(cfg.model.checkpoint)
    if checkpoint_exists(ckpt):
        return ckpt
    if not cfg.train.if_missing:
        raise FileNotFoundError(
            f"no checkpoint at model.checkpoint={cfg.model.checkpoint} and train.if_missing=false"
        )
    from gradood.train import train_model

    log(f"no checkpoint at {ckpt}: training {cfg.model.name} with Ray Train first")
    train_cfg = TrainJobConfig(seed=cfg.seed, model=cfg.model, image=cfg.image, train=cfg.train, ray=cfg.ray)
    train_model(train_cfg)
    return ckpt


def run_score_corpus(cfg: ScoreCorpusConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = storage.absolute(cfg.output.uri)
    storage.makedirs(out)
    storage.write_text(storage.join(out, "run.yaml"), to_yaml(cfg))
    ex = cfg.extract
    init_ray(cfg.ray.num_cpus, ex.num_workers * ex.cpus_per_worker + 1)

    ckpt = ensure_model(cfg)
    # read once: the driver's model and every worker's come from the same bytes
    weights = (Path(ckpt) / WEIGHTS_FILE).read_bytes()
    model, model_meta = model_from_bytes(weights, read_checkpoint_meta(ckpt))
    layer_names = feature_layer_names(model)
    log(
        f"model {model_meta['model']} {model_meta['fingerprint'][:12]} from {ckpt}: {len(layer_names)} layers"
    )

    detector = load_or_fit_detector(cfg, out, weights, model_meta, layer_names)
    check_detector(detector, model_meta["fingerprint"], ex.group_size, "in use")

    corpus_uri = cfg.corpus.uri
    if corpus_uri == "demo":
        from gradood.data.demo import build_demo_corpus

        corpus_uri = storage.join(out, "demo_corpus")
        build_demo_corpus(corpus_uri, rows_per_source=cfg.corpus.demo_rows_per_source, seed=cfg.seed)
    source = open_source(corpus_uri, image_column=cfg.corpus.image_column, limit=cfg.corpus.limit)
    corpus = run_extraction("corpus features", source, out, weights, model_meta, cfg)

    t_score = time.perf_counter()
    scores = score_features(storage.join(out, "features"), detector, cfg)
    meta = {
        "model_fingerprint": model_meta["fingerprint"],
        "group_size": ex.group_size,
        "seed": cfg.seed,
        "source": source.uri,
        "detector": cfg.detect.detector.value,
        "fdr": cfg.flag.fdr,
        "fdr_method": cfg.flag.method.value,
        "gradood_version": gradood.__version__,
        "score_convention": SCORE_CONVENTION,
    }
    write_scores(scores, storage.join(out, "scores"), meta)
    summary: dict[str, Any] = {
        "output": out,
        "corpus": source.uri,
        "inputs": corpus.rows_in,
        "scored": corpus.rows_scored,
        "rejected": corpus.rows_rejected,
        "feature_rows": corpus.feature_rows,
        "group_size": ex.group_size,
        "detector": cfg.detect.detector.value,
        "flagged": int(pc.sum(scores.column("flagged")).as_py() or 0),
        "fdr": cfg.flag.fdr,
        "fdr_method": cfg.flag.method.value,
        "top10": scores.column("id").to_pylist()[:10],
        "seconds": {
            "extract": corpus.seconds,
            "score": time.perf_counter() - t_score,
            "total": time.perf_counter() - t_start,
        },
        "throughput": {
            "rows_per_s": corpus.rows_in / max(corpus.seconds, 1e-9),
            "rows_per_worker_s": corpus.rows_in / max(corpus.worker_seconds, 1e-9),
        },
    }
    if cfg.corpus.uri == "demo":
        summary["demo"] = demo_report(scores, cfg.detect.detector.value)
    storage.write_json(storage.join(out, "summary.json"), summary)
    print_summary(summary)
    return summary
