"""Driver side of training: build the training Dataset, run the Ray Train job, then export its last
checkpoint as the model.

``train.runs_uri`` (the Ray Train run's checkpoints) and ``model.checkpoint`` (the exported model)
may be local paths or URIs (s3://, gs://, file://): storage paths go to Ray Train's ``RunConfig`` as
they are, and the export is written through :mod:`gradood.core.storage`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gradood.config import TrainConfig, TrainJobConfig
from gradood.core import storage
from gradood.core.progress import progress
from gradood.models import build_model
from gradood.models.checkpoint import META_FILE, WEIGHTS_FILE, read_checkpoint_meta, save_checkpoint
from gradood.train.data import READ_CPUS, data_config, shape_from_data, train_dataset, train_sources
from gradood.train.worker import BEST_WEIGHTS_FILE, train_loop_per_worker


@dataclass
class TrainResult:
    #: where the checkpoint (model.pt + model.json) was exported: an absolute path or a URI
    checkpoint_dir: str
    fingerprint: str
    #: last reported epoch metrics, plus "run": what this call did (epochs_run, initialized_from_data,
    #: history) and "ray_run": the Ray Train run directory
    metrics: dict[str, Any]


def run_storage(location: str) -> str:
    """Ray Train's storage path: a URI (any scheme Ray Train's filesystems take) as it is, a local path
    made absolute (Ray Train requires it)."""
    return location if "://" in location else storage.absolute(location)


@dataclass(frozen=True)
class TrainingCpus:
    """CPUs each training worker and each Ray Data task reading the training rows ask Ray for."""

    worker: float
    read: float


def plan_training_cpus(train: TrainConfig) -> TrainingCpus:
    """``train.cpus_per_worker`` per worker and :data:`~gradood.train.data.READ_CPUS` per read task, or
    shares of the cluster when it cannot hold every worker and a read task at once, which would leave
    the run waiting forever (a one-CPU container, a node whose CPUs actors hold): half the CPUs for the
    workers, half for reading. Reservations are not pinning: the workers still run
    ``train.cpus_per_worker`` threads."""
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    wanted = TrainingCpus(float(train.cpus_per_worker), READ_CPUS)
    if train.num_workers * wanted.worker + wanted.read <= cpus:
        return wanted
    shares = TrainingCpus(min(wanted.worker, cpus / 2 / train.num_workers), min(wanted.read, cpus / 2))
    progress(
        f"{cpus:g} CPUs cannot hold {train.num_workers} training worker(s) of train.cpus_per_worker="
        f"{train.cpus_per_worker} and a task reading the rows ({READ_CPUS:g} CPU): the workers ask for "
        f"{shares.worker:g} CPU each and the read tasks for {shares.read:g}, sharing the cores"
    )
    return shares


def run_name(cfg: TrainJobConfig) -> str:
    """The Ray Train run's name: ``train.name``, else the name of the folder the model is exported to."""
    return cfg.train.name or PurePosixPath(cfg.model.checkpoint.rstrip("/")).name


def scaling_config(train: TrainConfig, cpus_per_worker: float | None = None) -> ScalingConfig:
    return ScalingConfig(
        num_workers=train.num_workers,
        use_gpu=train.gpus_per_worker > 0,
        resources_per_worker={
            "CPU": train.cpus_per_worker if cpus_per_worker is None else cpus_per_worker,
            **({"GPU": train.gpus_per_worker} if train.gpus_per_worker > 0 else {}),
        },
    )


def model_card(meta: dict[str, Any]) -> dict[str, Any]:
    """What a user judges a trained model by: the exported epoch's held-out and training loss, the rows,
    the epochs run, the time and the fingerprint (``model.json``: ``training.card``)."""
    training = meta["training"]
    best, history, data = training["best"], training["history"], training["data"]
    exported = next(h for h in history if h["epoch"] == best["epoch"])
    return {
        "model": meta["model"],
        "loss": training["loss"],
        "epoch": best["epoch"],
        "heldout_loss": best["heldout_loss"],
        "train_loss": exported["train_loss"],
        "epochs_run": training["epochs_done"],
        "training_rows": data["rows"],
        "heldout_loss_rows": data.get("heldout_loss_rows", 0),
        "source": data["uri"],
        "seconds": round(sum(h.get("seconds", 0.0) for h in history), 1),
        "fingerprint": best["fingerprint"],
    }


