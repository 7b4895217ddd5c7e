"""The Ray Train worker function: one copy runs per training worker (rank), under Ray Train V2.

Every epoch ends in ``ray.train.report`` (a barrier across ranks) with a checkpoint directory written by
rank 0: ``model.pt`` + ``model.json`` (a regular gradood checkpoint) and ``train_state.pt`` (optimiser
state, epoch, step, history), all loadable with ``torch.load(weights_only=True)``. A run restarted after
a failure, or rerun with the same Ray Train name and storage path, continues from the latest one via
``ray.train.get_checkpoint()``; the data-dependent init is then not run again.

Data: the training rows arrive through Ray Data (``datasets=`` on the trainer, see
:mod:`gradood.train.data`): every epoch, this rank iterates its share of ``get_dataset_shard("train")``;
a fresh run's data-dependent init uses the first rows of the source, the same on every rank (shipped by
the driver through the object store).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf
from torch import nn

import gradood
from gradood.config import TrainJobConfig
from gradood.models import DensityModel, build_model
from gradood.models.checkpoint import WEIGHTS_FILE, fingerprint, save_checkpoint
from gradood.train.data import epoch_batches
from gradood.train.loop import EpochRunner, EpochStats, TrainBatch, all_reduce_sum, init_from_data, row_noise

STATE_FILE = "train_state.pt"
#: the weights of the epoch with the best held-out loss so far (the last epoch's without held-out rows)
BEST_WEIGHTS_FILE = "best_model.pt"
#: Ray Train V2 forwards worker log records to the driver console; print() there comes out twice
logger = logging.getLogger(__name__)


class TrainingLoss(nn.Module):
    """``model.training_loss`` as a forward pass, so DistributedDataParallel can wrap it."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.training_loss(x, noise)


