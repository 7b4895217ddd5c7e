"""Fit-set reduction: merge per-shard sufficient statistics of log f_j as shards finish.

``FitReducer`` is a plain class; ray_job runs it as an actor. It never holds the only copy of anything:
every statistic it merges is recomputable from the fit-set feature Parquet files
(:func:`moments_from_parquet`), which is what the driver does when the actor dies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradood.pipeline import storage
from gradood.pipeline.tables import sqnorm_matrix, table_metadata
from gradood.stats.detector import log_features
from gradood.stats.moments import Moments


class FitReducer:
    """Chan-merges per-shard (count, mean, M2) of log f_j and of -log p; idempotent per shard index."""

    def __init__(self, num_layers: int) -> None:
        self.logf = Moments.empty(num_layers)
        self.nll = Moments.empty(1)
        self.shards: set[int] = set()

    def add(self, shard: int, logf_moments: dict[str, Any], nll_moments: dict[str, Any]) -> int:
        if shard not in self.shards:  # Ray Data may re-run a shard after a worker failure
            self.shards.add(shard)
            self.logf = self.logf.merge(Moments.from_dict(logf_moments))
            self.nll = self.nll.merge(Moments.from_dict(nll_moments))
        return len(self.shards)

    def result(self) -> dict[str, Any]:
        return {"shards": sorted(self.shards), "logf": self.logf.to_dict(), "nll": self.nll.to_dict()}


def moments_from_parquet(
    features_uri: str, layer_names: Sequence[str], min_sqnorm: float
) -> tuple[Moments, Moments, list[int]]:
    """Recompute the reducer's result from the fit-set feature files, one file at a time."""
    logf, nll, shards = Moments.empty(len(layer_names)), Moments.empty(1), []
    for path in storage.list_files(features_uri):
        table = storage.read_parquet(path)
        shards.append(int(table_metadata(table)["shard"]))
        logf = logf.merge(Moments.from_values(log_features(sqnorm_matrix(table, layer_names), min_sqnorm)))
        nll = nll.merge(Moments.from_values(-table.column("log_prob").to_numpy()[:, None]))
    return logf, nll, sorted(shards)
