"""Feature extraction on Ray: shard descriptors -> decode tasks -> ``ShardFeatureWriter`` actors -> a
Parquet file a shard.

Extraction uses Ray Data over *shard descriptors* rather than over single images, in the shape of Ray's
batch inference: CPU tasks read and decode a shard (a few hundred consecutive rows) with per-row error
capture, while each actor of an ``ActorPoolStrategy`` pool, which loads the model once, computes the
features of an already decoded shard and writes one Parquet file named after it. The streaming executor
runs the two stages at once, so a GPU does not wait for I/O and decoding. Shards keep groups of
``group_size`` consecutive rows inside one shard (set-level features never straddle workers), make
retries idempotent (a re-run shard overwrites its own file), let a corrupt file become an errors-table
row instead of failing or dropping a whole block, and give the driver one small summary per finished
shard to stream into the reducer actor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import ray

from gradood.config import ExtractConfig, ScoreCorpusConfig
from gradood.core import storage
from gradood.core.progress import progress
from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, Shard
from gradood.models import build_model
from gradood.pipeline.stages import ExtractSettings, ShardFeatureWriter, completed_shard, decode_shards
from gradood.pipeline.watchdog import progress_or_fail


@dataclasses.dataclass
class ExtractionTotals:
    shards: int = 0
    rows_in: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    feature_rows: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0
    #: busy seconds of the decode tasks (which overlap the workers' seconds)
    decode_seconds: float = 0.0
    #: shards an earlier attempt had finished with the same plan, taken over instead of recomputed
    resumed_shards: int = 0
    #: wall-clock (epoch seconds, from the workers) when the first shard computed in this attempt
    #: started and the last one ended, and the rows of those shards: the steady-state rate leaves Ray's
    #: start-up and the model's loading out, and keeps every wait in between
    first_start: float | None = None
    last_end: float | None = None
    rows_computed: int = 0

    def finished(self, summary: dict[str, Any]) -> None:
        """A shard computed in this attempt (not taken over from an earlier one) reported back."""
        start, end = float(summary["started_at"]), float(summary["ended_at"])
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = end if self.last_end is None else max(self.last_end, end)
        self.rows_computed += int(summary["rows_in"])

    def throughput(self) -> dict[str, float | None]:
        """Rows per second: wall-clock, per busy worker-second, at steady state (wall-clock from the
        first computed shard's start to the last one's end; None when no shard was computed) and per
        busy second of the decode tasks."""
        steady = None
        if self.first_start is not None and self.last_end > self.first_start:
            steady = self.rows_computed / (self.last_end - self.first_start)
        return {
            "rows_per_s": self.rows_in / max(self.seconds, 1e-9),
            "rows_per_worker_s": self.rows_in / max(self.worker_seconds, 1e-9),
            "steady_rows_per_s": steady,
            "decode_rows_per_s": self.rows_in / self.decode_seconds if self.decode_seconds else None,
        }

    def add(self, summary: dict[str, Any], on_shard: Callable[[dict[str, Any]], None] | None) -> None:
        self.shards += 1
        self.rows_in += int(summary["rows_in"])
        self.rows_scored += int(summary["rows_scored"])
        self.rows_rejected += int(summary["rows_rejected"])
        self.feature_rows += int(summary["feature_rows"])
        self.worker_seconds += float(summary["seconds"])
        self.decode_seconds += float(summary.get("decode_seconds", 0.0))
        if on_shard is not None:
            on_shard(summary)

    def reconcile(self, what: str) -> None:
        if self.rows_scored + self.rows_rejected != self.rows_in:
            raise RuntimeError(
                f"{what}: counts do not reconcile: scored {self.rows_scored} + rejected "
                f"{self.rows_rejected} != inputs {self.rows_in}"
            )


@dataclasses.dataclass(frozen=True)
class CpuPlan:
    """How many model workers a stage runs and the CPUs each worker and each decode or read task asks for."""

    workers: int
    worker_cpus: float
    task_cpus: float


def plan_cpus(ex: ExtractConfig, shards: int, what: str) -> CpuPlan:
    """Model workers that leave the decode (or read) tasks a CPU: with every CPU held by a worker, nothing
    would decode the shards the workers wait for, and the run would hang. A cluster too small for one
    worker and one task at their configured sizes runs one worker beside the tasks on shares of its CPUs
    (the two take turns on the cores; Ray's CPU counts are reservations, not pinning)."""
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    worker, task = ex.cpus_per_worker, ex.decode_cpus
    if cpus <= 0:
        raise RuntimeError(f"{what}: the Ray cluster has no CPUs; decoding needs extract.decode_cpus CPUs")
    if worker + task > cpus:
        worker, task = min(worker, cpus / 2), min(task, cpus / 2)
        progress(
            f"{what}: {cpus:g} CPUs cannot hold a model worker (extract.cpus_per_worker="
            f"{ex.cpus_per_worker:g}) and a decode task (extract.decode_cpus={ex.decode_cpus:g}) at once: "
            f"one worker of {worker:g} CPU beside tasks of {task:g} CPU"
        )
    room = int((cpus - task) // worker) if worker > 0 else ex.num_workers
    size = max(1, min(ex.num_workers, shards, room))
    if size < min(ex.num_workers, shards):
        progress(
            f"{what}: {size} of extract.num_workers={ex.num_workers} workers, so that {cpus:g} CPUs leave "
            f"{task:g} to decoding"
        )
    return CpuPlan(workers=size, worker_cpus=worker, task_cpus=task)


def image_converter(model_meta: dict[str, Any], cfg: ScoreCorpusConfig) -> ImageConverter:
    """How rows become the model's input, from the checkpoint's metadata (no weights needed)."""
    model = build_model(model_meta["model"], model_meta["params"])
    return ImageConverter.for_model(model, **dataclasses.asdict(cfg.image))


def _plan(shards: list[Shard], source: CorpusSource, settings: ExtractSettings, fingerprint: str) -> dict:
    """Everything a finished shard's file depends on; an earlier attempt's files count only if it matches."""
    digest = hashlib.sha256()
    for shard in shards:  # shard by shard: a folder's locators name every file
        digest.update(json.dumps(list(shard.locator), default=str).encode())
    locators = digest.hexdigest()
    return {
        "source": source.describe(),
        "shards": [[s.first_row, s.num_rows] for s in shards],
        "locators_sha256": locators,
        "model_fingerprint": fingerprint,
        **{
            k: v
            for k, v in dataclasses.asdict(settings).items()
            if k not in ("batch_size", "torch_threads", "use_gpu")
        },
    }


def _resume(
    shards: list[Shard],
    source: CorpusSource,
    out_uri: str,
    settings: ExtractSettings,
    fingerprint: str,
    totals: ExtractionTotals,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> list[Shard]:
    """Take over the shards an interrupted attempt with the same plan finished; the shards left to do.

    With another plan (or none), every file of the earlier attempt is deleted first, so parts of another
    layout never mix into this run.
    """
    plan_uri = storage.join(out_uri, "plan.json")
    plan = json.loads(json.dumps(_plan(shards, source, settings, fingerprint)))
    if not (storage.exists(plan_uri) and storage.read_json(plan_uri) == plan):
        for uri in (settings.features_uri, settings.errors_uri):
            storage.delete_dir_contents(uri)
            storage.makedirs(uri)
        storage.write_json(plan_uri, plan)
        return list(shards)
    expected = {"model_fingerprint": fingerprint, "seed": settings.seed, "group_size": settings.group_size}
    expected |= {"method": settings.method, "source": source.uri}
    pending = []
    for shard in shards:
        summary = completed_shard(shard, settings, expected)
        if summary is None:
            pending.append(shard)
        else:
            totals.add(summary, on_shard)
            totals.resumed_shards += 1
    return pending


def run_extraction(
    what: str,
    source: CorpusSource,
    out_uri: str,
    weights: bytes,
    model_meta: dict[str, Any],
    cfg: ScoreCorpusConfig,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    calibration_fraction: float | None = None,
    part_2_fraction: float | None = None,
) -> ExtractionTotals:
    """Features of every row of ``source`` into ``out_uri/features`` (+ ``errors``), one file per shard.

    ``calibration_fraction`` marks a fit-set run: rows get a ``split`` column (``part_2_fraction`` of them
    in calibration part 2) and shard summaries carry the moments of their fit rows.
    """
    ex = cfg.extract
    use_gpu = ex.gpus_per_worker > 0
    batch_size, key = (ex.gpu_batch_size, "gpu_batch_size") if use_gpu else (ex.batch_size, "batch_size")
    if ex.decode_cpus <= 0:
        raise ValueError(f"extract.decode_cpus must be positive, got {ex.decode_cpus}")
    if batch_size < ex.group_size:
        raise ValueError(f"extract.{key}={batch_size} is smaller than extract.group_size={ex.group_size}")
    shards = source.shards(ex.shard_size, align=ex.group_size)
    features_uri, errors_uri = storage.join(out_uri, "features"), storage.join(out_uri, "errors")
    settings = ExtractSettings(
        features_uri=features_uri,
        errors_uri=errors_uri,
        group_size=ex.group_size,
        batch_size=batch_size,
        seed=cfg.seed,
        method=ex.method,
        min_sqnorm=cfg.fit.min_sqnorm,
        image=dataclasses.asdict(cfg.image),
        torch_threads=ex.torch_threads,
        calibration_fraction=calibration_fraction,
        part_2_fraction=part_2_fraction,
        use_gpu=use_gpu,
    )
    totals = ExtractionTotals()
    pending = _resume(shards, source, out_uri, settings, model_meta["fingerprint"], totals, on_shard)
    if len(pending) < len(shards):
        progress(
            f"{what}: {len(shards) - len(pending)} of {len(shards)} shards complete from an earlier attempt"
        )
    cpu = plan_cpus(ex, len(pending), what)
    resources: dict[str, Any] = {"num_cpus": cpu.worker_cpus}
    if ex.gpus_per_worker > 0:
        resources["num_gpus"] = ex.gpus_per_worker
    ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=max(1, len(pending)))
    decode_args = {"num_cpus": cpu.task_cpus}
    ds = ds.map_batches(
        decode_shards,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"source": source, "converter": image_converter(model_meta, cfg)},
        # remote args from a function keep Ray Data from fusing decoding into the model actors, which
        # would run the two one after the other again
        ray_remote_args_fn=lambda: decode_args,
    )
    ds = ds.map_batches(
        ShardFeatureWriter,
        batch_size=1,
        batch_format="numpy",
        # all workers from the start: growing the pool on demand would load the model mid-run
        compute=ray.data.ActorPoolStrategy(size=cpu.workers),
        fn_constructor_kwargs={
            "weights": weights,
            "model_meta": model_meta,
            "source": source,
            "settings": settings,
        },
        **resources,
    )
    t0 = time.perf_counter()
    total_rows = sum(s.num_rows for s in shards)
    progress(f"{what}: {total_rows} rows in {len(shards)} shards from {source.uri}")
    for summary in progress_or_fail(ds.iter_rows(), cfg.run.stall_timeout_s, what) if pending else ():
        totals.add(summary, on_shard)
        elapsed = time.perf_counter() - t0
        totals.finished(summary)
        progress(
            f"{what}: {totals.shards}/{len(shards)} shards, {totals.rows_in}/{total_rows} rows, "
            f"{totals.rows_in / max(elapsed, 1e-9):.1f} rows/s, {totals.rows_rejected} rejected"
        )
    totals.seconds = time.perf_counter() - t0
    if totals.shards != len(shards):
        raise RuntimeError(f"{what}: {totals.shards} of {len(shards)} shards reported back")
    totals.reconcile(what)
    return totals
