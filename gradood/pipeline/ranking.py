"""Rank, q-values and flags of a run, block by block, with no per-row state in one place.

The scored rows are sorted across the cluster (complete sets first, then by descending score, ties by
row order) into blocks. Two passes over those blocks then finish the run:

1. :func:`block_stats` per block: its row count, the histogram of conformal p-value indices (all that
   Benjamini-Hochberg needs), the score range and the block's share of the drift test. The driver adds
   these up (:func:`merge_stats`): the q-value of every p-value index, the first rank of every block.
2. :func:`finish_block` per block: rank, q-value and flag of each row, written as one scores file by the
   worker that holds the block; it returns only the block's flag count, per-folder histograms for the
   report and, for the first blocks, the top rows.

Nothing here imports Ray; :mod:`gradood.pipeline.score` runs these functions as Ray tasks.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradood.stats.conformal import FdrMethod, fdr_flags, p_index_counts, q_value_table
from gradood.stats.drift import RankSumDrift, RankSumPart

#: the scores' order: complete sets first, then the most OOD, ties by the row's position in the source
SORT_KEYS = ["complete_set", "ood_score", "row_index"]
SORT_DESCENDING = [True, True, False]
FIRST_COLUMNS = [
    "id", "rank", "ood_score", "p_value", "q_value", "flagged", "driver", "log_prob", "n_rows",
    "complete_set",
]  # fmt: skip
SCORE_BINS = 40
P_VALUE_EDGES = np.linspace(0.0, 1.0, 21)


def top_level_group(row_id: str, corpus_uri: str) -> str:
    """The first folder of a row's path below the corpus root ('.' for files at the root)."""
    root = corpus_uri.rstrip("/") + "/"
    path = row_id.split("#", 1)[0]
    if path.startswith(root):
        parts = path[len(root) :].split("/")
        return parts[0] if len(parts) > 1 else "."
    return path.rsplit(":", 1)[0] if "://" not in path and ":" in path else "."


def first_members(scores: pa.Table) -> list[str]:
    """The id of each score row's first image (a set is shown and grouped by its first member)."""
    if "member_ids" in scores.column_names:
        return [m[0] if m else "" for m in scores.column("member_ids").to_pylist()]
    return scores.column("id").to_pylist()


def _p_index(block: pa.Table, n_calibration: int) -> np.ndarray:
    """Conformal p-values are k / (n + 1): their integer k, for the block's complete sets."""
    complete = block.column("complete_set").to_numpy(zero_copy_only=False)
    p_value = block.column("p_value").to_numpy()[complete]
    return np.rint(p_value * (n_calibration + 1)).astype(np.int64)


@dataclass(frozen=True)
class BlockStats:
    num_rows: int
    p_index_counts: np.ndarray
    score_range: tuple[float, float] | None
    drift: RankSumPart


def block_stats(block: pa.Table, n_calibration: int, drift: RankSumDrift) -> BlockStats:
    """Pass 1 over one sorted block: what the driver needs to rank, adjust and test the whole run."""
    if block.num_rows == 0:  # an empty block may lack the columns
        return BlockStats(0, np.zeros(n_calibration + 1, np.int64), None, drift.part(np.zeros(0)))
    score = block.column("ood_score").to_numpy()
    complete = block.column("complete_set").to_numpy(zero_copy_only=False)
    finite = score[np.isfinite(score)]
    return BlockStats(
        num_rows=block.num_rows,
        p_index_counts=p_index_counts(_p_index(block, n_calibration), n_calibration),
        score_range=(float(finite.min()), float(finite.max())) if finite.size else None,
        drift=drift.part(score[complete]),
    )


@dataclass(frozen=True)
class RunStats:
    """The run-wide results of pass 1: first rank of each block, q-value of each index, histogram edges."""

    first_ranks: list[int]
    q_table: np.ndarray
    score_edges: np.ndarray | None
    drift: dict[str, Any]
    complete_sets: int


def merge_stats(
    parts: list[BlockStats], n_calibration: int, method: FdrMethod, drift: RankSumDrift
) -> RunStats:
    counts = np.sum([p.p_index_counts for p in parts], axis=0) if parts else np.zeros(n_calibration + 1)
    ranges = [p.score_range for p in parts if p.score_range is not None]
    edges = None
    if ranges:  # the edges np.histogram_bin_edges would give on all of the run's finite scores
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        edges = np.histogram_bin_edges(np.array([low, high]), bins=SCORE_BINS)
    sizes = np.array([p.num_rows for p in parts], np.int64)
    return RunStats(
        first_ranks=(1 + np.cumsum(sizes) - sizes).tolist(),
        q_table=q_value_table(counts, method),
        score_edges=edges,
        drift=drift.result([p.drift for p in parts]),
        complete_sets=int(np.sum(counts)),
    )


