"""The score-corpus job on Ray, a thin orchestrator over the stages' modules:

model (trained first when missing) -> fit-set features -> reducer -> calibrated detector suite
(:mod:`~gradood.pipeline.fit`) -> the night's inputs (incremental: new or changed only) and their
manifest -> corpus
features, resumable (:mod:`~gradood.pipeline.extract`) -> scores, ranks and FDR flags
(:mod:`~gradood.pipeline.score`) -> summary, drift test and report (:mod:`~gradood.pipeline.summary`,
:mod:`~gradood.pipeline.report`) -> publish (:mod:`~gradood.pipeline.publish`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from urllib.parse import urlsplit

import gradood
from gradood.config import ScoreCorpusConfig, TrainJobConfig, to_yaml
from gradood.core import storage
from gradood.core.progress import progress
from gradood.core.ray_runtime import init_ray
from gradood.data.images import ImageConverter
from gradood.data.sources import TORCHVISION_SCHEME, CorpusSource, open_source
from gradood.features import feature_layer_names
from gradood.models.checkpoint import META_FILE, WEIGHTS_FILE, model_from_bytes
from gradood.pipeline.extract import run_extraction
from gradood.pipeline.fit import check_detector, load_or_fit_detector
from gradood.pipeline.lease import Lease
from gradood.pipeline.plan import stage_listing
from gradood.pipeline.publish import (
    clear_manifest,
    default_run_id,
    manifest_uri,
    new_or_changed,
    publish,
    read_seen,
    run_dir,
    seen_manifests,
    unpublish,
    write_manifest,
)
from gradood.pipeline.report import write_run_report
from gradood.pipeline.score import SCORE_CONVENTION, flag_floor, score_run
from gradood.pipeline.summary import demo_report, print_summary


def ensure_model(cfg: ScoreCorpusConfig) -> str:
    """The checkpoint directory, trained through Ray Train first when missing and train.if_missing."""
    ckpt = storage.absolute(cfg.model.checkpoint)
    if all(storage.exists(storage.join(ckpt, name)) for name in (WEIGHTS_FILE, META_FILE)):
        return ckpt
    if not cfg.train.if_missing:
        raise FileNotFoundError(
            f"no checkpoint at model.checkpoint={cfg.model.checkpoint} and train.if_missing=false"
        )
    from gradood.train import train_model

    progress(f"no checkpoint at {ckpt}: training {cfg.model.name} with Ray Train first")
    train_cfg = TrainJobConfig(seed=cfg.seed, model=cfg.model, image=cfg.image, train=cfg.train, ray=cfg.ray)
    train_model(train_cfg)
    return ckpt


def corpus_source(cfg: ScoreCorpusConfig, out: str, run_id: str) -> CorpusSource:
    """The night's source, its manifest written; incremental runs keep new or changed input files.

    A folder of images is listed by Ray tasks into the manifest (:mod:`~gradood.pipeline.plan`); other
    sources are listed here.
    """
    corpus_uri = cfg.corpus.uri
    if corpus_uri == "demo":
        from gradood.data.demo import build_demo_corpus

        corpus_uri = storage.join(out, "demo_corpus")
        build_demo_corpus(
            corpus_uri,
            rows_per_source=cfg.corpus.demo_rows_per_source,
            seed=cfg.seed,
            id_rows=cfg.corpus.demo_id_rows,
        )
    incremental = cfg.run.incremental
    torchvision = urlsplit(corpus_uri).scheme == TORCHVISION_SCHEME
    if incremental and (torchvision or cfg.corpus.size is not None):
        raise ValueError(
            "run.incremental=true needs a folder or Parquet corpus without corpus.size "
            f"(it compares files by size and modification time), got {cfg.corpus.uri}"
        )
    seen = seen_manifests(out, run_id) if incremental else []
    clear_manifest(out, run_id)  # a rerun's manifest is written anew, whichever layout the last one had
    limits = {"max_pixels": cfg.corpus.max_pixels, "max_bytes": cfg.corpus.max_bytes}
    staged = None
    if not torchvision and cfg.corpus.image_column is None:
        staged = stage_listing(corpus_uri, manifest_uri(out, run_id), seen, limit=cfg.corpus.size, **limits)
    if staged is not None:
        listed, kept = staged.listed, staged.kept
        source: CorpusSource = staged.source
    else:
        source = open_source(
            corpus_uri, image_column=cfg.corpus.image_column, limit=cfg.corpus.size, **limits
        )
        inputs = source.input_files()
        if inputs is not None:
            listed = inputs.num_rows
            if incremental:
                inputs = new_or_changed(inputs, read_seen(seen))
                source = source.with_files(inputs.column("uri").to_pylist())
            kept = inputs.num_rows
            write_manifest(out, run_id, inputs)
    if incremental:
        progress(f"incremental: {kept} of {listed} input files are new or changed since the published runs")
    return source


def run_score_corpus(cfg: ScoreCorpusConfig) -> dict[str, Any]:
    """One run into its own partition ``output.uri/runs/<run.id>``, published when complete; it holds
    the run's lease throughout, so a second run of the same id refuses, naming the holder."""
    out = storage.absolute(cfg.output.uri)
    run_id = cfg.run.id or default_run_id()
    run_uri = run_dir(out, run_id)
    with Lease.for_run(out, run_id, cfg.run.lease_timeout_s) as lease:
        return _score_run(cfg, out, run_id, run_uri, lease)


