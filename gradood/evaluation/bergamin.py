"""Bergamin et al. (2022) as a baseline: the diagonal-Fisher score statistic of every parameter element,
combined with typicality by Fisher's method and calibrated like gradood's own combined test.

It needs each row's full gradient, not per-layer norms, so it runs in-process on the evaluation driver
(vmap, about 1.8x a plain forward+backward) and is not part of the screening job.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gradood.data.base import CorpusSource
from gradood.data.images import ImageConverter
from gradood.data.sources import LoadedRows, load_all
from gradood.features.fisher_score import DiagonalFisher, diagonal_fisher, fisher_score_statistic
from gradood.models.base import DensityModel
from gradood.pipeline.stages import group_id
from gradood.seeding import draw_noise

#: rows per vmap batch (rounded down to whole groups)
BATCH_ROWS = 64


def _batches(
    model: DensityModel, rows: LoadedRows, group_size: int, seed: int
) -> Iterator[tuple[list[str], torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """(feature-row ids, x, noise, local groups) over runs of whole groups, grouped as the pipeline does."""
    global_group = np.asarray(rows.row_index, np.int64) // group_size
    starts = np.flatnonzero(np.r_[True, global_group[1:] != global_group[:-1]])
    ends = np.r_[starts[1:], len(global_group)]
    per_batch = max(1, BATCH_ROWS // group_size)
    for lo in range(0, len(starts), per_batch):
        hi = min(lo + per_batch, len(starts))
        r0, r1 = int(starts[lo]), int(ends[hi - 1])
        local = np.repeat(np.arange(hi - lo), ends[lo:hi] - starts[lo:hi])
        ids = [rows.ids[s] if group_size == 1 else group_id(int(global_group[s])) for s in starts[lo:hi]]
        x = torch.from_numpy(rows.images[r0:r1]).float()
        yield ids, x, draw_noise(model.noise_spec(), rows.ids[r0:r1], seed), torch.from_numpy(local)


def load_rows(source: CorpusSource, model: DensityModel) -> LoadedRows:
    return load_all(source, ImageConverter.for_model(model))


def fit_fisher(
    model: DensityModel, rows: LoadedRows, keep: set[str], group_size: int, seed: int
) -> DiagonalFisher:
    """The diagonal Fisher over the feature rows in ``keep`` (the fit part of the held-out rows)."""

    def fit_batches():
        for ids, x, noise, groups in _batches(model, rows, group_size, seed):
            mask = np.array([i in keep for i in ids])
            if mask.any():
                row_mask = torch.from_numpy(mask)[groups]
                local = torch.unique(groups[row_mask], return_inverse=True)[1]
                yield x[row_mask], {k: v[row_mask] for k, v in noise.items()}, local

    return diagonal_fisher(model, fit_batches())


def log_score_statistic(
    model: DensityModel, rows: LoadedRows, fisher: DiagonalFisher, group_size: int, seed: int
) -> dict[str, float]:
    """{feature-row id: log of the score statistic} for every group of ``rows``."""
    out: dict[str, float] = {}
    for ids, x, noise, groups in _batches(model, rows, group_size, seed):
        stat = fisher_score_statistic(model, x, noise, groups, fisher)
        out.update(zip(ids, np.log(stat).tolist(), strict=True))
    return out