@dataclass
class FolderHistogram:
    """Rows of one top-level folder and the counts of their scores and p-values (the report's plots)."""

    rows: int
    score_counts: np.ndarray
    p_counts: np.ndarray

    def __add__(self, other: FolderHistogram) -> FolderHistogram:
        return FolderHistogram(
            self.rows + other.rows, self.score_counts + other.score_counts, self.p_counts + other.p_counts
        )


@dataclass(frozen=True)
class FinishedBlock:
    num_rows: int
    flagged: int
    top: list[dict[str, Any]]
    histograms: dict[str, FolderHistogram]
    #: flagged rows per test that drove their p-value (the ``driver`` column)
    flagged_by_driver: dict[str, int]


def finish_block(
    block: pa.Table,
    first_rank: int,
    run: RunStats,
    *,
    n_calibration: int,
    fdr: float,
    corpus_uri: str,
    top_k: int,
) -> tuple[pa.Table, FinishedBlock]:
    """Pass 2 over one sorted block: its final scores table and what the summary and report need of it.

    A set that lost members (rejected rows, the corpus's last set) has features of a smaller sum than
    the full-size sets the detector was fitted and calibrated on, so its score and p-value would be
    biased: it keeps its score for reference but gets no p-value, no q-value, no flag, and (by the sort)
    ranks after every complete set.
    """
    complete = block.column("complete_set").to_numpy(zero_copy_only=False)
    p_value = np.where(complete, block.column("p_value").to_numpy(), np.nan)
    q_value = np.full(block.num_rows, np.nan)
    p_index = _p_index(block, n_calibration)
    if p_index.size and (p_index.min() < 1 or p_index.max() > n_calibration + 1):
        raise ValueError(f"p-values must be k / {n_calibration + 1} with k in 1..{n_calibration + 1}")
    q_value[complete] = run.q_table[p_index - 1]
    flagged = np.zeros(block.num_rows, bool)
    flagged[complete] = fdr_flags(q_value[complete], fdr)
    rank = np.arange(first_rank, first_rank + block.num_rows, dtype=np.int64)
    table = block.set_column(block.column_names.index("p_value"), "p_value", pa.array(p_value))
    for name, values in (("rank", rank), ("q_value", q_value), ("flagged", flagged)):
        table = table.append_column(name, pa.array(values))
    table = table.select(FIRST_COLUMNS + [c for c in table.column_names if c not in FIRST_COLUMNS])
    groups = np.array([top_level_group(i, corpus_uri) for i in first_members(table)], dtype=object)
    score = table.column("ood_score").to_numpy()
    histograms = {}
    for name in sorted(set(groups.tolist())):
        mask = groups == name
        in_range = mask & np.isfinite(score)
        histograms[name] = FolderHistogram(
            rows=int(mask.sum()),
            score_counts=np.histogram(score[in_range], bins=run.score_edges)[0]
            if run.score_edges is not None
            else np.zeros(SCORE_BINS, np.int64),
            p_counts=np.histogram(p_value[mask & np.isfinite(p_value)], bins=P_VALUE_EDGES)[0],
        )
    top = table.slice(0, max(0, top_k - first_rank + 1)).to_pylist()
    counts = pc.value_counts(table.column("driver").filter(pa.array(flagged)))
    by_driver = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
    return table, FinishedBlock(table.num_rows, int(flagged.sum()), top, histograms, by_driver)


def merge_flagged_by_driver(blocks: list[FinishedBlock]) -> dict[str, int]:
    """Flagged rows per driving test over the run, most first (ties by name)."""
    merged: Counter[str] = Counter()
    for block in blocks:
        merged.update(block.flagged_by_driver)
    return dict(sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])))


def merge_histograms(blocks: list[FinishedBlock]) -> dict[str, FolderHistogram]:
    merged: dict[str, FolderHistogram] = {}
    for block in blocks:
        for name, hist in block.histograms.items():
            merged[name] = merged[name] + hist if name in merged else dataclasses.replace(hist)
    return dict(sorted(merged.items()))