def _score_run(cfg: ScoreCorpusConfig, out: str, run_id: str, run_uri: str, lease: Lease) -> dict[str, Any]:
    t_start = time.perf_counter()
    unpublish(out, run_id)
    storage.makedirs(run_uri)
    storage.write_text(storage.join(run_uri, "run.yaml"), to_yaml(cfg))
    ex = cfg.extract
    init_ray(cfg.ray.num_cpus, ex.num_workers * ex.cpus_per_worker + 1)

    ckpt = ensure_model(cfg)
    # read once: the driver's model and every worker's come from the same bytes
    weights = storage.read_bytes(storage.join(ckpt, WEIGHTS_FILE))
    model, model_meta = model_from_bytes(weights, storage.read_json(storage.join(ckpt, META_FILE)))
    layer_names = feature_layer_names(model)
    t_detector = time.perf_counter()
    progress(
        f"model {model_meta['model']} {model_meta['fingerprint'][:12]} from {ckpt}: {len(layer_names)} layers"
    )

    detector = load_or_fit_detector(cfg, out, weights, model_meta, layer_names)
    check_detector(detector, model_meta["fingerprint"], ex.group_size, "in use")

    t_plan = time.perf_counter()
    source = corpus_source(cfg, out, run_id)
    t_extract = time.perf_counter()
    corpus = run_extraction("corpus features", source, run_uri, weights, model_meta, cfg)

    t_score = time.perf_counter()
    meta = {
        "model_fingerprint": model_meta["fingerprint"],
        "group_size": ex.group_size,
        "seed": cfg.seed,
        "source": source.uri,
        "run_id": run_id,
        "test": cfg.detect.test.value,
        "fdr": cfg.flag.fdr,
        "fdr_method": cfg.flag.method.value,
        "gradood_version": gradood.__version__,
        "score_convention": SCORE_CONVENTION,
    }
    scores = score_run(
        storage.join(run_uri, "features"), storage.join(run_uri, "scores"), detector, cfg, meta, source.uri
    )
    skipped = source.skipped()
    summary: dict[str, Any] = {
        "run_id": run_id,
        "output": run_uri,
        "corpus": source.uri,
        "inputs": corpus.rows_in,
        "scored": corpus.rows_scored,
        "rejected": corpus.rows_rejected,
        "skipped": sum(skipped.values()),
        "skipped_reasons": skipped,
        "feature_rows": corpus.feature_rows,
        "incomplete_sets": scores.feature_rows - scores.complete_sets,
        "resumed_shards": corpus.resumed_shards,
        "group_size": ex.group_size,
        "test": cfg.detect.test.value,
        "combination": cfg.detect.combination.value,
        "adaptive_training_rows": scores.adaptive_training_rows,
        "flagged": scores.flagged,
        "flagged_by_driver": scores.flagged_by_driver,
        "fdr": cfg.flag.fdr,
        "fdr_method": cfg.flag.method.value,
        "prevalence_floor": flag_floor(detector, cfg, scores.complete_sets),
        "warnings": list(detector["fit"].get("warnings", [])),
        "drift": scores.drift,
        "top10": [row["id"] for row in scores.top[:10]],
        "seconds": {  # wall-clock per stage; "extract" includes planning the shards
            "model": t_detector - t_start,
            "detector": t_plan - t_detector,
            "list_inputs": t_extract - t_plan,
            "extract": t_score - t_extract,
            "score": time.perf_counter() - t_score,
            "total": time.perf_counter() - t_start,
        },
        "throughput": corpus.throughput(),
    }
    if scores.feature_rows != corpus.feature_rows:
        raise RuntimeError(f"scored {scores.feature_rows} of {corpus.feature_rows} feature rows")
    if cfg.corpus.uri == "demo":
        summary["demo"] = demo_report(storage.read_parquet(scores.uri), cfg.detect.test.value)
    storage.write_json(storage.join(run_uri, "summary.json"), summary)
    converter = ImageConverter.for_model(model, **dataclasses.asdict(cfg.image))
    write_run_report(run_uri, summary, scores, source, converter, cfg.run.report_top_k)
    lease.check()  # a run presumed dead and taken over must not publish over its successor
    publish(out, run_id, summary)
    print_summary(summary)
    return summary
