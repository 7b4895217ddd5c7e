"""Slices of the Fisher information matrix (paper Fig. 5): is it close to diagonal?

For a few layers j and ``k_j = min(k, |theta_j|)`` of their weights (drawn from (seed, layer name)), the
per-sample gradients ``g(x) = d log p(x) / d theta`` restricted to those weights give the Monte Carlo
estimate ``F = mean_x g(x) g(x)^T`` over model samples (the Fisher information) or held-out data (the
empirical Fisher). The normalised slice is ``|F_ik| / sqrt(F_ii F_kk)``; diagonal dominance is
``mean |F_ii| / mean_{i != k} |F_ik|``. A finite sample never gives exact zeros off the diagonal, so the
same ratio is also computed with every column of g permuted independently across samples (the
independent-coordinates null, same marginals): the measured ratio means something only beside it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradood.features.core import grad_enabled, trainable_parameters
from gradood.features.reference import per_row_grads
from gradood.models.base import DensityModel
from gradood.seeding import draw_noise, row_seed

#: families whose sampler runs one pass of the network per batch; PixelCNN (one pass per pixel) and DDPM
#: (one per diffusion step) sample too, but hundreds of times slower
ONE_PASS_SAMPLERS = frozenset({"glow", "vae"})


def can_sample(model: DensityModel) -> bool:
    return type(model).sample is not DensityModel.sample


def resolve_source(model: DensityModel, source: str) -> tuple[str, str]:
    """("samples" | "data", why) for a configured ``analyse.fisher_source``."""
    if source == "samples":
        if not can_sample(model):
            raise ValueError(f"{type(model).__name__} does not implement sample(): use fisher_source=data")
        return "samples", "configured (analyse.fisher_source=samples)"
    if source == "data":
        return "data", "configured (analyse.fisher_source=data)"
    if can_sample(model) and model.name in ONE_PASS_SAMPLERS:
        return "samples", f"{model.name} samples in one network pass"
    if can_sample(model):
        return "data", f"{model.name} samples sequentially (slow on CPU); fisher_source=samples forces it"
    return "data", f"{type(model).__name__} does not implement sample()"


@torch.no_grad()
def draw_samples(model: DensityModel, n: int, seed: int, batch: int = 100) -> tuple[torch.Tensor, int]:
    """``n`` model samples (pixel values) from a generator seeded by ``seed``, and how many draws were
    discarded as non-finite. Temperature 1 where the sampler takes one (Glow's default 0.7 is not a draw
    from p_theta; at 1 the small Glow's reverse pass overflows on some draws, which are redrawn, so the
    estimate is over p_theta restricted to where the inverse flow is finite)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(
        row_seed(seed, "fisher-samples")
    )
    kwargs = {"temperature": 1.0} if "temperature" in inspect.signature(model.sample).parameters else {}
    kept, have, discarded = [], 0, 0
    while have < n:
        x = model.sample(batch, generator=gen, **kwargs)
        ok = torch.isfinite(x).flatten(1).all(1)
        discarded += int((~ok).sum())
        if discarded > 10 * n:
            raise RuntimeError(f"{type(model).__name__}: {discarded} of the model's samples are not finite")
        kept.append(x[ok])
        have += int(ok.sum())
    return torch.cat(kept)[:n].clamp(0, 255), discarded


def choose_weights(model: DensityModel, layers: Sequence[str], k: int, seed: int) -> dict[str, np.ndarray]:
    """Flat indices of min(k, |theta_j|) weights of each layer, drawn without replacement from a
    generator seeded by (seed, layer name), sorted."""
    params = trainable_parameters(model)
    out = {}
    for name in layers:
        numel = params[name].numel()
        rng = np.random.default_rng(row_seed(seed, name, "fisher-weights"))
        out[name] = np.sort(rng.choice(numel, size=min(k, numel), replace=False))
    return out


