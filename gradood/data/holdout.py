"""The held-out split of a training source: the rows a model never trains on, kept for the detector.

A row is held out when a uniform drawn from (seed, row id) falls below the held-out fraction
(:class:`HoldoutRule`). The rule depends on nothing but the row's id, so the training job and the scoring
job, another shard layout or a rerun all put a row on the same side, and a file added to a folder later
does not move any other row across. :class:`HeldOutSplit` presents one side of the split as a source of
its own: the training job trains on the training side, the scoring job fits and calibrates the detector
on the held-out side of the same source when ``fit.uri`` is not given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from gradood.data.base import CorpusSource, RawRow, Shard
from gradood.seeding import row_uniforms

#: the stream of the per-row uniforms that decide the held-out split
HOLDOUT_STREAM = "holdout"
#: ids hashed at a time while planning the split
_ID_CHUNK = 10_000
#: rows of a range source read through to reach the next selected row rather than starting a new read
_MAX_READ_GAP = 256


class Side(StrEnum):
    training = "training"
    held_out = "held_out"


@dataclass(frozen=True)
class HoldoutRule:
    """Row ``id`` is held out when ``row_uniform(seed, id, "holdout") < fraction``."""

    fraction: float
    seed: int

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {self.fraction}")

    def held_out(self, ids: list[str]) -> np.ndarray:
        return row_uniforms(self.seed, ids, HOLDOUT_STREAM) < self.fraction

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "stream": HOLDOUT_STREAM}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HoldoutRule:
        if d.get("stream", HOLDOUT_STREAM) != HOLDOUT_STREAM:
            raise ValueError(f"unknown held-out rule {d!r}")
        return cls(float(d["fraction"]), int(d["seed"]))


class HeldOutSplit(CorpusSource):
    """One side of ``inner``'s held-out split, in ``inner``'s order; ``start``/``limit`` select a range of
    that side (row_index counts this side's rows; ids stay the inner source's)."""

    def __init__(
        self,
        inner: CorpusSource,
        rule: HoldoutRule,
        side: Side,
        start: int = 0,
        limit: int | None = None,
    ):
        super().__init__(inner.uri, start, limit, inner.max_pixels, inner.max_bytes)
        self.inner, self.rule, self.side = inner, rule, Side(side)
        self.kind = inner.kind

    def _selected(self) -> np.ndarray:
        """The inner row indices on this side, ascending."""

        def build() -> np.ndarray:
            first, stop = self.inner.start, self.inner.start + self.inner.num_rows()
            chosen = []
            for lo in range(first, stop, _ID_CHUNK):
                hi = min(stop, lo + _ID_CHUNK)
                held = self.rule.held_out(self.inner.row_ids(lo, hi))
                chosen.append(lo + np.flatnonzero(held == (self.side is Side.held_out)))
            return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)

        return self._cached("selected", build)

    def total_rows(self) -> int:
        return int(self._selected().size)

    def row_ids(self, first_row: int, end_row: int) -> list[str]:
        rows = self._selected()[first_row:end_row]
        if not rows.size:
            return []
        ids = self.inner.row_ids(int(rows[0]), int(rows[-1]) + 1)
        return [ids[int(r - rows[0])] for r in rows]

    def _locate(self, first_row: int, end_row: int) -> tuple:
        """(selected inner rows, inner reads): each read a (first, stop, inner locator) range of inner
        rows that holds selected rows, merged across short gaps unless rows are read one by one anyway."""
        rows = [int(r) for r in self._selected()[first_row:end_row]]
        gap = 1 if self.inner.reads_rows_alone else _MAX_READ_GAP
        reads: list[tuple[int, int]] = []
        for r in rows:
            if reads and r - reads[-1][1] < gap:
                reads[-1] = (reads[-1][0], r + 1)
            else:
                reads.append((r, r + 1))
        return tuple(rows), tuple((lo, hi, self.inner._locate(lo, hi)) for lo, hi in reads)

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        rows, reads = shard.locator
        wanted = set(rows)
        row_index = shard.first_row
        for lo, hi, locator in reads:
            for row in self.inner.read_shard(Shard(-1, lo, hi - lo, locator)):
                if row.row_index in wanted:
                    yield RawRow(row.id, row_index, row.payload, row.error)
                    row_index += 1

    def skipped(self) -> dict[str, int]:
        return self.inner.skipped()

    def describe(self) -> dict:
        """The inner source's description (its range: ``start``, ``limit``, ``source_rows``) with this
        side's row count as ``num_rows`` and the rule under ``holdout``."""
        return {
            **self.inner.describe(),
            "num_rows": self.num_rows(),
            "source_rows": self.inner.num_rows(),
            "holdout": {
                **self.rule.to_dict(),
                "side": self.side.value,
                "start": self.start,
                "limit": self.limit,
            },
        }


def held_out_rows(
    training_data: dict[str, Any] | None, start: int = 0, limit: int | None = None
) -> CorpusSource:
    """The rows a checkpoint held out of its training source, as its ``model.json`` records the source
    (``training.data``): the held-out side of its split, or, for a model trained on a leading range of
    the source (``train.size``) without one, the rows after that range. ``start``/``limit`` select a
    range of them (``fit.start``, ``fit.size``)."""
    from gradood.data.sources import open_source

    if not training_data or "uri" not in training_data:
        raise ValueError(
            "fit.uri is not set and the checkpoint does not record its training data: set fit.uri "
            "(fit.start, fit.size) to in-distribution images the model never trained on"
        )
    uri, first = training_data["uri"], int(training_data.get("start") or 0)
    trained = open_source(uri, start=first, limit=training_data.get("limit"))
    if "holdout" in training_data:
        rule = HoldoutRule.from_dict(training_data["holdout"])
        return HeldOutSplit(trained, rule, Side.held_out, start, limit)
    after = first + trained.num_rows()
    total = trained.total_rows()
    if after >= total:
        raise ValueError(
            f"fit.uri is not set and the checkpoint trained on every row of {uri} from row {first} on, "
            "holding none out: retrain with train.holdout_fraction > 0, or set fit.uri (fit.start, "
            "fit.size) to in-distribution images the model never trained on"
        )
    if after + start >= total:
        raise ValueError(f"fit.start={start} is past the {total - after} rows held out of {uri}")
    return trained.with_range(after + start, limit)
