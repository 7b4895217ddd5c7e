"""Gated PixelCNN (van den Oord et al. 2016) with a 256-way softmax per sub-pixel: exact log-likelihood.

log p(x) = sum over pixels (i, j) in raster order and channels c of log p(x_cij | x_<ij), in nats. The
channels of one pixel are conditionally independent given the pixels before it (for greyscale, the only
case FashionMNIST needs, that is the plain chain rule).

Causality without masks: every causal convolution is a plain ``nn.Conv2d`` over only the kernel taps it
may see, applied to its input zero-padded above / to the left and cut below / to the right (the "shifted
convolution" of PixelCNN++). A masked conv would carry kernel entries that are always zero; this way every
parameter is used, the per-sample gradient engine handles every layer with its exact Conv2d rule, and the
convs cost half the FLOPs of masked full kernels. Two stacks, as in the gated PixelCNN, remove the blind
spot of the original masked PixelCNN:

- vertical stack v: output (i, j) sees rows strictly above i, in a window of columns centred on j that
  widens with depth;
- horizontal stack h: output (i, j) sees row i strictly left of j, plus the vertical stack at (i, j).

So logits(i, j) depend on exactly the raster-order prefix x_<ij within the receptive field, and only on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradood.models.base import DensityModel, require_positive_ints
from gradood.seeding import NoiseSpec

Tensor = torch.Tensor

#: values a sub-pixel takes
LEVELS = 256


class ShiftedConv2d(nn.Module):
    """``nn.Conv2d`` (no padding of its own) on the input zero-padded by ``pad`` = (left, right, top,
    bottom); negative entries cut rows / columns, which shifts the output down or right."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], pad: tuple):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


def vertical_conv(in_channels: int, out_channels: int, k: int, include_row: bool) -> ShiftedConv2d:
    """Output (i, j) sees rows i - k//2 .. i (``include_row``) or .. i - 1, columns j - k//2 .. j + k//2."""
    cut = 0 if include_row else 1
    return ShiftedConv2d(in_channels, out_channels, (k // 2 + 1 - cut, k), (k // 2, k // 2, k // 2, -cut))


def horizontal_conv(in_channels: int, out_channels: int, k: int, include_pixel: bool) -> ShiftedConv2d:
    """Output (i, j) sees row i, columns j - k//2 .. j (``include_pixel``) or .. j - 1."""
    cut = 0 if include_pixel else 1
    return ShiftedConv2d(in_channels, out_channels, (1, k // 2 + 1 - cut), (k // 2, -cut, 0, 0))


def gate(t: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) of the two channel halves."""
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks. The vertical stack feeds the horizontal one, never the reverse: its
    window spans columns right of j, so anything it took from row i would reach pixel (i, j) from pixels
    after it. The horizontal stack is residual."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.v_conv = vertical_conv(channels, 2 * channels, kernel_size, include_row=True)
        self.h_conv = horizontal_conv(channels, 2 * channels, kernel_size, include_pixel=True)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)  # h_conv's bias covers it
        self.h_out = nn.Conv2d(channels, channels, 1)

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h) + self.v_to_h(v_pre)
        return gate(v_pre), h + self.h_out(gate(h_pre))


def _check_hparams(**hparams: int) -> None:
    require_positive_ints("PixelCNN", **hparams)
    for key in ("kernel_size", "first_kernel_size"):
        if hparams[key] < 3 or hparams[key] % 2 == 0:
            raise ValueError(f"PixelCNN: {key} must be odd and >= 3, got {hparams[key]}")


class PixelCNN(DensityModel):
    name = "pixelcnn"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: int = 32,
        num_layers: int = 5,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        head_channels: int = 64,
    ):
        super().__init__()
        _check_hparams(**self.arguments_of(PixelCNN))
        self.input_shape = (in_channels, image_size, image_size)
        self.v_in = vertical_conv(in_channels, channels, first_kernel_size, include_row=False)
        self.h_in = horizontal_conv(in_channels, channels, first_kernel_size, include_pixel=False)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel_size) for _ in range(num_layers))
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, head_channels, 1),
            nn.ReLU(),
            nn.Conv2d(head_channels, in_channels * LEVELS, 1),
        )

    def noise_spec(self) -> dict[str, NoiseSpec]:
        return {}  # a discrete model of discrete data: no dequantisation

    def logits(self, x: Tensor) -> Tensor:
        """Unnormalised log p(x_cij = level | x_<ij) as ``[B, C, 256, H, W]``; differentiable in ``x``.

        Row (b, :, :, i, j) depends on x[b] at pixels before (i, j) in raster order only.
        """
        if tuple(x.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"PixelCNN expects x of shape [B, {shape}], got {tuple(x.shape)}")
        dtype = self.head[-1].weight.dtype
        x = x.to(dtype) / ((LEVELS - 1) / 2) - 1.0
        v, h = self.v_in(x), self.h_in(x)
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h).unflatten(1, (self.input_shape[0], LEVELS))

    def pixel_log_probs(self, x: Tensor) -> Tensor:
        """log p(x_cij | x_<ij) per sub-pixel, ``[B, C, H, W]``; pixel values are rounded to the nearest
        level (a value outside [0, 255] fails the index lookup)."""
        log_p = F.log_softmax(self.logits(x), dim=2)
        target = x.detach().round().long().unsqueeze(2)
        return log_p.gather(2, target).squeeze(2)

    def log_prob(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """Exact log-likelihood of each image in nats, ``[B]``."""
        return self.pixel_log_probs(x).flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images as float pixel values in [0, 255], one pixel at a time in raster order."""
        weight = self.head[-1].weight
        c, height, width = self.input_shape
        x = torch.zeros(n, c, height, width, device=weight.device, dtype=weight.dtype)
        for i in range(height):
            for j in range(width):
                probs = F.softmax(self.logits(x)[..., i, j], dim=2)  # [n, C, 256]
                draw = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
                x[:, :, i, j] = draw.view(n, c).to(x.dtype)
        return x
