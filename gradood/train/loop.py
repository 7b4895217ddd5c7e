"""The training loop proper, free of Ray: data, noise, schedule and one epoch of optimisation.

The Ray Train worker (:mod:`gradood.train.worker`) only adds ranks, checkpoints and reports around
these pieces, so everything here runs (and is tested) in a plain process too.

Reproducibility: the row order of epoch e comes from a generator seeded by (seed, e), the
dequantisation noise of row r in epoch e from :func:`gradood.seeding.draw_noise` with row id
``f"{r}@epoch{e}"``. A rerun, or a run resumed from the checkpoint of epoch e-1, therefore sees the
same batches and the same noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradood.config import TrainJobConfig
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source
from gradood.models.base import DensityModel
from gradood.seeding import draw_noise, row_seed

#: how often a progress line is printed inside an epoch
PROGRESS_EVERY_S = 30.0


@dataclass
class TrainRows:
    """Decoded training rows: ``images`` uint8 ``[N, C, H, W]``, cast to float one batch at a time."""

    ids: list[str]
    images: torch.Tensor
    #: where the rows came from (source description, row and skip counts), saved in checkpoints
    origin: dict

    def __len__(self) -> int:
        return len(self.ids)

    def shard(self, rank: int, world_size: int) -> TrainRows:
        """Rows rank, rank + W, ...; every rank gets N // W rows so all take the same number of steps
        (DDP all-reduces once per step and would hang on a rank with an extra batch)."""
        stop = len(self) // world_size * world_size
        return TrainRows(self.ids[rank:stop:world_size], self.images[rank:stop:world_size], self.origin)


def load_train_rows(cfg: TrainJobConfig, model: DensityModel) -> TrainRows:
    """Every training row, converted to the model's mode and size; undecodable rows are skipped."""
    source = open_source(cfg.train.uri, limit=cfg.train.limit)
    converter = ImageConverter(
        model.image_mode, model.input_shape[1:], cfg.image.resize, cfg.image.interpolation
    )
    loaded = load_all(source, converter)
    if not loaded.ids:
        raise ValueError(
            f"no usable training rows in {cfg.train.uri} ({len(loaded.errors)} failed to decode)"
        )
    origin = {**source.describe(), "rows": len(loaded.ids), "skipped": len(loaded.errors)}
    return TrainRows(loaded.ids, torch.from_numpy(loaded.images), origin)


def row_noise(model: DensityModel, ids: Sequence[str], seed: int, tag: str) -> dict[str, torch.Tensor]:
    """Per-row noise of ``ids`` for one use (``tag``: "init" or "epoch{e}"), via the shared seeding path."""
    return draw_noise(model.noise_spec(), [f"{rid}@{tag}" for rid in ids], seed)


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of ``epoch``: a function of (seed, epoch) alone, so resuming repeats it."""
    gen = torch.Generator().manual_seed(row_seed(seed, f"epoch{epoch}", "shuffle"))
    return torch.randperm(num_rows, generator=gen)


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup over the first ``warmup_steps`` optimiser steps (Glow's reference training warms up
    too): Adam's steps are full-size from the first batch, whatever its moment estimates are worth."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


def init_from_data(model: DensityModel, rows: TrainRows, cfg: TrainJobConfig) -> None:
    """Data-dependent init (ActNorm) on the first ``init_rows`` rows of the whole training set, so it is
    identical on every rank without any communication."""
    take = min(cfg.train.init_rows, len(rows))
    ids = rows.ids[:take]
    model.init_from_data(rows.images[:take].float(), row_noise(model, ids, cfg.seed, "init"))


@dataclass
class EpochStats:
    epoch: int
    train_bpd: float
    rows: int
    steps: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks when torch.distributed is running (Ray Train with several workers), else as is."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


@dataclass
class EpochRunner:
    """What stays fixed across epochs: the model, its loss (``model.training_loss`` behind a DDP wrapper
    when there are several workers, since DDP synchronises gradients only for calls through its
    forward), the optimiser and this rank's batch size."""

    model: DensityModel
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainJobConfig
    batch_size: int
    device: torch.device
    log: Callable[[str], None] = print

    def run(self, rows: TrainRows, epoch: int, step: int) -> tuple[EpochStats, int]:
        """One pass over ``rows`` (this rank's shard); returns the epoch's mean bits/dim over all ranks
        and the optimiser step count after it (the warmup schedule runs on global steps)."""
        cfg = self.cfg
        self.loss_module.train()
        order = epoch_order(len(rows), cfg.seed, epoch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        num_batches = math.ceil(len(rows) / self.batch_size)
        loss_sum, seen = 0.0, 0
        t0 = last_log = time.perf_counter()
        for start in range(0, len(rows), self.batch_size):
            index = order[start : start + self.batch_size]
            ids = [rows.ids[i] for i in index.tolist()]
            x = rows.images[index].to(device=self.device, dtype=torch.float32)
            noise = row_noise(self.model, ids, cfg.seed, f"epoch{epoch}")
            noise = {k: v.to(self.device) for k, v in noise.items()}
            for group in self.optimizer.param_groups:
                group["lr"] = warmup_lr(step, cfg.train.lr, cfg.train.warmup_steps)
            loss = self.loss_module(x, noise)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss is {loss.item()} at epoch {epoch}, step {step}: lower train.lr, raise "
                    "train.warmup_steps or tighten train.grad_clip"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            self.optimizer.step()
            step += 1
            loss_sum += loss.item() * len(ids)
            seen += len(ids)
            now = time.perf_counter()
            if now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                self.log(
                    f"epoch {epoch} batch {start // self.batch_size + 1}/{num_batches}: "
                    f"{loss_sum / seen:.4f} bits/dim, {seen / (now - t0):.1f} rows/s (this worker)"
                )
        total_loss, total_rows = all_reduce_sum([loss_sum, float(seen)], self.device)
        seconds = time.perf_counter() - t0
        return EpochStats(epoch, total_loss / total_rows, int(total_rows), num_batches, seconds), step
