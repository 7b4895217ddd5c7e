"""Multi-scale Glow (Kingma & Dhariwal 2018) as a gradood :class:`DensityModel`.

Every parameter lives in the small module that uses it (ActNorm, InvConv2dLU, the coupling network's
Conv2d, ZeroConv2d, LearnedPrior), so a per-sample gradient engine can attach one closed-form rule per
module type. Flow modules return ``(output, logdet)`` with a per-row ``logdet`` of shape ``[B]``: the
log-det term is where a row's loss reaches the ActNorm and 1x1-conv parameters besides the output.

Layout for 28x28 and two levels: squeeze to 4x14x14, K steps, split off 2 channels (Gaussian given the
kept 2), squeeze to 8x7x7, K steps, learned top prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradood.models.base import DensityModel, require_positive_ints
from gradood.seeding import NoiseSpec

Tensor = torch.Tensor


def gaussian_log_p(x: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """log N(x; mean, exp(logs)^2) summed over all but the batch dimension."""
    log_p = -0.5 * math.log(2 * math.pi) - logs - 0.5 * (x - mean) ** 2 * torch.exp(-2 * logs)
    return log_p.flatten(1).sum(1)


def squeeze2d(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: each 2x2 patch becomes 4 channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class ActNorm(nn.Module):
    """Per-channel affine map; its data-dependent init is explicit (:meth:`initialize`), never in forward,
    so scoring a single image can never re-initialise it."""

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set loc/logs so the output on ``x`` has zero mean and unit variance per channel."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.var(dim=(0, 2, 3), keepdim=True, correction=0).sqrt()
        self.loc.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.shape[2] * x.shape[3] * self.logs.sum()
        return (x + self.loc) * torch.exp(self.logs), logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.logs) - self.loc


class InvConv2dLU(nn.Module):
    """Invertible 1x1 conv with weight P L (U + diag(sign_s exp(log_s))): its log-det is H W sum(log_s).

    Initialised from a random rotation drawn from torch's global generator, so construction is
    deterministic under ``torch.manual_seed``; P and sign_s are fixed buffers saved with the weights.
    """

    def __init__(self, channels: int):
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(rotation)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def matrix(self) -> Tensor:
        """The [C_out, C_in] mixing matrix."""
        lower = self.lower * self.l_mask + self.eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        return F.conv2d(x, self.matrix()[:, :, None, None]), logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, torch.linalg.inv(self.matrix())[:, :, None, None])


class ZeroConv2d(nn.Module):
    """3x3 conv that starts as the zero map, times a learned per-channel scale exp(3 logs)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * 3)