def card_lines(card: dict[str, Any] | None, checkpoint: str, fingerprint: str) -> list[str]:
    """The model card as the training job prints it."""
    lines = [f"checkpoint: {checkpoint}", f"fingerprint: {fingerprint}"]
    if card is None:
        return lines
    heldout = card["heldout_loss"]
    return lines + [
        f"model card: {card['model']}, epoch {card['epoch']} of {card['epochs_run']} kept "
        + ("(best held-out loss)" if heldout is not None else "(the last: no held-out rows)"),
        f"  held-out: {'-' if heldout is None else f'{heldout:.4f}'} {card['loss']} on "
        f"{card['heldout_loss_rows']} rows; train: {card['train_loss']:.4f} {card['loss']}",
        f"  trained on {card['training_rows']} rows of {card['source']} in {card['seconds']:.0f} s",
    ]


def export_checkpoint(source_dir: str | Path, destination: str, extra: dict[str, Any]) -> str:
    """Rewrite a run checkpoint's best epoch (:data:`~gradood.train.worker.BEST_WEIGHTS_FILE`; the
    checkpoint's own weights when it has none) as a plain gradood checkpoint at ``destination`` (a local
    path or a URI), with the model card in its metadata; returns its fingerprint, which must be the one
    the worker recorded (same weights, metadata added).

    The checkpoint is written locally first, then copied file by file through
    :mod:`gradood.core.storage`, weights before metadata (a reader takes a checkpoint with both).
    """
    meta = read_checkpoint_meta(source_dir)
    best_file = Path(source_dir) / BEST_WEIGHTS_FILE
    expected = meta["fingerprint"]
    if best_file.is_file():
        expected = meta["training"]["best"]["fingerprint"]
        meta["training"]["card"] = model_card(meta)
    model = build_model(meta["model"], meta["params"])
    weights = best_file if best_file.is_file() else Path(source_dir) / WEIGHTS_FILE
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    kept = {k: v for k, v in meta.items() if k not in ("model", "params", "fingerprint")}
    with tempfile.TemporaryDirectory() as tmp:
        fp = save_checkpoint(model, tmp, extra={**kept, **extra})
        if fp != expected:
            raise RuntimeError(f"exported weights {fp[:12]} differ from the run checkpoint's {expected[:12]}")
        for name in (WEIGHTS_FILE, META_FILE):
            storage.write_bytes(storage.join(destination, name), (Path(tmp) / name).read_bytes())
    return fp


def train_model(cfg: TrainJobConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.train.uri`` with Ray Train (Ray must be initialised) and export the
    final weights to ``cfg.model.checkpoint``. The rows reach the workers as a Ray Dataset
    (:func:`~gradood.train.data.train_dataset`), read lazily and split between them.

    Rerunning with the same ``train.name`` and ``train.runs_uri`` resumes from the run's latest
    checkpoint and trains only the epochs still missing up to ``train.epochs``.
    """
    sources = train_sources(cfg)
    found = shape_from_data(cfg, sources[0])
    if found:
        progress(f"input shape from the training data: {found} (model.params sets it otherwise)")
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, params={**cfg.model.params, **found})
        )
    with torch.random.fork_rng(devices=[]):  # only for its input size (what the reader decodes to)
        model = build_model(cfg.model.name, cfg.model.params)
    cpus = plan_training_cpus(cfg.train)
    data = train_dataset(cfg, model, sources=sources, read_cpus=cpus.read)
    if data.held_out is None:
        progress(
            f"WARNING: no rows of {cfg.train.uri} are held out of training (train.holdout_fraction=0 and "
            "no rows after train.size): no held-out loss, and the scoring job needs fit.uri set to "
            "in-distribution images the model never saw"
        )
    init_ref = ray.put(data.init)  # held here until fit() returns
    held_out_ref = None if data.held_out is None else ray.put(data.held_out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": dataclasses.asdict(cfg),
            "data": {**data.origin, "heldout_loss_rows": 0 if data.held_out is None else len(data.held_out)},
            "init": init_ref,
            "held_out": held_out_ref,
        },
        scaling_config=scaling_config(cfg.train, cpus.worker),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=run_storage(cfg.train.runs_uri),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": data.dataset},
        dataset_config=data_config(),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(
            f"Ray Train run {result.path} finished without a checkpoint (train.epochs={cfg.train.epochs})"
        )
    destination = storage.absolute(cfg.model.checkpoint)
    with result.checkpoint.as_directory() as run_checkpoint:
        fp = export_checkpoint(run_checkpoint, destination, extra={"ray_run": result.path})
    metrics = {**(result.metrics or {}), "run": result.return_value, "ray_run": result.path}
    return TrainResult(destination, fp, metrics)
