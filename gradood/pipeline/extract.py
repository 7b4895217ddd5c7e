"""Feature extraction on Ray: shard descriptors -> ``ShardFeatureWriter`` actors -> a Parquet file a shard.

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
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from gradood.config import ScoreCorpusConfig
from gradood.data.sources import CorpusSource
from gradood.pipeline import storage
from gradood.pipeline.stages import ExtractSettings, ShardFeatureWriter


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
    calibration_fraction: float | None = None,
) -> ExtractionTotals:
    """Features of every row of ``source`` into ``out_uri/features`` (+ ``errors``), one file per shard.

    ``calibration_fraction`` marks a fit-set run: rows get a ``split`` column and shard summaries carry
    the moments of their fit rows.
    """
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
        calibration_fraction=calibration_fraction,
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