class AffineCoupling(nn.Module):
    """Keeps the first channel half; shifts and scales the second by a function of the first.

    The scale sigmoid(raw + 2) lies in (0, 1) and starts near 0.88 with the zero-initialised last conv,
    so every coupling begins close to the identity and can only contract.
    """

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels // 2, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, channels),
        )
        for conv in (self.net[0], self.net[2]):
            nn.init.normal_(conv.weight, 0.0, 0.05)
            nn.init.zeros_(conv.bias)

    def _shift_and_raw_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale_raw = self.net(x_a).chunk(2, dim=1)
        return shift, scale_raw + 2.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x.chunk(2, dim=1)
        shift, raw = self._shift_and_raw_scale(x_a)
        out_b = (x_b + shift) * torch.sigmoid(raw)
        return torch.cat([x_a, out_b], dim=1), F.logsigmoid(raw).flatten(1).sum(1)

    def reverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y.chunk(2, dim=1)
        shift, raw = self._shift_and_raw_scale(y_a)
        return torch.cat([y_a, y_b / torch.sigmoid(raw) - shift], dim=1)


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv2dLU(channels)
        self.coupling = AffineCoupling(channels, hidden_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, ld_norm = self.actnorm(x)
        x, ld_conv = self.invconv(x)
        x, ld_coupling = self.coupling(x)
        return x, ld_norm + ld_conv + ld_coupling

    def reverse(self, y: Tensor) -> Tensor:
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


class Level(nn.Module):
    """Squeeze, then K flow steps on the squeezed tensor."""

    def __init__(self, in_channels: int, hidden_channels: int, num_steps: int):
        super().__init__()
        self.steps = nn.ModuleList(FlowStep(4 * in_channels, hidden_channels) for _ in range(num_steps))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = squeeze2d(x)
        logdet = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        return x, logdet

    def reverse(self, y: Tensor) -> Tensor:
        for step in reversed(self.steps):
            y = step.reverse(y)
        return unsqueeze2d(y)


class Split(nn.Module):
    """Factors out the second channel half as a latent, Gaussian given the kept first half."""

    def __init__(self, channels: int):
        super().__init__()
        self.prior = ZeroConv2d(channels // 2, channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(kept half, factored-out latent, its log density [B])."""
        z1, z2 = x.chunk(2, dim=1)
        mean, logs = self.prior(z1).chunk(2, dim=1)
        return z1, z2, gaussian_log_p(z2, mean, logs)

    def sample(self, z1: Tensor, eps: Tensor) -> Tensor:
        """Draws the factored-out half from standard normal ``eps`` and rejoins it to ``z1``."""
        mean, logs = self.prior(z1).chunk(2, dim=1)
        return torch.cat([z1, mean + torch.exp(logs) * eps], dim=1)


class LearnedPrior(nn.Module):
    """Diagonal Gaussian over the top latent with a learned mean and log-std per element (zero-init)."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, *shape))
        self.logs = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, z: Tensor) -> Tensor:
        return gaussian_log_p(z, self.mean, self.logs)

    def sample(self, eps: Tensor) -> Tensor:
        return self.mean + torch.exp(self.logs) * eps


def _check_hparams(
    in_channels: int, image_size: int, num_levels: int, num_steps: int, hidden_channels: int, n_bits: int
) -> None:
    require_positive_ints(
        "Glow",
        in_channels=in_channels,
        image_size=image_size,
        num_levels=num_levels,
        num_steps=num_steps,
        hidden_channels=hidden_channels,
    )
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
        raise ValueError(f"Glow: n_bits must be an integer in [1, 8], got {n_bits!r}")
    if image_size % 2**num_levels:
        raise ValueError(
            f"Glow: image_size {image_size} must be divisible by 2**num_levels = {2**num_levels} "
            f"(each of the {num_levels} levels halves it)"
        )


class Glow(DensityModel):
    name = "glow"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_levels: int = 2,
        num_steps: int = 4,
        hidden_channels: int = 64,
        n_bits: int = 8,
    ):
        super().__init__()
        _check_hparams(in_channels, image_size, num_levels, num_steps, hidden_channels, n_bits)
        self.input_shape = (in_channels, image_size, image_size)
        self.n_bits = n_bits

        levels, splits = [], []
        channels = in_channels
        for i in range(num_levels):
            levels.append(Level(channels, hidden_channels, num_steps))
            channels *= 4
            if i < num_levels - 1:
                splits.append(Split(channels))
                channels //= 2
        self.levels = nn.ModuleList(levels)
        self.splits = nn.ModuleList(splits)
        top_size = image_size // 2**num_levels
        self.top_prior = LearnedPrior((channels, top_size, top_size))

    def noise_spec(self) -> dict[str, NoiseSpec]:
        return {"dequant": NoiseSpec(self.input_shape, "uniform")}

    def dequantize(self, x: Tensor, u: Tensor) -> Tensor:
        """Pixels in [0, 255] plus uniform noise in [0, 1) -> continuous x_c in [-0.5, 0.5), model dtype."""
        if tuple(x.shape[1:]) != self.input_shape or u.shape != x.shape:
            raise ValueError(
                f"Glow expects x and noise['dequant'] of shape [B, {', '.join(map(str, self.input_shape))}], "
                f"got {tuple(x.shape)} and {tuple(u.shape)}"
            )
        dtype = self.top_prior.mean.dtype
        x, u = x.to(dtype), u.to(dtype)
        if self.n_bits < 8:
            x = torch.floor(x / 2 ** (8 - self.n_bits))
        return (x + u) / 2**self.n_bits - 0.5

    def quantize(self, x_c: Tensor) -> Tensor:
        """Inverse of :meth:`dequantize` (noise dropped): pixel values in [0, 255]."""
        bins = 2**self.n_bits
        return torch.floor((x_c + 0.5) * bins).clamp(0, bins - 1) * 2 ** (8 - self.n_bits)

    def forward_flow(self, x_c: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """x_c -> (latents: one per split, then the top one; log-det [B]; log density of the latents [B]).

        Every map here is per row, so row i of each output depends on ``x_c[i]`` alone.
        """
        h = x_c
        logdet = x_c.new_zeros(x_c.shape[0])
        log_prior = x_c.new_zeros(x_c.shape[0])
        zs = []
        for level, split in zip(self.levels, [*self.splits, None], strict=True):
            h, ld = level(h)
            logdet = logdet + ld
            if split is not None:
                h, z, lp = split(h)
                zs.append(z)
                log_prior = log_prior + lp
        zs.append(h)
        return zs, logdet, log_prior + self.top_prior(h)

    def _decode(self, top: Tensor, unsplit: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Runs the flow backwards from the top latent; ``unsplit(i, h)`` restores split i's half."""
        h = top
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                h = unsplit(i, h)
            h = self.levels[i].reverse(h)
        return h

    def reverse(self, zs: list[Tensor]) -> Tensor:
        """Exact inverse of :meth:`forward_flow` given all its latents."""
        return self._decode(zs[-1], lambda i, h: torch.cat([h, zs[i]], dim=1))

    def log_prob(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """Continuous log density of the dequantised input minus D log 2**n_bits: a lower bound on the
        log-likelihood of the discrete image, in nats."""
        _, logdet, log_prior = self.forward_flow(self.dequantize(x, noise["dequant"]))
        return log_prior + logdet - self.num_dims * self.n_bits * math.log(2)

    def _actnorms(self) -> list[ActNorm]:
        return [m for m in self.modules() if isinstance(m, ActNorm)]

    @torch.no_grad()
    def init_from_data(self, x: Tensor, noise: dict[str, Tensor]) -> None:
        """Initialises each uninitialised ActNorm on its input from this batch, in flow order, so every
        layer sees the already-normalised output of the layers before it."""
        pending = [m for m in self._actnorms() if not m.initialized]
        if not pending:
            return
        handles = [m.register_forward_pre_hook(lambda mod, args: mod.initialize(args[0])) for m in pending]
        try:
            self.forward_flow(self.dequantize(x, noise["dequant"]))
        finally:
            for handle in handles:
                handle.remove()

    def prepare_for_scoring(self) -> None:
        self.eval()
        actnorms = self._actnorms()
        missing = sum(not m.initialized for m in actnorms)
        if missing:
            raise RuntimeError(
                f"Glow: {missing} of {len(actnorms)} ActNorm layers not initialised; run init_from_data on "
                "training data (or load a trained checkpoint) before scoring"
            )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 0.7) -> Tensor:
        """``n`` images as float pixel values in [0, 255]; latents drawn with std ``temperature``."""
        ref = self.top_prior.mean

        def eps(shape: torch.Size) -> Tensor:
            noise = torch.randn((n, *shape), generator=generator, device=ref.device, dtype=ref.dtype)
            return temperature * noise

        top = self.top_prior.sample(eps(ref.shape[1:]))
        x_c = self._decode(top, lambda i, h: self.splits[i].sample(h, eps(h.shape[1:])))
        return self.quantize(x_c)
