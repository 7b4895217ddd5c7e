"""The score statistic of Bergamin et al. (AISTATS 2022) with a diagonal empirical Fisher, per group of rows.

For a group of rows with gradient ``g = grad_theta sum_{x in group} log p(x)`` over every trainable parameter
element, ``s = sum_i g_i^2 / (F_ii + eps * mean(F))``, where ``F_ii`` is the mean of ``g_i^2`` over held-out
in-distribution groups (:func:`diagonal_fisher`). Unlike the per-tensor squared norms of
:mod:`gradood.features`, every element is weighted by its own Fisher, so a group gets one number. Combining it
with the typicality test (Fisher's method) is :mod:`gradood.stats`' job.

``F`` must be estimated on groups of the size that is scored: a group's summed gradient grows with its size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from gradood.features.core import (
    as_grad_input,
    check_groups,
    grad_enabled,
    group_spans,
    num_groups,
    trainable_parameters,
)
from gradood.features.reference import LogProbCall, vmap_chunk_rows
from gradood.models.base import DensityModel

#: npz key prefix of the per-parameter arrays (``n`` holds the group count, so names can never collide)
_FISHER_KEY = "fisher."


@dataclass
class DiagonalFisher:
    """Diagonal empirical Fisher of the trainable parameters, estimated from ``n`` groups."""

    #: parameter name -> float64 CPU tensor of the parameter's shape: mean over groups of the squared gradient
    values: dict[str, torch.Tensor]
    #: number of groups averaged
    n: int

    def mean(self) -> float:
        """Mean ``F_ii`` over every parameter element: the scale that ``eps`` is relative to."""
        numel = sum(v.numel() for v in self.values.values())
        return sum(float(v.sum()) for v in self.values.values()) / max(numel, 1)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Plain arrays (copies) for ``np.savez``; they load back with ``allow_pickle=False``."""
        arrays = {_FISHER_KEY + name: v.cpu().numpy().copy() for name, v in self.values.items()}
        return {"n": np.array(self.n, dtype=np.int64), **arrays}

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, np.ndarray]) -> DiagonalFisher:
        """Inverse of :meth:`to_numpy`; takes the ``NpzFile`` that ``np.load`` returns as it is."""
        unknown = [k for k in arrays if k != "n" and not k.startswith(_FISHER_KEY)]
        if unknown or "n" not in arrays:
            raise ValueError(f"not a DiagonalFisher: keys {sorted(arrays)}")
        values = {
            k.removeprefix(_FISHER_KEY): torch.tensor(np.asarray(arrays[k]), dtype=torch.float64)
            for k in arrays
            if k != "n"
        }
        return cls(values, int(arrays["n"]))


def diagonal_fisher(
    model: DensityModel,
    batches: Iterable[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]],
    chunk_size: int | None = None,
) -> DiagonalFisher:
    """``F_ii`` = mean over the groups of all ``(x, noise, groups)`` batches of the squared group gradient.

    Batches stream (only sums of squares are kept, in float64 on the model's device); ``groups`` follows
    :func:`gradood.features.extract_features` (``None``: one group per row) and labels each batch on its own.
    ``chunk_size`` is as in :func:`fisher_score_statistic`.
    """
    n = 0
    with grad_enabled():  # also keeps the sums out of a caller's inference mode
        sums = {
            name: torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            for name, p in trainable_parameters(model).items()
        }
        for x, noise, groups in batches:
            x, noise, groups = _inputs(model, x, noise, groups)
            for _, grads in _group_grads(model, x, noise, groups, chunk_size):
                for name, g in grads.items():
                    sums[name] += g.to(torch.float64).square().sum(0)
            n += num_groups(groups)
    if n == 0:
        raise ValueError("diagonal_fisher needs at least one row")
    return DiagonalFisher({name: (s / n).cpu() for name, s in sums.items()}, n)


