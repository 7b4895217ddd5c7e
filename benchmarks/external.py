"""Third-party per-sample gradient libraries as benchmark methods, when installed (never dependencies).

``prepare(name, model)`` wraps a private copy of the model once (the libraries add hooks and attributes
to it) and returns ``sqnorms(x, noise)``: float64 ``[N, L]`` squared norms of every row's gradient per
parameter tensor, in ``feature_layer_names`` order. A library that cannot handle the model raises
:class:`Unsupported` with its reason; one that silently skips parameters (BackPACK on modules it does not
know) is turned into the same error, naming them, so the benchmark never times a partial answer.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradood.features.core import trainable_parameters
from gradood.models import DensityModel

SqNorms = Callable[[Tensor, dict[str, Tensor]], Tensor]

#: method name -> importable module that provides it
LIBRARIES = {"opacus": "opacus", "backpack": "backpack"}


class Unsupported(RuntimeError):
    """The library cannot compute every feature of this model."""


def installed() -> list[str]:
    return [name for name, module in LIBRARIES.items() if importlib.util.find_spec(module) is not None]


def _stack(params: dict[str, nn.Parameter], per_param: Callable[[nn.Parameter], Tensor]) -> Tensor:
    return torch.stack([per_param(p).to(torch.float64) for p in params.values()], 1)


def _opacus(model: DensityModel) -> SqNorms:
    from opacus import GradSampleModule

    wrapped = copy.deepcopy(model)
    try:
        GradSampleModule(wrapped, batch_first=True, loss_reduction="sum", strict=True)
    except NotImplementedError as e:
        raise Unsupported(f"opacus: {e}") from e
    wrapped.train()  # Opacus records activations in training mode only; gradood's models ignore the flag
    params = trainable_parameters(wrapped)

    def sqnorms(x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        with torch.enable_grad():
            wrapped.log_prob(x, noise).sum().backward()
        out = _stack(params, lambda p: p.grad_sample.flatten(1).square().sum(1))
        for p in params.values():
            p.grad, p.grad_sample = None, None
        return out

    return sqnorms


def _backpack(model: DensityModel) -> SqNorms:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    wrapped = copy.deepcopy(model)
    for module in wrapped.modules():
        extend(module)
    params = trainable_parameters(wrapped)

    def sqnorms(x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        with torch.enable_grad(), backpack(BatchL2Grad()):
            wrapped.log_prob(x, noise).sum().backward()
        skipped = [name for name, p in params.items() if not hasattr(p, "batch_l2")]
        if skipped:
            examples = ", ".join(skipped[:3])
            raise Unsupported(f"backpack skips {len(skipped)} parameter tensors, e.g. {examples}")
        out = _stack(params, lambda p: p.batch_l2)
        for p in params.values():
            p.grad = None
            del p.batch_l2
        return out

    return sqnorms


def prepare(name: str, model: DensityModel) -> SqNorms:
    return {"opacus": _opacus, "backpack": _backpack}[name](model)
