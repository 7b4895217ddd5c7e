"""Exact ways to reduce an :class:`~gradood.features.rules.Outer` factorisation, and the choice.

For a chunk of ``g`` groups of ``size`` rows each (a group's gradient is an outer product over all
positions of all its rows):

- ``ghost``: ||sum_t g_t a_t^T||^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t'), two Gram matrices of side
  size*T; never forms the [p, d] gradient, cheapest when positions are few and channels many;
- ``bmm``: the group gradient as one [p, size*T] @ [size*T, d] product (im2col for convolutions);
- a rule's own materialisers (for convolutions ``grouped``: one grouped-convolution weight gradient
  with a group per row; ``correlated``: one forward convolution of each row's input with its own output
  gradient as the kernel; ``shifted``: one bmm per kernel tap against shifted windows of the input),
  summed per group.

Which is fastest depends on the shape and on the device, so by default each candidate is timed once
per shape on the target device and the winner cached for the process (the published ``2T^2 <= p d``
rule is only a proxy for that); ``cost`` picks by a rough FLOP/byte model instead.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from gradood.features.rules import Outer

#: process-wide choices: (kind, blocks, p, d, positions, group size, options, device type, dtype) -> name
_CHOICES: dict[tuple, str] = {}

#: strategies every Outer supports (materialisers come on top, per rule)
BUILTIN = ("ghost", "bmm")


def _concat_positions(t: Tensor, size: int) -> Tensor:
    """[g * size, K, c, T] -> [g, K, c, size * T]."""
    return t if size == 1 else t.unflatten(0, (-1, size)).permute(0, 2, 3, 1, 4).flatten(3)


def ghost_sqnorms(o: Outer, rows: slice, size: int) -> Tensor:
    """[g] squared norms of the group gradients."""
    a = _concat_positions(o.activations(rows), size)
    g = _concat_positions(o.out_grads(rows), size)
    return ((a.transpose(-1, -2) @ a) * (g.transpose(-1, -2) @ g)).flatten(1).sum(1)


def group_grads(o: Outer, strategy: str, rows: slice, size: int) -> Tensor:
    """[m, g, r] group gradients (the materialiser layout) by ``bmm`` or a named materialiser."""
    if strategy == "bmm":
        a = _concat_positions(o.activations(rows), size)
        g = _concat_positions(o.out_grads(rows), size)
        return (g @ a.transpose(-1, -2)).flatten(1).unsqueeze(0)
    per_row = o.materialisers[strategy](rows)
    return per_row if size == 1 else per_row.unflatten(1, (-1, size)).sum(2)


def run(o: Outer, strategy: str, rows: slice, size: int) -> Tensor:
    return ghost_sqnorms(o, rows, size) if strategy == "ghost" else group_grads(o, strategy, rows, size)


def param_order(grads: Tensor) -> Tensor:
    """[m, g, r] -> [g, r * m] in the parameter's flat order."""
    return grads.permute(1, 2, 0).flatten(1)


def batch_sum(o: Outer, rows: slice) -> Tensor:
    """Sum over ``rows`` of the per-sample gradients, in parameter order (coverage check, ghost path)."""
    return torch.einsum("nkpt,nkdt->kpd", o.out_grads(rows), o.activations(rows)).flatten()


def bytes_per_group(o: Outer, size: int, strategy: str) -> int:
    """Rough scratch bytes one group needs: factors and their concatenated copies (im2col for convs)
    plus the Gram matrices or the gradient."""
    positions = size * o.positions
    factors = 2 * o.blocks * positions * (o.p + o.d)
    if strategy == "ghost":
        return 4 * (factors + 2 * o.blocks * positions * positions)
    if strategy == "bmm":
        return 4 * (factors + o.blocks * o.p * o.d)
    return 4 * (size * o.blocks * (positions * o.p + 2 * o.p * o.d))


def candidates(o: Outer, size: int, eager: bool, prune: bool = True) -> list[str]:
    """Ghost gives only norms, so it serves parameters fed by a single module call only; with
    ``prune`` it is not even timed where its Gram matrices cost over 8x a materialised gradient."""
    ghost = eager and (not prune or size * o.positions * (o.p + o.d) <= 8 * o.p * o.d)
    return [*(BUILTIN if ghost else BUILTIN[1:]), *o.materialisers]


def cost_model_choice(o: Outer, size: int, options: list[str]) -> str:
    positions = size * o.positions
    if "ghost" in options and positions * (o.p + o.d) < o.p * o.d:
        return "ghost"
    if "shifted" in options and o.p * o.blocks * 4 < o.d:
        return "shifted"
    return "grouped" if "grouped" in options else "bmm"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_choice(
    o: Outer, first_row: int, size: int, n_groups: int, options: list[str], workspace: int
) -> str:
    """Fastest option per group on a real chunk of this batch (best of three runs after a warm-up,
    so one noisy sample on a shared machine cannot decide), cached by shape."""
    probe = o.out_grads(slice(first_row, first_row + 1))
    key = (o.kind, o.blocks, o.p, o.d, o.positions, size, tuple(options), probe.device.type, probe.dtype)
    if key not in _CHOICES:
        per_group = {}
        for name in options:
            g = max(1, min(n_groups, workspace // bytes_per_group(o, size, name)))
            rows = slice(first_row, first_row + g * size)
            run(o, name, rows, size)
            best = float("inf")
            for _ in range(3):
                _sync(probe.device)
                start = time.perf_counter()
                run(o, name, rows, size)
                _sync(probe.device)
                best = min(best, time.perf_counter() - start)
            per_group[name] = best / g
        _CHOICES[key] = min(per_group, key=per_group.__getitem__)
    return _CHOICES[key]
