"""Representation invariance (the paper's Prop. 1), numerically.

Let T be a fixed (parameter-free) invertible, differentiable map of the model's input and Y = T(X). The
model of Y is p_Y(y) = p_X(T^{-1}(y)) |det J_{T^{-1}}(y)|. The Jacobian factor does not depend on theta,
so grad_theta log p_Y(T(x)) = grad_theta log p_X(x): every per-layer gradient feature is unchanged, while
the log-likelihood moves by log |det J_{T^{-1}}(y)|, which differs from image to image for a non-affine T.
Likelihood-based scores therefore depend on the representation; the gradient features do not.

:class:`TransformedInput` is that model of Y as a :class:`~gradood.models.DensityModel` (the wrapped
model's parameters are its own, so the feature extractors see the same layers under an ``inner.`` prefix);
:func:`invariance_check` compares features of the model at x with the wrapper's at y = T(x). For models
with a uniform ``dequant`` noise input (Glow), the map is applied to the dequantised input x + u, the
variable the flow is a density of, and the models then get zero dequantisation noise.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradood.features import extract_features
from gradood.models.base import DensityModel
from gradood.seeding import NoiseSpec

INNER_PREFIX = "inner."


class PixelMap(nn.Module):
    """An invertible per-pixel map without parameters: ``forward(x) = y``, ``inverse(y) = (x, log|det
    J_{T^-1}(y)|)`` per row."""

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class AffineMap(PixelMap):
    """y = scale * x + shift per pixel (fixed tensors broadcast to the input); log-det -sum log|scale|."""

    def __init__(self, scale: Tensor, shift: Tensor):
        super().__init__()
        if bool((scale == 0).any()):
            raise ValueError("AffineMap: scale must be non-zero everywhere")
        self.register_buffer("scale", scale.clone(), persistent=False)
        self.register_buffer("shift", shift.clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.shift

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = (y - self.shift) / self.scale
        logdet = -torch.log(torch.abs(self.scale)).expand_as(y).flatten(1).sum(1)
        return x, logdet


class LogitMap(PixelMap):
    """RealNVP's logit map of pixel values v in [0, levels): y = logit(alpha + (1 - 2 alpha) v / levels).

    Inverse v = levels (sigmoid(y) - alpha) / (1 - 2 alpha), with
    log |dv/dy| = log(levels / (1 - 2 alpha)) + log sigmoid(y) + log sigmoid(-y) per pixel: the log-det
    depends on the image.
    """

    def __init__(self, alpha: float = 0.05, levels: float = 256.0):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"LogitMap: alpha must lie in (0, 0.5), got {alpha}")
        self.alpha, self.levels = float(alpha), float(levels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.logit(self.alpha + (1 - 2 * self.alpha) * x / self.levels)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = self.levels * (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        per_pixel = math.log(self.levels / (1 - 2 * self.alpha)) + nn.functional.logsigmoid(y)
        per_pixel = per_pixel + nn.functional.logsigmoid(-y)
        return x, per_pixel.flatten(1).sum(1)


class TransformedInput(DensityModel):
    """The model of Y = T(X): log p_Y(y) = inner.log_prob(T^{-1}(y)) + log |det J_{T^{-1}}(y)|.

    Same noise inputs and input shape as ``inner``; it adds no parameters, so its features are the inner
    model's layer for layer (names prefixed ``inner.``). Not meant to be checkpointed.

    ``snap``: round T^{-1}(y) to the nearest pixel level before the inner model sees it. Models of discrete
    pixels (VAE's discretised logistic, PixelCNN's softmax, DDPM's proxy on pixel values) test x against
    bin edges, so a float round trip 1e-14 below 0 would land in another bin; for them the map acts on the
    level values and the log-det is that of the continuous map at them (for a probability mass function
    itself Prop. 1 holds trivially: a bijection of the levels moves no mass).
    """

    name = "transformed_input"

    def __init__(self, inner: DensityModel, transform: PixelMap, snap: bool = False):
        super().__init__()
        self.inner = inner
        self.transform = transform
        self.snap = snap
        self.input_shape = inner.input_shape

    def noise_spec(self) -> dict[str, NoiseSpec]:
        return self.inner.noise_spec()

    def log_prob(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        x_inner, logdet = self.transform.inverse(x)
        if self.snap:
            x_inner = torch.round(x_inner)
        return self.inner.log_prob(x_inner, noise) + logdet.to(x_inner.dtype)

    def prepare_for_scoring(self) -> None:
        self.eval()
        self.inner.prepare_for_scoring()

    def hparams(self) -> dict[str, Any]:
        raise NotImplementedError("TransformedInput wraps a live model and is not checkpointed")


def dequantises(model: DensityModel) -> bool:
    """Whether the model adds uniform noise ``dequant`` of the input's shape (then T acts on x + u)."""
    spec = model.noise_spec().get("dequant")
    return spec is not None and spec.dist == "uniform" and tuple(spec.shape) == tuple(model.input_shape)


def invariance_check(
    model: DensityModel,
    x: Tensor,
    noise: dict[str, Tensor],
    transform: PixelMap,
    method: str = "loop",
    dtype: torch.dtype = torch.float64,
    snap: bool | None = None,
) -> dict[str, Any]:
    """Features and log-likelihoods of ``model`` at x against :class:`TransformedInput` at y = T(x).

    Runs on a copy of the model in ``dtype``. ``snap`` (see :class:`TransformedInput`) defaults to on for
    models that do not dequantise. Returns the largest relative difference of any per-layer
    squared norm, the largest |log p_Y(y) - log p_X(x) - log|det J_{T^-1}(y)|| (the shift error), the
    log-dets themselves, and, as the scale a difference is judged against, the largest relative feature
    difference when every pixel below 255 moves up by one level.
    """
    base = copy.deepcopy(model).to(dtype)
    base.prepare_for_scoring()
    continuous = dequantises(base)
    snap = not continuous if snap is None else snap
    wrapped = TransformedInput(base, copy.deepcopy(transform).to(dtype), snap=snap)
    x = x.to(dtype)
    noise = {k: v.to(dtype) for k, v in noise.items()}
    control = extract_features(base, x + (x < 255).to(dtype), noise, method=method)
    if continuous:
        x = x + noise["dequant"]
        noise = {**noise, "dequant": torch.zeros_like(noise["dequant"])}
    with torch.no_grad():
        y = wrapped.transform(x)
        _, logdet = wrapped.transform.inverse(y)
    ref = extract_features(base, x, noise, method=method)
    out = extract_features(wrapped, y, noise, method=method)
    if out.layer_names != [INNER_PREFIX + n for n in ref.layer_names]:
        raise AssertionError("the wrapper's layers are not the model's layers")
    logdet_np = logdet.cpu().numpy()
    return {
        "rows": len(x),
        "layers": len(ref.layer_names),
        "dtype": str(dtype).removeprefix("torch."),
        "method": method,
        "input": ("dequantised x + u" if continuous else "pixel levels")
        + (", T^-1(y) rounded to a level" if snap else ""),
        "snap": snap,
        "max_rel_feature_diff": _max_rel(out.sqnorms, ref.sqnorms),
        "control_max_rel_feature_diff": _max_rel(control.sqnorms, ref.sqnorms),
        "max_shift_error": float(np.max(np.abs(out.log_prob - ref.log_prob - logdet_np))),
        "log_det": logdet_np,
        "log_prob": ref.log_prob,
        "log_prob_transformed": out.log_prob,
    }


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(a - b) / scale))
