"""Reference extractors: one backward per group (``loop``) and whole-model ``torch.func`` (``vmap``).

Both are exact by construction and model-agnostic; the engine is tested against ``loop`` run in float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gradood.features.core import group_spans, num_groups, trainable_parameters
from gradood.models.base import DensityModel

#: per-sample gradients of one vmap chunk are held at once; this bounds their float32 bytes
VMAP_GRAD_BUDGET_BYTES = 1 << 30


def loop_sqnorms(
    model: DensityModel, x: torch.Tensor, noise: dict[str, torch.Tensor], groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward of the summed log-likelihood per group: (log_prob [N], sqnorms [G, L])."""
    params = list(trainable_parameters(model).values())
    log_prob = torch.empty(len(x), dtype=torch.float64, device=x.device)
    sqnorms = torch.empty(num_groups(groups), len(params), dtype=torch.float64, device=x.device)
    for g, (start, stop) in enumerate(group_spans(groups)):
        lp = model.log_prob(x[start:stop], {k: v[start:stop] for k, v in noise.items()})
        grads = torch.autograd.grad(lp.sum(), params, materialize_grads=True)
        sqnorms[g] = torch.stack([gr.to(torch.float64).square().sum() for gr in grads])
        log_prob[start:stop] = lp.detach().to(torch.float64)
    return log_prob, sqnorms


class GroupSqNorms:
    """Squared norm of each group's sum of per-row tensors, fed chunk by chunk in row order.

    A group cut by a chunk boundary is carried over to the next chunk, so chunks need not align with
    groups and memory stays bounded by the chunk. Sums and squares are taken in float64, on ``device``
    (no host sync per call).
    """

    def __init__(self, groups: torch.Tensor, device: torch.device):
        self.groups = groups.tolist()
        self.local_groups = groups.to(device)
        self.out = torch.zeros(num_groups(groups), dtype=torch.float64, device=device)
        self.carry: torch.Tensor | None = None

    def add(self, start: int, per_row: torch.Tensor) -> None:
        stop = start + per_row.shape[0]
        first, last = self.groups[start], self.groups[stop - 1]
        sums = per_row.new_zeros((last - first + 1, *per_row.shape[1:]), dtype=torch.float64)
        sums.index_add_(0, self.local_groups[start:stop] - first, per_row.to(torch.float64))
        if self.carry is not None:
            sums[0] += self.carry
        closes_last = stop == len(self.groups) or self.groups[stop] != last
        n_closed = len(sums) if closes_last else len(sums) - 1
        self.carry = None if closes_last else sums[-1]
        self.out[first : first + n_closed] = sums[:n_closed].flatten(1).square().sum(1)


class LogProbCall(nn.Module):
    """Makes ``log_prob`` the forward that ``functional_call`` runs."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.log_prob(x, noise)


def vmap_chunk_rows(x: torch.Tensor, numel: int) -> int:
    """Rows per vmap chunk so that their gradients, ``numel`` elements each, fit the budget."""
    return max(1, VMAP_GRAD_BUDGET_BYTES // (x.element_size() * max(numel, 1)))


def per_row_grads(
    model: DensityModel,
    x: torch.Tensor,
    noise: dict[str, torch.Tensor],
    names: list[str],
    chunk_size: int | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """Yields (first row, per-row gradients ``{name: [n, *shape]}``, per-row log_prob) chunk by chunk.

    Only ``names`` are differentiated; buffers and all other parameters stay the module's own
    (unbatched). Each row's noise is a vmapped input, so the model never draws random numbers itself
    (vmap's default randomness="error" enforces it).
    """
    all_params = trainable_parameters(model)
    params = {name: all_params[name].detach() for name in names}
    call = LogProbCall(model)

    def row_log_prob(params: dict[str, torch.Tensor], x_row: torch.Tensor, noise_row: dict) -> torch.Tensor:
        prefixed = {f"model.{name}": p for name, p in params.items()}
        batch_noise = {k: v.unsqueeze(0) for k, v in noise_row.items()}
        return functional_call(call, prefixed, (x_row.unsqueeze(0), batch_noise))[0]

    per_row = vmap(grad_and_value(row_log_prob), in_dims=(None, 0, 0))
    if chunk_size is None:
        chunk_size = vmap_chunk_rows(x, sum(p.numel() for p in params.values()))
    for start in range(0, len(x), chunk_size):
        rows = slice(start, start + chunk_size)
        with torch.no_grad():  # vmap(grad) still differentiates inside; this stops outer graph building
            grads, lp = per_row(params, x[rows], {k: v[rows] for k, v in noise.items()})
        yield start, grads, lp


def vmap_sqnorms(
    model: DensityModel,
    x: torch.Tensor,
    noise: dict[str, torch.Tensor],
    groups: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row gradients by ``vmap(grad)`` over row chunks, summed per group, then squared."""
    names = list(trainable_parameters(model))
    norms = {name: GroupSqNorms(groups, x.device) for name in names}
    log_prob = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start, grads, lp in per_row_grads(model, x, noise, names, chunk_size):
        log_prob[start : start + len(lp)] = lp.to(torch.float64)
        for name, g in grads.items():
            norms[name].add(start, g)
    out = [acc.out for acc in norms.values()]
    return log_prob, torch.stack(out, 1) if out else log_prob.new_zeros(num_groups(groups), 0)
