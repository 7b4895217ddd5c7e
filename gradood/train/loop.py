"""The training loop proper, free of Ray: batches, noise, schedule and one epoch of optimisation.

The Ray Train worker (:mod:`gradood.train.worker`) adds ranks, checkpoints, reports and the data
(:mod:`gradood.train.data`: a Ray Dataset read through ``ray.train.get_dataset_shard``) around these
pieces; :class:`EpochRunner` only consumes an iterable of :class:`TrainBatch`, so it runs (and is
tested) in a plain process too.

Reproducibility: the dequantisation noise of row r in epoch e comes from
:func:`gradood.seeding.draw_noise` with row id ``f"{r}@epoch{e}"``, whatever batch or rank the row lands
in; the batches themselves are fixed by the seed and the number of workers (see
:mod:`gradood.train.data`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradood.config import TrainJobConfig
from gradood.models.base import DensityModel
from gradood.seeding import draw_noise

#: how often a progress line is printed inside an epoch
PROGRESS_EVERY_S = 30.0


@dataclass
class TrainBatch:
    """Decoded training rows: ``images`` uint8 ``[N, C, H, W]`` (cast to float on the device), their ids
    (which the noise is drawn from) and ``row_index``, their positions in the source's row order."""

    ids: list[str]
    row_index: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def row_noise(model: DensityModel, ids: Sequence[str], seed: int, tag: str) -> dict[str, torch.Tensor]:
    """Per-row noise of ``ids`` for one use (``tag``: "init" or "epoch{e}"), via the shared seeding path."""
    return draw_noise(model.noise_spec(), [f"{rid}@{tag}" for rid in ids], seed)


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup over the first ``warmup_steps`` optimiser steps (Glow's reference training warms up
    too): Adam's steps are full-size from the first batch, whatever its moment estimates are worth."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


def init_from_data(model: DensityModel, batch: TrainBatch, cfg: TrainJobConfig) -> None:
    """Data-dependent init (ActNorm) on ``batch``: the first ``train.init_rows`` decodable rows of the
    source, which every rank reads whole (not its share), so the init is identical on every rank without
    any communication."""
    model.init_from_data(batch.images.float(), row_noise(model, batch.ids, cfg.seed, "init"))


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
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
    forward) and the optimiser."""

    model: DensityModel
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainJobConfig
    device: torch.device
    progress: Callable[[str], None] = print

    def run(self, batches: Iterable[TrainBatch], epoch: int, step: int) -> tuple[EpochStats, int]:
        """One pass over ``batches`` (this rank's share of the epoch); returns the epoch's mean training
        loss (``model.loss_name``) and row count over all ranks and the optimiser step count after it
        (the warmup schedule runs on global steps). Every rank must bring the same number of batches:
        each step all-reduces."""
        cfg = self.cfg
        self.loss_module.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum, seen, num_batches = 0.0, 0, 0
        t0 = last_log = time.perf_counter()
        for batch in batches:
            if not len(batch):
                raise ValueError(f"empty training batch at epoch {epoch}, step {step}")
            x = batch.images.to(device=self.device, dtype=torch.float32)
            noise = row_noise(self.model, batch.ids, cfg.seed, f"epoch{epoch}")
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
            num_batches += 1
            loss_sum += loss.item() * len(batch)
            seen += len(batch)
            now = time.perf_counter()
            if now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                self.progress(
                    f"epoch {epoch} batch {num_batches}: {loss_sum / seen:.4f} {self.model.loss_name}, "
                    f"{seen / (now - t0):.1f} rows/s (this worker)"
                )
        total_loss, total_rows = all_reduce_sum([loss_sum, float(seen)], self.device)
        if total_rows == 0:
            raise ValueError(f"epoch {epoch} saw no training rows (fewer decodable rows than workers?)")
        seconds = time.perf_counter() - t0
        return EpochStats(epoch, total_loss / total_rows, int(total_rows), num_batches, seconds), step
