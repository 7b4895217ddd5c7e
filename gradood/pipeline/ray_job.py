"""The score-corpus job on Ray: fit-set features -> reducer -> detector -> corpus features -> ranked scores.

Extraction uses Ray Data over *shard descriptors* rather than over decoded images: each actor of an
``ActorPoolStrategy`` pool loads the model once, takes a shard (a few hundred consecutive rows), decodes
it with per-row error capture, computes features and writes one Parquet file named after the shard.
That keeps groups of ``group_size`` consecutive rows inside one shard (set-level features never straddle
workers), makes retries idempotent (a re-run shard overwrites its own file), lets a corrupt file become an
errors-table row instead of failing or dropping a whole block, and gives the driver one small summary per
finished shard to stream into the reducer actor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

import gradood
from gradood.config import ScoreCorpusConfig, TrainJobConfig, to_yaml
from gradood.data.sources import CorpusSource, open_source
from gradood.features import feature_layer_names
from gradood.models.checkpoint import WEIGHTS_FILE, checkpoint_exists, model_from_bytes, read_checkpoint_meta
from gradood.pipeline import storage
from gradood.pipeline.reducer import FitReducer, moments_from_parquet
from gradood.pipeline.stages import ExtractSettings, Scorer, ShardFeatureWriter
from gradood.stats.detector import LogGaussianDetector, TypicalityTest
from gradood.stats.moments import Moments

DETECTOR_FORMAT = 1
SCORE_CONVENTION = "ood_score = -sum_j log N(log f_j; mu_j, sigma_j^2): higher = more OOD, rank 1 = most OOD"


def log(msg: str) -> None:
    # plain flushed lines: they reach `ray job logs` and CI logs, where progress bars do not
    print(f"[gradood {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def init_ray(num_cpus: int | None, min_cpus: float) -> None:
    """Attach to the cluster named by RAY_ADDRESS (as under `ray job submit`), else start an embedded Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(
            num_cpus=num_cpus or max(os.cpu_count() or 1, int(np.ceil(min_cpus))), include_dashboard=False
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


@dataclasses.dataclass
class ExtractionTotals:
    shards: int = 0
    rows_in: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    feature_rows: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0

    def reconcile(self, what: str) -> None:
        if self.rows_scored + self.rows_rejected != self.rows_in:
            raise RuntimeError(
                f"{what}: counts do not reconcile: scored {self.rows_scored} + rejected "
                f"{self.rows_rejected} != inputs {self.rows_in}"
            )


def run_extraction(
    what: str,
    source: CorpusSource,
    out_uri: str,
    weights: bytes,
    model_meta: dict[str, Any],
    cfg: ScoreCorpusConfig,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> ExtractionTotals:
    """Features of every row of ``source`` into ``out_uri/features`` (+ ``errors``), one file per shard."""
    ex = cfg.extract
    if ex.batch_size < ex.group_size:
        raise ValueError(
            f"extract.batch_size={ex.batch_size} is smaller than extract.group_size={ex.group_size}"
        )
    shards = source.shards(ex.shard_size, align=ex.group_size)
    features_uri, errors_uri = storage.join(out_uri, "features"), storage.join(out_uri, "errors")
    for uri in (features_uri, errors_uri):  # parts of an earlier run with another layout must not mix in
        storage.delete_dir_contents(uri)
        storage.makedirs(uri)
    settings = ExtractSettings(
        features_uri=features_uri,
        errors_uri=errors_uri,
        group_size=ex.group_size,
        batch_size=ex.batch_size,
        seed=cfg.seed,
        method=ex.method,
        min_sqnorm=cfg.fit.min_sqnorm,
        image=dataclasses.asdict(cfg.image),
        torch_threads=ex.torch_threads,
    )
    resources: dict[str, Any] = {"num_cpus": ex.cpus_per_worker}
    if ex.num_gpus_per_worker > 0:
        resources["num_gpus"] = ex.num_gpus_per_worker
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(
        ShardFeatureWriter,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(ex.num_workers, len(shards)))),
        fn_constructor_kwargs={
            "weights": weights,
            "model_meta": model_meta,
            "source": source,
            "settings": settings,
        },
        **resources,
    )
    totals = ExtractionTotals()
    t0 = time.perf_counter()
    total_rows = sum(s.num_rows for s in shards)
    log(f"{what}: {total_rows} rows in {len(shards)} shards from {source.uri}")
    for summary in ds.iter_rows():
        totals.shards += 1
        totals.rows_in += int(summary["rows_in"])
        totals.rows_scored += int(summary["rows_scored"])
        totals.rows_rejected += int(summary["rows_rejected"])
        totals.feature_rows += int(summary["feature_rows"])
        totals.worker_seconds += float(summary["seconds"])
        if on_shard is not None:
            on_shard(summary)
        elapsed = time.perf_counter() - t0
        log(
            f"{what}: {totals.shards}/{len(shards)} shards, {totals.rows_in}/{total_rows} rows, "
            f"{totals.rows_in / max(elapsed, 1e-9):.1f} rows/s, {totals.rows_rejected} rejected"
        )
    totals.seconds = time.perf_counter() - t0
    if totals.shards != len(shards):
        raise RuntimeError(f"{what}: {totals.shards} of {len(shards)} shards reported back")
    totals.reconcile(what)
    return totals


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


