"""Every random draw in gradood derives from (seed, row id), never from a global RNG.

That makes a rerun, another shard layout, a different batch size and a per-sample reference loop
produce bit-identical noise for the same row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # torch only where noise is drawn, so gradood.stats stays free of it
    import torch


def row_seed(seed: int, row_id: str, stream: str = "") -> int:
    """A 63-bit seed for one row, stable across processes and platforms (unlike ``hash``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{stream}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class NoiseSpec:
    """Shape (per row, without the batch dimension) and distribution of one noise input."""

    shape: tuple[int, ...]
    dist: Literal["uniform", "normal"]


def draw_noise(
    specs: dict[str, NoiseSpec], row_ids: Sequence[str], seed: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Noise tensors ``[len(row_ids), *spec.shape]`` (float32 unless ``dtype``), row i drawn from a
    generator seeded by (seed, id_i)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    out: dict[str, torch.Tensor] = {}
    for name, spec in sorted(specs.items()):
        rows = []
        for rid in row_ids:
            gen = torch.Generator().manual_seed(row_seed(seed, rid, name))
            if spec.dist == "uniform":
                rows.append(torch.rand(spec.shape, generator=gen, dtype=torch.float64))
            elif spec.dist == "normal":
                rows.append(torch.randn(spec.shape, generator=gen, dtype=torch.float64))
            else:
                raise ValueError(f"unknown noise distribution {spec.dist!r} for noise input {name!r}")
        out[name] = torch.stack(rows).to(dtype) if rows else torch.empty((0, *spec.shape), dtype=dtype)
    return out


def row_uniforms(seed: int, row_ids: Sequence[str], stream: str) -> np.ndarray:
    """One uniform in [0, 1) per row id, a pure function of (seed, stream, id): for reproducible splits."""
    return np.array([row_seed(seed, rid, stream) / 2.0**63 for rid in row_ids], dtype=np.float64)