def config_from_dict(config: dict[str, Any]) -> TrainJobConfig:
    """The typed config back from the plain dict Ray ships to workers (validated again on the way)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainJobConfig), config))


@dataclass
class BestEpoch:
    """The epoch whose weights are exported: the best held-out loss so far, or the last epoch when
    there are no held-out rows."""

    epoch: int
    heldout_loss: float | None
    weights: dict[str, torch.Tensor]

    def record(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "heldout_loss": self.heldout_loss,
            "fingerprint": fingerprint(self.weights),
        }

    def improved_by(self, heldout_loss: float | None) -> bool:
        return heldout_loss is None or self.heldout_loss is None or heldout_loss < self.heldout_loss


def write_checkpoint(
    directory: str,
    model: DensityModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list[dict[str, float]],
    best: BestEpoch,
    cfg: TrainJobConfig,
    data: dict[str, Any],
) -> None:
    """``data``: where the rows came from (the source's description) and how many were trained on."""
    last = history[-1]
    training = {
        "config": dataclasses.asdict(cfg),
        "epochs_done": int(last["epoch"]),
        "train_loss": last["train_loss"],
        "loss": model.loss_name,
        "history": history,
        "best": best.record(),
        "data": data,
    }
    save_checkpoint(model, directory, extra={"gradood_version": gradood.__version__, "training": training})
    torch.save(best.weights, Path(directory) / BEST_WEIGHTS_FILE)
    state = {
        "optimizer": optimizer.state_dict(),
        "epoch": int(last["epoch"]),
        "step": step,
        "history": history,
        "best_epoch": best.epoch,
        "best_heldout_loss": best.heldout_loss,
    }
    torch.save(state, Path(directory) / STATE_FILE)


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, train state with the best epoch's weights under ``best_weights``) of a
    checkpoint written by :func:`write_checkpoint`."""
    with checkpoint.as_directory() as directory:
        weights = torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        best_file = Path(directory) / BEST_WEIGHTS_FILE
        best = torch.load(best_file, map_location="cpu", weights_only=True) if best_file.is_file() else None
    return weights, {**state, "best_weights": best}


def heldout_loss(
    model: DensityModel, rows: TrainBatch | None, cfg: TrainJobConfig, device: torch.device
) -> float | None:
    """The model's mean loss (``model.loss_name``) over the held-out rows, each rank taking every
    world-size-th row and the sum all-reduced, so every rank gets the same number (None: no rows). The
    noise is drawn from (seed, row id, "heldout"), the same every epoch, so epochs compare."""
    if rows is None:
        return None
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    mine = range(rank, len(rows), world_size)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(mine), cfg.train.batch_size):
            picked = list(mine[lo : lo + cfg.train.batch_size])
            ids = [rows.ids[i] for i in picked]
            x = rows.images[picked].to(device=device, dtype=torch.float32)
            noise = {k: v.to(device) for k, v in row_noise(model, ids, cfg.seed, "heldout").items()}
            total += float(model.training_loss(x, noise)) * len(picked)
            count += len(picked)
    total, count = all_reduce_sum([total, float(count)], device)
    return total / count


def epoch_metrics(stats: EpochStats, start_epoch: int, heldout: float | None) -> dict[str, Any]:
    return {
        "epoch": stats.epoch,
        "train_loss": stats.train_loss,
        "heldout_loss": heldout,
        "rows_per_s": stats.rows_per_s,
        "epoch_seconds": stats.seconds,
        "rows": stats.rows,
        "steps": stats.steps,
        "start_epoch": start_epoch,
    }


def initial_state(model: DensityModel, cfg: TrainJobConfig, init: ray.ObjectRef) -> dict[str, Any]:
    """Resume from the run's latest checkpoint when there is one (the data init already happened and is
    in the weights); otherwise run the data-dependent init on a fresh model, on the rows ``init`` holds."""
    resume = ray.train.get_checkpoint()
    if resume is None:
        batch: TrainBatch = ray.get(init)
        init_from_data(model, batch, cfg)
        return {"epoch": 0, "step": 0, "history": [], "optimizer": None, "best_weights": None}
    weights, state = read_checkpoint(resume)
    model.load_state_dict(weights)
    return state


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train from scratch or from the latest checkpoint up to ``train.epochs``; rank 0's return value
    (epochs run in this call, whether the data init ran) reaches the driver as ``Result.return_value``.

    ``config``: ``{"job": the TrainJobConfig as a dict, "data": the source's description, "init": an
    object ref to the rows of the data-dependent init, "held_out": one to the held-out loss's rows, or
    None}``. After every epoch the held-out loss decides the best epoch, whose weights every checkpoint
    carries (:data:`BEST_WEIGHTS_FILE`); with ``train.patience`` the run stops once that many epochs in a
    row were no better. Every rank computes the same held-out loss, so all stop together.
    """
    cfg = config_from_dict(config["job"])
    source = dict(config["data"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if cfg.train.batch_size % world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} does not split over {world_size} workers")

    def progress(message: str) -> None:
        logger.log(logging.INFO if rank == 0 else logging.DEBUG, f"[gradood.train] {message}")

    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # parameter init draws from the global generator: same model on every rank
    model = build_model(cfg.model.name, cfg.model.params)
    state = initial_state(model, cfg, config["init"])
    start_epoch, step, history = state["epoch"] + 1, state["step"], list(state["history"])
    held_out: TrainBatch | None = ray.get(config["held_out"]) if config["held_out"] is not None else None
    best = None
    if state["best_weights"] is not None:
        best = BestEpoch(state["best_epoch"], state["best_heldout_loss"], state["best_weights"])

    loss_module = ray.train.torch.prepare_model(TrainingLoss(model))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    device = ray.train.torch.get_device()
    runner = EpochRunner(model, loss_module, optimizer, cfg, device, progress)
    batch_size = cfg.train.batch_size // world_size

    plan = (
        f"epochs {start_epoch}..{cfg.train.epochs}" if start_epoch <= cfg.train.epochs else "nothing to train"
    )
    plan += f", held-out loss on {len(held_out)} rows" if held_out is not None else ", no held-out rows"
    progress(
        f"{cfg.model.name}: {sum(p.numel() for p in model.parameters())} parameters, {source['num_rows']} "
        f"source rows in {source['blocks']} Ray Data blocks over {world_size} worker(s) on {device}; "
        f"{f'resuming after epoch {start_epoch - 1}, ' if start_epoch > 1 else ''}{plan}"
    )
    shard = ray.train.get_dataset_shard("train")
    epochs_run = []
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        stats, step = runner.run(epoch_batches(shard, batch_size, cfg.seed, epoch, rank), epoch, step)
        loss = heldout_loss(model, held_out, cfg, device)
        history.append(
            {
                "epoch": epoch,
                "train_loss": stats.train_loss,
                "heldout_loss": loss,
                "rows_per_s": stats.rows_per_s,
                "seconds": stats.seconds,
            }
        )
        if best is None or best.improved_by(loss):
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = BestEpoch(epoch, loss, weights)
        progress(
            f"epoch {epoch}/{cfg.train.epochs}: train {stats.train_loss:.4f} {model.loss_name}"
            + (f", held-out {loss:.4f} (best: epoch {best.epoch})" if loss is not None else "")
            + f", {stats.rows} rows, {stats.rows_per_s:.1f} rows/s, {stats.seconds:.0f} s"
        )
        # rows trained on per epoch; "skipped": source rows that were not (undecodable, or left out by
        # Ray's equal split so that every rank takes the same number of steps: at most W - 1)
        data = {**source, "rows": stats.rows, "skipped": source["num_rows"] - stats.rows}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                write_checkpoint(tmp, model, optimizer, step, history, best, cfg, data)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(epoch_metrics(stats, start_epoch, loss), checkpoint=checkpoint)
        epochs_run.append(epoch)
        if cfg.train.patience is not None and epoch - best.epoch >= cfg.train.patience:
            progress(
                f"early stop after epoch {epoch}: no better held-out loss for {cfg.train.patience} epochs"
            )
            break
    return {"epochs_run": epochs_run, "initialized_from_data": start_epoch == 1, "history": history}