def fit_settings(cfg: ScoreCorpusConfig) -> dict[str, Any]:
    return {
        "uri": cfg.fit.uri,
        "start": cfg.fit.start,
        "size": cfg.fit.size,
        "min_sqnorm": cfg.fit.min_sqnorm,
        "min_std": cfg.fit.min_std,
        "seed": cfg.seed,
        "image": dataclasses.asdict(cfg.image),
    }


def check_detector(detector: dict[str, Any], fingerprint: str, group_size: int, where: str) -> None:
    """Refuse a detector fitted for another model or another set size."""
    if detector.get("model_fingerprint") != fingerprint:
        raise ValueError(
            f"detector {where} was fitted for model {str(detector.get('model_fingerprint'))[:12]}, "
            f"but the model loaded now has fingerprint {fingerprint[:12]}: refit it (fit.refit=true) "
            "or point output.detector_uri elsewhere"
        )
    if detector.get("group_size") != group_size:
        raise ValueError(
            f"detector {where} was fitted with group_size={detector.get('group_size')}, this run uses "
            f"extract.group_size={group_size}: refit it (fit.refit=true) or use a matching group size"
        )


def start_reducer(num_layers: int) -> ray.actor.ActorHandle:
    # no restarts: a restarted actor would come back empty; the driver recomputes from Parquet instead
    return ray.remote(FitReducer).options(num_cpus=0, max_restarts=0).remote(num_layers)


def fit_detector(
    cfg: ScoreCorpusConfig, out: str, weights: bytes, model_meta: dict[str, Any], layer_names: list[str]
) -> dict[str, Any]:
    source = open_source(cfg.fit.uri, start=cfg.fit.start, limit=cfg.fit.size)
    reducer = start_reducer(len(layer_names))
    fit_out = storage.join(out, "fit")

    def send(summary: dict[str, Any]) -> None:
        reducer.add.remote(int(summary["shard"]), summary["logf_moments"], summary["nll_moments"])

    totals = run_extraction("fit-set features", source, fit_out, weights, model_meta, cfg, on_shard=send)
    features_uri = storage.join(fit_out, "features")
    try:
        merged = ray.get(reducer.result.remote())
        if len(merged["shards"]) != totals.shards:
            raise RuntimeError(f"reducer saw {len(merged['shards'])} of {totals.shards} shards")
        logf, nll = Moments.from_dict(merged["logf"]), Moments.from_dict(merged["nll"])
    except (ray.exceptions.RayActorError, RuntimeError) as err:
        log(
            f"reducer result unavailable ({type(err).__name__}: {err}); "
            f"recomputing the fit from {features_uri}"
        )
        logf, nll, _ = moments_from_parquet(features_uri, layer_names, cfg.fit.min_sqnorm)
    finally:
        ray.kill(reducer)
    det = LogGaussianDetector(min_sqnorm=cfg.fit.min_sqnorm, min_std=cfg.fit.min_std).fit_moments(
        logf, layer_names
    )
    typ = TypicalityTest.from_moments(nll)
    log(
        f"detector fitted on {logf.count} feature rows ({totals.rows_scored} images, {totals.rows_rejected} "
        f"rejected); {len(det.dropped_layers_)} of {len(layer_names)} layers dropped for zero variance"
    )
    return {
        "format_version": DETECTOR_FORMAT,
        "gradood_version": gradood.__version__,
        "model_fingerprint": model_meta["fingerprint"],
        "model": {"name": model_meta["model"], "params": model_meta["params"]},
        "group_size": cfg.extract.group_size,
        "method": cfg.extract.method,
        "fit": {
            **fit_settings(cfg),
            "source": source.describe(),
            "n_rows": totals.rows_scored,
            "n_rejected": totals.rows_rejected,
            "n_feature_rows": int(logf.count),
        },
        "layers": layer_names,
        "dropped_layers": list(det.dropped_layers_),
        "log_gaussian": det.to_dict(),
        "typicality": typ.to_dict(),
    }


