"""Scoring: every feature row through the detector suite on Ray, then rank, q-values and flags.

Flags are Benjamini-Hochberg (or Yekutieli) over the whole run's p-values at ``flag.fdr``: the rows a
person should look at, with the expected share of in-distribution rows among them at most that rate.
Conformal p-values take the values k / (n_cal + 1), so q-values come from a histogram of k.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from gradood.config import ScoreCorpusConfig
from gradood.pipeline import storage
from gradood.pipeline.stages import Scorer
from gradood.stats.conformal import fdr_flags, q_values_from_index

SCORE_CONVENTION = (
    "ood_score: the chosen test's statistic, higher = more OOD, rank 1 = most OOD; p_value: conformal "
    "p-value against held-out in-distribution calibration rows; q_value: BH/BY-adjusted; flagged: q <= fdr"
)
FIRST_COLUMNS = [
    "id", "rank", "ood_score", "p_value", "q_value", "flagged", "driver", "log_prob", "n_rows",
    "complete_set",
]  # fmt: skip


def calibration_scores(detector: dict[str, Any], test: str) -> np.ndarray:
    """The held-out scores behind ``test``'s p-values (the drift test's reference sample as well)."""
    suite = detector["suite"]
    entry = suite["combined_calibration"] if test == "combined" else suite["calibration"][test]
    return np.asarray(entry["scores"], np.float64)


def calibration_size(detector: dict[str, Any], test: str) -> int:
    return len(calibration_scores(detector, test))


def score_features(features_uri: str, detector: dict[str, Any], cfg: ScoreCorpusConfig) -> pa.Table:
    """Scores of every feature row, ranked (1 = most OOD; ties broken by row order), with flags."""
    files = storage.list_files(features_uri)
    if not files:  # an incremental night with nothing new
        return empty_scores(detector, cfg)
    test = cfg.detect.detector.value
    ds = ray.data.read_parquet(files).map_batches(
        Scorer,
        batch_size=4096,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.extract.num_workers)),
        fn_constructor_kwargs={"detector": detector, "test": test},
        num_cpus=cfg.extract.cpus_per_worker,
    )
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:  # every input was rejected: an empty, well-formed scores table
        return empty_scores(detector, cfg)
    scored = pa.concat_tables(tables, promote_options="permissive")
    return rank_and_flag(scored, calibration_size(detector, test), cfg)


def empty_scores(detector: dict[str, Any], cfg: ScoreCorpusConfig) -> pa.Table:
    """The scores schema with no rows (what a night whose every input was rejected publishes)."""
    from gradood.pipeline.tables import feature_table

    layers = detector["layers"]
    empty = feature_table([], [], [], [], np.zeros((0, len(layers))), layers, {})
    columns = {c: empty.column(c).to_numpy() for c in empty.column_names}
    scored = pa.table(Scorer(detector, cfg.detect.detector.value)(columns))
    types = {"id": pa.string(), "driver": pa.string(), "top_layers": pa.list_(pa.string())}
    types["top_z"] = pa.list_(pa.float64())
    scored = pa.table(
        {c: scored.column(c).cast(types.get(c, scored.schema.field(c).type)) for c in scored.column_names}
    )
    return rank_and_flag(scored, calibration_size(detector, cfg.detect.detector.value), cfg)


def rank_and_flag(scored: pa.Table, n_calibration: int, cfg: ScoreCorpusConfig) -> pa.Table:
    """Rank, q-values and flags over the complete sets; sets with fewer than B rows are marked instead.

    A set that lost members (rejected rows, the corpus's last set) has features of a smaller sum than
    the full-size sets the detector was fitted and calibrated on, so its score and p-value would be
    biased: it keeps its score for reference but gets ``complete_set = false``, no p-value, no flag, and
    ranks after every complete set.
    """
    complete = scored.column("n_rows").to_numpy() == cfg.extract.group_size
    score = scored.column("ood_score").to_numpy()
    order = np.lexsort((scored.column("row_index").to_numpy(), -score, ~complete))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    p_value = np.where(complete, scored.column("p_value").to_numpy(), np.nan)
    q = np.full(len(score), np.nan)
    p_index = np.rint(p_value[complete] * (n_calibration + 1)).astype(np.int64)
    q[complete] = q_values_from_index(p_index, n_calibration, cfg.flag.method)
    flagged = np.zeros(len(score), bool)
    flagged[complete] = fdr_flags(q[complete], cfg.flag.fdr)
    scored = scored.set_column(scored.column_names.index("p_value"), "p_value", pa.array(p_value))
    for name, values in (("rank", rank), ("q_value", q), ("flagged", flagged), ("complete_set", complete)):
        scored = scored.append_column(name, pa.array(values))
    scored = scored.take(pa.array(order))
    return scored.select(FIRST_COLUMNS + [c for c in scored.column_names if c not in FIRST_COLUMNS])


def write_scores(
    scores: pa.Table, scores_uri: str, meta: dict[str, Any], rows_per_file: int = 1_000_000
) -> None:
    storage.delete_dir_contents(scores_uri)
    scores = scores.replace_schema_metadata({b"gradood": json.dumps(meta).encode()})
    for i, lo in enumerate(range(0, max(scores.num_rows, 1), rows_per_file)):
        storage.write_parquet(
            scores.slice(lo, rows_per_file), storage.join(scores_uri, f"part-{i:06d}.parquet")
        )