def fisher_score_statistic(
    model: DensityModel,
    x: torch.Tensor,
    noise: dict[str, torch.Tensor],
    groups: torch.Tensor | None,
    fisher: DiagonalFisher,
    eps: float = 1e-8,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Float64 ``[G]``: ``sum_i g_i^2 / (F_ii + eps * fisher.mean())`` over every trainable parameter element.

    ``eps`` is relative to the mean Fisher so that it means the same at any scale of the log-likelihood. The
    default, 1e-8 (the constant of the authors' code, there absolute), leaves every ``F_ii`` within 8 orders
    of magnitude of the mean untouched and only bounds the weight of elements with (near-)zero Fisher,
    e.g. units dead on in-distribution data, at ``1e8 / mean(F)``. ``eps=0`` gives the undamped statistic
    (inf or nan where ``F_ii = 0``).

    ``x``, ``noise`` and ``groups`` are as in :func:`gradood.features.extract_features`; ``x`` is moved to the
    model's device. ``chunk_size`` is the number of groups per ``vmap`` call (default: as many as keep their
    gradients within :data:`gradood.features.reference.VMAP_GRAD_BUDGET_BYTES`, and their rows within the
    row chunk of the ``vmap`` extractor). Parameter ``.grad`` is never touched.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    params = trainable_parameters(model)
    shapes = {name: tuple(v.shape) for name, v in fisher.values.items()}
    if shapes != {name: tuple(p.shape) for name, p in params.items()}:
        raise ValueError("fisher does not match the model's trainable parameters (names or shapes)")
    floor = eps * fisher.mean()
    with grad_enabled():
        x, noise, groups = _inputs(model, x, noise, groups)
        weight = {name: 1.0 / (v.to(x.device) + floor) for name, v in fisher.values.items()}
        stat = torch.zeros(num_groups(groups), dtype=torch.float64, device=x.device)
        for first, grads in _group_grads(model, x, noise, groups, chunk_size):
            for name, g in grads.items():
                stat[first : first + len(g)] += (
                    (g.to(torch.float64).square() * weight[name]).flatten(1).sum(1)
                )
    return stat.cpu().numpy()


def _inputs(
    model: DensityModel, x: torch.Tensor, noise: dict[str, torch.Tensor], groups: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Checked groups and autograd-safe inputs on the model's device (call under ``grad_enabled``)."""
    groups = check_groups(groups, len(x))
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    device = next(iter(trainable_parameters(model).values()), x).device
    x = as_grad_input(x, dtype).to(device)
    return x, {k: as_grad_input(v, dtype).to(device) for k, v in noise.items()}, groups


def _group_grads(
    model: DensityModel,
    x: torch.Tensor,
    noise: dict[str, torch.Tensor],
    groups: torch.Tensor,
    chunk_size: int | None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yields (first group, ``{name: [n, *shape]}`` gradients of each group's summed log-likelihood).

    ``vmap`` runs over groups of one size, reshaped ``[n, size, ...]``, so each slot differentiates the sum
    over its group's rows; each change of size (a short last group) starts a new run of ``vmap`` calls.
    """
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}
    call = LogProbCall(model)

    def group_log_prob(
        params: dict[str, torch.Tensor], x_group: torch.Tensor, noise_group: dict
    ) -> torch.Tensor:
        prefixed = {f"model.{name}": p for name, p in params.items()}
        return functional_call(call, prefixed, (x_group, noise_group)).sum()

    per_group = vmap(grad(group_log_prob), in_dims=(None, 0, 0))
    rows_per_chunk = vmap_chunk_rows(x, sum(p.numel() for p in params.values()))
    spans = group_spans(groups)
    first = 0
    for size, run in itertools.groupby(spans, key=lambda span: span[1] - span[0]):
        stop = first + len(list(run))
        step = chunk_size or max(1, rows_per_chunk // size)
        for g in range(first, stop, step):
            n = min(step, stop - g)
            rows = slice(spans[g][0], spans[g][0] + n * size)
            with torch.no_grad():  # vmap(grad) still differentiates inside; this stops outer graph building
                grads = per_group(
                    params,
                    x[rows].unflatten(0, (n, size)),
                    {k: v[rows].unflatten(0, (n, size)) for k, v in noise.items()},
                )
            yield g, grads
        first = stop
