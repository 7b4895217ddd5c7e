"""Scoring: every feature row through the detector suite on Ray, then rank, q-values and flags.

Flags are Benjamini-Hochberg (or Yekutieli) over the whole run's p-values at ``flag.fdr``: the rows a
person should look at, with the expected share of in-distribution rows among them at most that rate.
The rows never gather on the driver: Ray Data scores and sorts them across the cluster, and the two
passes of :mod:`gradood.pipeline.ranking` run as tasks where the sorted blocks are. The driver sees one
small summary per block (counts, a histogram of p-value indices, the drift test's part) and the top rows.
An adaptive combination first fits the night's test on the driver from at most ``detect.adaptive_rows``
training rows: a night that small is read there, a larger one is sampled by one Ray Data pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from gradood.config import FlagTest, ScoreCorpusConfig
from gradood.core import storage
from gradood.pipeline.extract import plan_cpus
from gradood.pipeline.ranking import (
    SORT_DESCENDING,
    SORT_KEYS,
    BlockStats,
    FinishedBlock,
    FolderHistogram,
    RunStats,
    block_stats,
    finish_block,
    merge_flagged_by_driver,
    merge_histograms,
    merge_stats,
)
from gradood.pipeline.scoring import Scorer, TailSampler
from gradood.pipeline.watchdog import progress_or_fail
from gradood.stats.adaptive import AdaptiveNight, training_rate
from gradood.stats.conformal import Combination, prevalence_floor
from gradood.stats.drift import RankSumDrift
from gradood.stats.suite import DetectorSuite

SCORE_CONVENTION = (
    "ood_score: the chosen test's statistic, higher = more OOD, rank 1 = most OOD; p_value: conformal "
    "p-value against held-out in-distribution calibration rows; q_value: BH/BY-adjusted; flagged: q <= fdr"
)


def calibration_scores(detector: dict[str, Any], test: str, night: AdaptiveNight | None) -> np.ndarray:
    """The held-out scores behind ``test``'s p-values (the drift test's reference sample as well)."""
    if test == "combined" and night is not None:
        return night.calibrator_.scores
    suite = detector["suite"]
    entry = suite["combined_calibration"] if test == "combined" else suite["calibration"][test]
    return np.asarray(entry["scores"], np.float64)


def calibration_size(detector: dict[str, Any], test: str) -> int:
    return len(calibration_scores(detector, test, None))


def flag_floor(detector: dict[str, Any], cfg: ScoreCorpusConfig, night_rows: int) -> dict[str, Any]:
    """The smallest OOD share of a night at which its flags can fire (the p-values' resolution)."""
    test = cfg.detect.test.value
    n = calibration_size(detector, test)
    sides = 1 if test == "combined" else int(detector["suite"]["calibration"][test].get("sides", 1))
    min_p = min(1.0, sides / (n + 1))
    share = prevalence_floor(min_p, cfg.flag.fdr, cfg.flag.method, night_rows)
    return {
        "test": test,
        "n_calibration": n,
        "min_p_value": min_p,
        "fdr": cfg.flag.fdr,
        "method": cfg.flag.method.value,
        "share": share,
    }


@dataclass(frozen=True)
class RunScores:
    """What the summary and the report need of a run's scores; the rows themselves are in ``uri``."""

    uri: str
    feature_rows: int
    complete_sets: int
    flagged: int
    #: the first rows in rank order (at least the top 10)
    top: list[dict[str, Any]]
    histograms: dict[str, FolderHistogram]
    #: flagged rows per test that drove their p-value, most first
    flagged_by_driver: dict[str, int]
    score_edges: np.ndarray | None
    drift: dict[str, Any]
    #: rows that trained the night's adaptive test (reference, part 2, night); None for a fixed one
    adaptive_training_rows: dict[str, int] | None


@ray.remote
def _block_stats(block: pa.Table, n_calibration: int, drift: RankSumDrift) -> BlockStats:
    return block_stats(block, n_calibration, drift)


@ray.remote
def _finish_block(
    block: pa.Table, first_rank: int, run: RunStats, uri: str, meta: bytes, **settings: Any
) -> FinishedBlock:
    table, finished = finish_block(block, first_rank, run, **settings)
    storage.write_parquet(table.replace_schema_metadata({b"gradood": meta}), uri)
    return finished


def score_run(
    features_uri: str,
    scores_uri: str,
    detector: dict[str, Any],
    cfg: ScoreCorpusConfig,
    meta: dict[str, Any],
    corpus_uri: str,
) -> RunScores:
    """Score, rank (1 = most OOD; ties by row order) and flag every feature row; scores files in rank
    order under ``scores_uri``, each written by the worker holding its block."""
    test = cfg.detect.test.value
    n_calibration = calibration_size(detector, test)
    storage.delete_dir_contents(scores_uri)
    files = storage.list_files(features_uri)
    night = fit_night(files, detector, cfg)
    drift = RankSumDrift(calibration_scores(detector, test, night))
    blocks = []
    if files:  # none: an incremental night with nothing new
        kwargs = {"detector": detector, "test": test, "group_size": cfg.extract.group_size, "night": night}
        ds = _on_actors(files, Scorer, kwargs, cfg)
        # materialised first, so the sort knows its input blocks (one per feature file, roughly) and
        # cuts as many partitions, rather than Ray's default of 200 whatever the size; block by block,
        # so that a pool that never starts fails by name instead of hanging the night
        scored = progress_or_fail(_bundles_of(ds), cfg.run.stall_timeout_s, "scoring")
        ds = ray.data.from_arrow_refs([ref for bundle in scored for ref in bundle.block_refs])
        blocks = ds.sort(SORT_KEYS, descending=SORT_DESCENDING).materialize().to_arrow_refs()
    drift_ref = ray.put(drift)
    parts = ray.get([_block_stats.remote(block, n_calibration, drift_ref) for block in blocks])
    blocks = [block for block, part in zip(blocks, parts, strict=True) if part.num_rows]
    parts = [part for part in parts if part.num_rows]
    run = merge_stats(parts, n_calibration, cfg.flag.method, drift)
    encoded_meta = json.dumps(meta).encode()
    settings = {"n_calibration": n_calibration, "fdr": cfg.flag.fdr, "corpus_uri": corpus_uri}
    settings["top_k"] = max(10, cfg.run.report_top_k)
    run_ref = ray.put(run)
    finished = ray.get(
        [
            _finish_block.remote(
                block, first, run_ref, storage.join(scores_uri, f"part-{i:06d}.parquet"), encoded_meta,
                **settings,
            )
            for i, (block, first) in enumerate(zip(blocks, run.first_ranks, strict=True))
        ]
    )  # fmt: skip
    if not finished:  # every input was rejected, or nothing was new: an empty, well-formed scores file
        table = empty_scores(detector, cfg, night)
        storage.write_parquet(
            table.replace_schema_metadata({b"gradood": encoded_meta}),
            storage.join(scores_uri, "part-000000.parquet"),
        )
    return RunScores(
        uri=scores_uri,
        feature_rows=sum(f.num_rows for f in finished),
        complete_sets=run.complete_sets,
        flagged=sum(f.flagged for f in finished),
        top=[row for f in finished for row in f.top],
        histograms=merge_histograms(finished),
        flagged_by_driver=merge_flagged_by_driver(finished),
        score_edges=run.score_edges,
        drift=run.drift,
        adaptive_training_rows=None if night is None else night.training_rows_,
    )


def fit_night(files: list[str], detector: dict[str, Any], cfg: ScoreCorpusConfig) -> AdaptiveNight | None:
    """The night's adaptive test (None for a fixed combination, or when the job ranks by a single test),
    trained on the driver, in row order, on the training rows: those whose uniform of (seed, row id) is
    below the rate that leaves at most ``detect.adaptive_rows`` of part 2 and the night. A night that
    small is read here; a larger one is sampled by a Ray Data pass, so only the training rows' tails
    reach the driver."""
    suite = DetectorSuite.from_dict(detector["suite"])
    adaptive = Combination(suite.combination) is Combination.adaptive
    if not adaptive or cfg.detect.test is not FlagTest.combined:
        return None
    rate = training_rate(cfg.detect.adaptive_rows, storage.parquet_rows(files) + suite.n_calibration_[1])
    sampler = {"detector": detector, "group_size": cfg.extract.group_size, "rate": rate, "seed": cfg.seed}
    if rate >= 1 or not files:
        read = TailSampler(**sampler)
        batches = [read(_numpy_columns(storage.read_parquet(f))) for f in files]
    else:
        sampled = _on_actors(files, TailSampler, sampler, cfg)
        batches = list(sampled.iter_batches(batch_size=None, batch_format="numpy"))
    k = len(suite.tail_order)
    tails = np.vstack(
        [np.zeros((0, k))] + [np.asarray(b["tails"], np.float64).reshape(-1, k) for b in batches]
    )
    row_index = np.concatenate(
        [np.zeros(0, np.int64)] + [np.asarray(b["row_index"], np.int64) for b in batches]
    )
    return suite.adapt_to_night(tails[np.argsort(row_index, kind="stable")], rate, cfg.seed)


def _on_actors(
    files: list[str], stage: type, kwargs: dict[str, Any], cfg: ScoreCorpusConfig
) -> ray.data.Dataset:
    """The feature files through a scoring stage, on a pool of up to ``extract.num_workers`` actors that
    leave the read tasks a CPU (:func:`plan_cpus`)."""
    cpu = plan_cpus(cfg.extract, len(files), "scoring")
    # read by our own tasks rather than ray.data.read_parquet, whose file listing asks for a whole CPU
    # (not settable) and never starts on a one-CPU cluster beside the pool's actor
    items = ray.data.from_items([{"file": f} for f in files], override_num_blocks=max(1, len(files)))
    read = items.map_batches(_read_feature_files, batch_size=1, batch_format="numpy", num_cpus=cpu.task_cpus)
    return read.map_batches(
        stage,
        batch_size=4096,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpu.workers),
        fn_constructor_kwargs=kwargs,
        num_cpus=cpu.worker_cpus,
    )


