"""Fit-set reduction: merge per-shard sufficient statistics of [log f_j, log p] as shards finish.

``FitReducer`` is a plain class; the pipeline runs it as an actor. It never holds the only copy of
anything: every statistic it merges is recomputable from the fit-set feature Parquet files
(:func:`moments_from_parquet`), which is what the driver does when the actor dies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.compute as pc

from gradood.core import storage
from gradood.pipeline.tables import EXTRACTED_COLUMNS, SPLIT_COLUMN, feature_matrix, table_metadata
from gradood.stats.moments import Moments


class FitReducer:
    """Chan-merges per-shard (count, mean, co-moments) of the fit rows; idempotent per shard index."""

    def __init__(self, num_features: int) -> None:
        self.moments = Moments.empty(num_features)
        self.shards: set[int] = set()

    def add(self, shard: int, moments: dict[str, Any]) -> int:
        if shard not in self.shards:  # Ray Data may re-run a shard after a worker failure
            self.shards.add(shard)
            self.moments = self.moments.merge(Moments.from_dict(moments))
        return len(self.shards)

    def result(self) -> dict[str, Any]:
        return {"shards": sorted(self.shards), "moments": self.moments.to_dict()}


def moments_from_parquet(features_uri: str, layer_names: Sequence[str], min_sqnorm: float) -> Moments:
    """Recompute the reducer's result from the fit-set feature files' fit rows, one file at a time."""
    moments = Moments.empty(len(layer_names) + len(EXTRACTED_COLUMNS))
    for path in storage.list_files(features_uri):
        table = storage.read_parquet(path)
        table_metadata(table)  # a stray non-gradood file is an error, not silently merged
        fit_rows = table.filter(pc.equal(table.column(SPLIT_COLUMN), 0))
        moments = moments.merge(Moments.from_values(feature_matrix(fit_rows, layer_names, min_sqnorm)))
    return moments
