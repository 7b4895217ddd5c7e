"""Checkpoints are a plain state dict (``model.pt``) plus JSON metadata (``model.json``).

Loading uses ``torch.load(weights_only=True)``: a checkpoint can never run code. The fingerprint, a
sha256 over every tensor's name, dtype, shape and bytes, identifies the model in every artifact
downstream (feature Parquet metadata, detector.json).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from gradood.models import DensityModel, build_model

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    return fingerprint(model.state_dict())


def save_checkpoint(model: DensityModel, directory: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write weights and metadata to ``directory``; returns the model fingerprint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    fp = fingerprint(state)
    meta = {"model": model.name, "params": model.hparams(), "fingerprint": fp, **(extra or {})}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return fp


def checkpoint_exists(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / WEIGHTS_FILE).is_file() and (directory / META_FILE).is_file()


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[DensityModel, dict]:
    """Rebuild the model from metadata and load its weights; verifies the recorded fingerprint."""
    directory = Path(directory)
    if not checkpoint_exists(directory):
        raise FileNotFoundError(
            f"no gradood checkpoint in {directory} (expected {WEIGHTS_FILE} and {META_FILE})"
        )
    return model_from_bytes(
        (directory / WEIGHTS_FILE).read_bytes(), read_checkpoint_meta(directory), map_location
    )


def model_from_bytes(
    weights: bytes, meta: dict[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[DensityModel, dict]:
    """The model from serialized weights and metadata (how Ray workers on other nodes receive it)."""
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    fp = fingerprint(state)
    if meta.get("fingerprint") not in (None, fp):
        raise ValueError(
            f"corrupt checkpoint: weights fingerprint {fp[:12]} != recorded {meta['fingerprint'][:12]}"
        )
    model = build_model(meta["model"], meta["params"])
    model.load_state_dict(state)
    model.prepare_for_scoring()
    return model.to(map_location), {**meta, "fingerprint": fp}
