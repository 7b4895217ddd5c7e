"""Per-row log-likelihoods and per-group, per-parameter-tensor squared gradient norms.

``extract_features`` is the one entry point; ``method`` picks the extractor:

- ``engine`` (default): one batched forward + one backward with per-module rules
  (:mod:`gradood.features.engine`), coverage-checked on a model's first batch;
- ``loop``: one forward + backward per group, the reference (exact; also runs in float64 after
  ``model.double()``);
- ``vmap``: whole-model ``torch.func.vmap(grad)`` over row chunks.

The model must be in scoring state (``model.prepare_for_scoring()``). Gradients are switched on inside,
so callers may hold ``torch.no_grad()``; under ``torch.inference_mode()`` inputs are cloned out of
inference mode, but the model itself must not have been created under it.
"""

from __future__ import annotations

import torch

from gradood.features.core import (
    FeatureResult,
    as_grad_input,
    check_groups,
    feature_layer_names,
    grad_enabled,
    group_ids,
)
from gradood.features.engine import CoverageError, FeatureEngine, engine_sqnorms
from gradood.features.reference import loop_sqnorms, vmap_sqnorms
from gradood.features.rules import ModuleCall, Outer, register_rule
from gradood.models.base import DensityModel

METHODS = {"loop": loop_sqnorms, "vmap": vmap_sqnorms, "engine": engine_sqnorms}


def extract_features(
    model: DensityModel,
    x: torch.Tensor,
    noise: dict[str, torch.Tensor],
    groups: torch.Tensor | None = None,
    method: str = "engine",
) -> FeatureResult:
    """Log-likelihood of every row of ``x`` and ``||grad_theta_j sum_{i in g} log p(x_i)||^2`` per group g.

    ``x`` is float ``[N, C, H, W]`` pixel values, ``noise`` the model's per-row noise (from
    ``gradood.seeding.draw_noise``), ``groups`` long ``[N]`` labels 0..G-1 of contiguous row groups
    (default: one group per row). Results are float64 numpy; parameter ``.grad`` is never touched.
    """
    if method not in METHODS:
        raise ValueError(f"unknown feature method {method!r}; known: {', '.join(sorted(METHODS))}")
    groups = check_groups(groups, len(x))
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    with grad_enabled():
        x = as_grad_input(x, dtype)
        noise = {k: as_grad_input(v, dtype).to(x.device) for k, v in noise.items()}
        log_prob, sqnorms = METHODS[method](model, x, noise, groups)
    return FeatureResult(
        log_prob=log_prob.cpu().numpy(),
        sqnorms=sqnorms.cpu().numpy(),
        layer_names=feature_layer_names(model),
    )


__all__ = [
    "METHODS",
    "CoverageError",
    "FeatureEngine",
    "FeatureResult",
    "ModuleCall",
    "Outer",
    "extract_features",
    "feature_layer_names",
    "group_ids",
    "register_rule",
]