def slice_gradients(
    model: DensityModel,
    x: torch.Tensor,
    noise: dict[str, torch.Tensor],
    weights: dict[str, np.ndarray],
    chunk_size: int = 64,
) -> np.ndarray:
    """Per-sample gradients of log p at the chosen weights, float64 ``[N, sum_j k_j]`` (layers in order)."""
    names = list(weights)
    index = {name: torch.as_tensor(weights[name], device=x.device) for name in names}
    blocks = []
    with grad_enabled():
        for _, grads, _ in per_row_grads(model, x, noise, names, chunk_size):
            cols = [grads[name].flatten(1)[:, index[name]] for name in names]
            blocks.append(torch.cat(cols, 1).to(torch.float64).cpu().numpy())
    return np.concatenate(blocks)


def fisher_matrix(g: np.ndarray) -> np.ndarray:
    """Monte Carlo estimate mean_x g(x) g(x)^T of ``[N, k]`` per-sample gradients."""
    return g.T @ g / len(g)


def normalised(f: np.ndarray) -> np.ndarray:
    """|F_ik| / sqrt(F_ii F_kk) (1 on the diagonal; 0 where a diagonal entry is 0)."""
    d = np.sqrt(np.abs(np.diag(f)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.abs(f) / np.outer(d, d)
    return np.nan_to_num(out, nan=0.0, posinf=0.0)


def diagonal_dominance(f: np.ndarray) -> float:
    """mean |F_ii| / mean_{i != k} |F_ik|."""
    off = ~np.eye(len(f), dtype=bool)
    return float(np.mean(np.abs(np.diag(f))) / np.mean(np.abs(f[off])))


def null_dominance(g: np.ndarray, permutations: int, seed: int) -> float:
    """Mean diagonal dominance when every column of g is permuted independently across samples."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(permutations):
        shuffled = np.column_stack([rng.permutation(col) for col in g.T])
        ratios.append(diagonal_dominance(fisher_matrix(shuffled)))
    return float(np.mean(ratios))


def block_structure(f: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean normalised |F_ik| over off-diagonal pairs within a layer and over pairs across layers."""
    r = normalised(f)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(f), dtype=bool)
    return {
        "within_layers": float(r[same & off].mean()) if (same & off).any() else float("nan"),
        "across_layers": float(r[~same].mean()) if (~same).any() else float("nan"),
    }


def fisher_slices(
    model: DensityModel,
    x: torch.Tensor,
    row_ids: Sequence[str],
    layers: Sequence[str],
    *,
    k: int,
    seed: int,
    null_permutations: int,
) -> dict[str, Any]:
    """FIM slices of ``layers`` from the per-sample gradients of log p over the rows of ``x``.

    Per layer: chosen flat indices, F, the normalised slice, the diagonal dominance ratio and its
    independent-coordinates null. ``pooled``: the same over all chosen weights together, with the
    mean normalised |F_ik| within and across layers (the detector treats layers as independent).
    """
    device = next(model.parameters()).device
    noise = {key: v.to(device) for key, v in draw_noise(model.noise_spec(), list(row_ids), seed).items()}
    weights = choose_weights(model, layers, k, seed)
    g = slice_gradients(model, x.to(device), noise, weights)
    labels = np.concatenate([np.full(len(idx), j) for j, idx in enumerate(weights.values())])
    out: dict[str, Any] = {"n": len(x), "layers": {}}
    for j, (name, idx) in enumerate(weights.items()):
        gj = g[:, labels == j]
        f = fisher_matrix(gj)
        entry = {"indices": idx, "fisher": f, "normalised": normalised(f), "k": len(idx)}
        if len(idx) >= 2:
            entry["dominance"] = diagonal_dominance(f)
            entry["null_dominance"] = null_dominance(
                gj, null_permutations, row_seed(seed, name, "fisher-null")
            )
            entry["normalised_dominance"] = diagonal_dominance(entry["normalised"])
        out["layers"][name] = entry
    f = fisher_matrix(g)
    out["pooled"] = {
        "labels": labels,
        "normalised": normalised(f),
        "dominance": diagonal_dominance(f),
        "null_dominance": null_dominance(g, null_permutations, row_seed(seed, "pooled", "fisher-null")),
        **block_structure(f, labels),
    }
    return out
