"""Types and helpers shared by every feature extractor (loop, vmap, engine)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class FeatureResult:
    """Per-row log-likelihoods and per-group, per-parameter-tensor squared gradient norms."""

    #: float64 [N] log-likelihood of each row in nats
    log_prob: np.ndarray
    #: float64 [G, L]: ||sum_{i in group g} grad_{theta_j} log p(x_i)||^2 for every layer j
    sqnorms: np.ndarray
    #: the L parameter names, in the order of ``sqnorms``' columns
    layer_names: list[str]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters features are computed for; ``named_parameters`` lists a tied tensor once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def feature_layer_names(model: nn.Module) -> list[str]:
    return list(trainable_parameters(model))


def group_ids(n: int, group_size: int) -> torch.Tensor:
    """Consecutive groups of ``group_size`` rows (the last one may be shorter)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return torch.arange(n) // group_size


def check_groups(groups: torch.Tensor | None, n: int) -> torch.Tensor:
    """Default to one group per row; otherwise require labels 0..G-1 in order, each group contiguous.

    Contiguous, ordered labels let every extractor stream over row chunks and close a group as soon
    as its last row has been seen.
    """
    if groups is None:
        return torch.arange(n)
    groups = torch.as_tensor(groups).cpu()
    if groups.shape != (n,) or groups.dtype != torch.long:
        raise ValueError(
            f"groups must be a long tensor of shape [{n}], got {groups.dtype} {tuple(groups.shape)}"
        )
    if n and (groups[0] != 0 or not bool(((groups[1:] - groups[:-1]) >= 0).all())):
        raise ValueError("groups must start at 0 and never decrease (each group a contiguous run of rows)")
    if n and not bool(((groups[1:] - groups[:-1]) <= 1).all()):
        raise ValueError("groups must be labelled with consecutive integers 0..G-1")
    return groups


def num_groups(groups: torch.Tensor) -> int:
    return int(groups[-1]) + 1 if len(groups) else 0


def group_spans(groups: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) row range of every group."""
    counts = torch.bincount(groups, minlength=num_groups(groups)).tolist()
    stops = np.cumsum(counts).tolist()
    return [(stop - count, stop) for stop, count in zip(stops, counts, strict=True)]


@contextmanager
def grad_enabled() -> Iterator[None]:
    """Gradients on even when the caller runs under ``no_grad`` or ``inference_mode``.

    Inference tensors can never be saved for backward, so inputs created under ``inference_mode`` must be
    cloned (see :func:`as_grad_input`); parameters created under it cannot be used at all.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def as_grad_input(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached tensor autograd may save; floating inputs cast to the computing dtype."""
    t = t.detach()
    if t.is_floating_point():
        t = t.to(dtype)
    return t.clone() if t.is_inference() else t
