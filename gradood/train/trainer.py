"""Driver side of training: run the Ray Train job, then export its last checkpoint as the model."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gradood.config import TrainConfig, TrainJobConfig
from gradood.models import build_model
from gradood.models.checkpoint import WEIGHTS_FILE, read_checkpoint_meta, save_checkpoint
from gradood.train.worker import train_loop_per_worker


@dataclass
class TrainResult:
    #: absolute path of the exported checkpoint (model.pt + model.json)
    checkpoint_dir: str
    fingerprint: str
    #: last reported epoch metrics, plus "run": what this call did (epochs_run, initialized_from_data,
    #: history) and "ray_run": the Ray Train run directory
    metrics: dict[str, Any]


def local_or_uri(location: str) -> str:
    """Local paths absolute (Ray Train requires it), URIs (s3://, gs://) as they are."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def scaling_config(train: TrainConfig) -> ScalingConfig:
    return ScalingConfig(
        num_workers=train.num_workers,
        use_gpu=train.use_gpu,
        resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
    )


def export_checkpoint(source_dir: str | Path, destination: str | Path, extra: dict[str, Any]) -> str:
    """Rewrite a run checkpoint as a plain gradood checkpoint at ``destination``; returns its fingerprint,
    which must be the one the worker recorded (same weights, only metadata added)."""
    meta = read_checkpoint_meta(source_dir)
    model = build_model(meta["model"], meta["params"])
    model.load_state_dict(torch.load(Path(source_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    kept = {k: v for k, v in meta.items() if k not in ("model", "params", "fingerprint")}
    fp = save_checkpoint(model, destination, extra={**kept, **extra})
    if fp != meta["fingerprint"]:
        raise RuntimeError(
            f"exported weights {fp[:12]} differ from the run checkpoint's {meta['fingerprint'][:12]}"
        )
    return fp


def train_model(cfg: TrainJobConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.train.uri`` with Ray Train (Ray must be initialised) and export the
    final weights to ``cfg.model.checkpoint``.

    Rerunning with the same ``train.name`` and ``train.storage_path`` resumes from the run's latest
    checkpoint and trains only the epochs still missing up to ``train.epochs``.
    """
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=scaling_config(cfg.train),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=local_or_uri(cfg.train.storage_path),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(
            f"Ray Train run {result.path} finished without a checkpoint (train.epochs={cfg.train.epochs})"
        )
    destination = local_or_uri(cfg.model.checkpoint)
    with result.checkpoint.as_directory() as run_checkpoint:
        fp = export_checkpoint(run_checkpoint, destination, extra={"ray_run": result.path})
    metrics = {**(result.metrics or {}), "run": result.return_value, "ray_run": result.path}
    return TrainResult(destination, fp, metrics)