def load_or_fit_detector(
    cfg: ScoreCorpusConfig, out: str, weights: bytes, model_meta: dict[str, Any], layer_names: list[str]
) -> dict[str, Any]:
    uri = storage.absolute(cfg.output.detector_uri or storage.join(out, "detector.json"))
    if storage.exists(uri) and not cfg.fit.refit:
        detector = storage.read_json(uri)
        check_detector(detector, model_meta["fingerprint"], cfg.extract.group_size, uri)
        if {k: v for k, v in detector["fit"].items() if k in fit_settings(cfg)} != fit_settings(cfg):
            raise ValueError(
                f"detector {uri} was fitted with other fit.* settings: rerun with fit.refit=true"
            )
        log(f"reusing detector {uri} (fitted on {detector['fit']['n_rows']} rows)")
        return detector
    detector = fit_detector(cfg, out, weights, model_meta, layer_names)
    storage.write_json(uri, detector)
    log(f"detector written to {uri}")
    return detector


def score_features(features_uri: str, detector: dict[str, Any], cfg: ScoreCorpusConfig) -> pa.Table:
    """Scores of every feature row, ranked (1 = most OOD; ties broken by row order)."""
    files = storage.list_files(features_uri)
    if not files:
        raise RuntimeError(f"no feature files under {features_uri}: nothing to score")
    ds = ray.data.read_parquet(files).map_batches(
        Scorer,
        batch_size=4096,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.extract.num_workers)),
        fn_constructor_kwargs={"detector": detector},
        num_cpus=cfg.extract.cpus_per_worker,
    )
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    scored = pa.concat_tables(tables, promote_options="permissive")
    score = scored.column("ood_score").to_numpy()
    order = np.lexsort((scored.column("row_index").to_numpy(), -score))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    scored = scored.append_column("rank", pa.array(rank)).take(pa.array(order))
    first = ["id", "rank", "ood_score", "typicality", "log_prob", "n_rows", "top_layers", "top_z"]
    return scored.select(first + [c for c in scored.column_names if c not in first])


def write_scores(
    scores: pa.Table, scores_uri: str, meta: dict[str, Any], rows_per_file: int = 1_000_000
) -> None:
    storage.delete_dir_contents(scores_uri)
    scores = scores.replace_schema_metadata({b"gradood": json.dumps(meta).encode()})
    for i, lo in enumerate(range(0, max(scores.num_rows, 1), rows_per_file)):
        storage.write_parquet(
            scores.slice(lo, rows_per_file), storage.join(scores_uri, f"part-{i:06d}.parquet")
        )


def demo_report(scores: pa.Table) -> dict[str, Any]:
    """AUROC etc. of ours and of the typicality baseline, FashionMNIST (held out) vs each OOD source."""
    from gradood.data.demo import DEMO_ID_SOURCE, DEMO_OOD_SOURCES, demo_source_of
    from gradood.stats.metrics import ood_metrics

    if "member_ids" in scores.column_names:
        members = scores.column("member_ids").to_pylist()
    else:
        members = [[i] for i in scores.column("id").to_pylist()]
    # a set that straddles two sources (at a folder boundary) belongs to neither: left out, and counted
    labels = [{demo_source_of(m) for m in group} for group in members]
    sources = np.array([next(iter(s)) if len(s) == 1 else "mixed" for s in labels])
    report: dict[str, Any] = {
        "convention": None,
        "sources": {},
        "mixed_sets_left_out": int((sources == "mixed").sum()),
    }
    for name in DEMO_OOD_SOURCES:
        row: dict[str, Any] = {}
        for score in ("ood_score", "typicality"):
            s = scores.column(score).to_numpy()
            m = ood_metrics(s[sources == DEMO_ID_SOURCE], s[sources == name])
            report["convention"] = m.pop("convention")
            row[score] = m
        report["sources"][name] = row
    return report


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
        summary["demo"] = demo_report(scores)
    storage.write_json(storage.join(out, "summary.json"), summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    log(
        f"scored {summary['scored']} + rejected {summary['rejected']} = {summary['inputs']} inputs "
        f"({summary['feature_rows']} feature rows, group_size {summary['group_size']}) -> {summary['output']}"
    )
    log("top-10 most OOD: " + ", ".join(summary["top10"]))
    if "demo" in summary:
        log("demo ranking, FashionMNIST (held out) vs each OOD source; AUROC = P(s_OOD > s_ID) + P(tie)/2,")
        log("FPR@95 = share of OOD rows accepted at the threshold that accepts 95% of ID rows (ID positive):")
        log(f"  {'OOD source':<24}{'AUROC ours':>12}{'AUROC typicality':>18}{'FPR@95 ours':>13}")
        for name, row in summary["demo"]["sources"].items():
            log(
                f"  {name:<24}{row['ood_score']['auroc']:>12.4f}{row['typicality']['auroc']:>18.4f}"
                f"{row['ood_score']['fpr_at_95_tpr']:>13.4f}"
            )