def _bundles_of(ds: ray.data.Dataset) -> Iterator[Any]:
    """The dataset's output blocks as they finish. A generator, so that the executor starts (and waits
    for its actor pool, without a timeout of its own) on the watchdog's thread, not the caller's."""
    yield from ds.iter_internal_ref_bundles()


def _read_feature_files(batch: dict[str, np.ndarray]) -> pa.Table:
    return pa.concat_tables([storage.read_parquet(str(f)) for f in batch["file"]])


def _numpy_columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def empty_scores(detector: dict[str, Any], cfg: ScoreCorpusConfig, night: AdaptiveNight | None) -> pa.Table:
    """The scores schema with no rows (what a night whose every input was rejected publishes)."""
    from gradood.pipeline.tables import feature_table
    from gradood.stats.layout import COMPLEXITY_COLUMN

    layers = detector["layers"]
    bits = np.zeros(0) if COMPLEXITY_COLUMN in detector["suite"]["feature_names_in"] else None
    empty = feature_table([], [], [], [], np.zeros((0, len(layers))), layers, {}, complexity_bits=bits)
    columns = _numpy_columns(empty)
    test = cfg.detect.test.value
    scored = pa.table(Scorer(detector, test, cfg.extract.group_size, night=night)(columns))
    types = {"id": pa.string(), "driver": pa.string(), "top_layers": pa.list_(pa.string())}
    types["top_z"] = pa.list_(pa.float64())
    scored = pa.table(
        {c: scored.column(c).cast(types.get(c, scored.schema.field(c).type)) for c in scored.column_names}
    )
    n_calibration = calibration_size(detector, test)
    drift = RankSumDrift(calibration_scores(detector, test, night))
    run = merge_stats([], n_calibration, cfg.flag.method, drift)
    table, _ = finish_block(
        scored, 1, run, n_calibration=n_calibration, fdr=cfg.flag.fdr, corpus_uri="", top_k=0
    )
    return table
