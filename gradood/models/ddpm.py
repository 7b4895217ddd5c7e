"""Denoising diffusion (Ho et al. 2020) as a gradood :class:`DensityModel`, with the one-step proxy of
Dauncey et al. 2024 as its log-likelihood.

Steps are indexed 0..T-1 as in the reference implementation (lucidrains' denoising-diffusion-pytorch):
index t is the paper's step t+1, ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)`` and the network is
fed t itself. The proxy for index t (hparam ``score_t``) is

    log_prob(x) = -1/K sum_k ||eps_k - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_k, t)||^2,

the paper's -L_t with the squared error summed over pixels (its norm), averaged over K = ``n_q_samples``
draws eps_k from ``noise["eps"]``; x0 = x / 127.5 - 1 is computed once for all draws. Training minimises
the same error averaged over pixels (L_simple) at a uniform random t per row (``noise["t_train"]``,
with the first eps draw).

The U-Net uses only Conv2d, Linear and GroupNorm parameters (attention included: 1x1 convs and
GroupNorm(1) pre-norms), so the feature engine has an exact closed-form rule for every tensor. The K
draws run as K calls of the U-Net on the B rows, never as K*B repeated rows (which the engine could only
handle by its slower whole-model fallback). Downsampling is a stride-2 3x3 conv (ceil(H/2)) and
upsampling nearest-neighbour to the matching skip connection's size, so any image size works without
padding: 28 -> 14 -> 7 (-> 4) and back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradood.models.base import DensityModel, require_positive_ints
from gradood.seeding import NoiseSpec

Tensor = torch.Tensor

BETA_SCHEDULES = ("linear", "cosine")


def make_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """float64 [T] noise variances: "linear" from beta_start to beta_end (Ho et al.), or "cosine"
    (Nichol & Dhariwal 2021: abar follows cos^2, s = 0.008, betas clipped at 0.999)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)
    raise ValueError(f"DDPM: unknown beta_schedule {schedule!r}; known: {', '.join(BETA_SCHEDULES)}")


class SinusoidalTimeEmbedding(nn.Module):
    """t [B] -> [B, dim]: sin and cos of t at dim/2 frequencies from 1 down to 1/10000 (geometric)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=t.dtype) / (half - 1))
        args = t[:, None] * freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Block(nn.Module):
    """3x3 conv, GroupNorm, optional FiLM (x * (1 + scale) + shift) from the time embedding, SiLU."""

    def __init__(self, dim_in: int, dim_out: int, norm_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(norm_groups, dim_out)

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.norm(self.conv(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two Blocks, the first modulated by the time embedding, plus a (1x1 conv) skip."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, norm_groups: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = Block(dim_in, dim_out, norm_groups)
        self.block2 = Block(dim_out, dim_out, norm_groups)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        scale, shift = self.time_mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, (scale, shift)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions, with a residual connection.

    ``linear``: softmax over features for queries and over positions for keys, then keys x values first
    (Shen et al. 2021), O(HW) instead of O((HW)^2), for the high-resolution levels; the output is
    GroupNorm-ed as in the reference U-Net. Full softmax attention otherwise (the bottleneck).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, linear: bool):
        super().__init__()
        self.heads, self.dim_head, self.linear = heads, dim_head, linear
        hidden = heads * dim_head
        self.norm = nn.GroupNorm(1, dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        out = nn.Conv2d(hidden, dim, 1)
        self.to_out = nn.Sequential(out, nn.GroupNorm(1, dim)) if linear else out

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, self.dim_head, h * w)
        q, k, v = qkv.unbind(1)  # [b, heads, dim_head, positions]
        q = q * self.dim_head**-0.5
        if self.linear:
            context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)
            out = torch.einsum("bhde,bhdn->bhen", context, q.softmax(dim=-2))
        else:
            attn = torch.einsum("bhdi,bhdj->bhij", q, k).softmax(dim=-1)
            out = torch.einsum("bhij,bhdj->bhdi", attn, v)
        return x + self.to_out(out.reshape(b, -1, h, w))


class DownLevel(nn.Module):
    """ResnetBlocks (each output kept as a skip connection), optional attention, then a conv to the next
    level's width that also halves the resolution (except at the lowest level)."""

    def __init__(self, blocks: list[ResnetBlock], attn: nn.Module, down: nn.Conv2d):
        super().__init__()
        self.blocks, self.attn, self.down = nn.ModuleList(blocks), attn, down

    def forward(self, h: Tensor, time_emb: Tensor, skips: list[Tensor]) -> Tensor:
        for block in self.blocks:
            h = block(h, time_emb)
            skips.append(h)
        return self.down(self.attn(h))


class UpLevel(nn.Module):
    """Mirror of :class:`DownLevel`: each ResnetBlock takes one skip connection (concatenated), then
    optional attention, nearest upsampling to the next level's resolution and a 3x3 conv."""

    def __init__(self, blocks: list[ResnetBlock], attn: nn.Module, up: nn.Conv2d):
        super().__init__()
        self.blocks, self.attn, self.up = nn.ModuleList(blocks), attn, up

    def forward(self, h: Tensor, time_emb: Tensor, skips: list[Tensor]) -> Tensor:
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), time_emb)
        h = self.attn(h)
        if skips and h.shape[-2:] != skips[-1].shape[-2:]:  # the next level's skips set its resolution
            h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
        return self.up(h)


class Unet(nn.Module):
    """eps_theta(x_t, t): the noise predictor, shaped like the reference's (lucidrains) U-Net; level i
    has width dim * dim_mults[i] and 1/2**i of the input resolution; full attention in the middle."""

    def __init__(
        self,
        channels: int,
        dim: int,
        dim_mults: Sequence[int],
        num_res_blocks: int,
        norm_groups: int,
        attn_heads: int,
        attn_dim_head: int,
        linear_attn_levels: Sequence[int],
    ):
        super().__init__()
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        def res_blocks(d_in: int, d_out: int) -> list[ResnetBlock]:
            return [ResnetBlock(d_in, d_out, time_dim, norm_groups) for _ in range(num_res_blocks)]

        def attention(d: int, level: int) -> nn.Module:
            if level not in linear_attn_levels:
                return nn.Identity()
            return Attention(d, attn_heads, attn_dim_head, linear=True)

        self.init_conv = nn.Conv2d(channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(enumerate(zip(dims[:-1], dims[1:], strict=True)))
        lowest = len(in_out) - 1
        self.downs = nn.ModuleList(
            DownLevel(
                res_blocks(d_in, d_in),
                attention(d_in, i),
                nn.Conv2d(d_in, d_out, 3, stride=1 if i == lowest else 2, padding=1),
            )
            for i, (d_in, d_out) in in_out
        )
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, time_dim, norm_groups)
        self.mid_attn = Attention(mid, attn_heads, attn_dim_head, linear=False)
        self.mid_block2 = ResnetBlock(mid, mid, time_dim, norm_groups)
        self.ups = nn.ModuleList(
            UpLevel(
                res_blocks(d_out + d_in, d_out), attention(d_out, i), nn.Conv2d(d_out, d_in, 3, padding=1)
            )
            for i, (d_in, d_out) in reversed(in_out)
        )
        self.final_block = ResnetBlock(dim * 2, dim, time_dim, norm_groups)
        self.final_conv = nn.Conv2d(dim, channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x [B, C, H, W], t [B] (float step indices) -> predicted noise [B, C, H, W]."""
        time_emb = self.time_mlp(t)
        h = self.init_conv(x)
        first = h
        skips: list[Tensor] = []
        for level in self.downs:
            h = level(h, time_emb, skips)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, time_emb)), time_emb)
        for level in self.ups:
            h = level(h, time_emb, skips)
        return self.final_conv(self.final_block(torch.cat([h, first], dim=1), time_emb))


def _check_hparams(hp: dict[str, Any]) -> None:
    positive = (
        "in_channels", "image_size", "dim", "num_res_blocks", "norm_groups", "attn_heads", "attn_dim_head",
        "timesteps", "n_q_samples",
    )  # fmt: skip
    require_positive_ints("DDPM", **{key: hp[key] for key in positive})
    mults = hp["dim_mults"]
    if not mults or not all(isinstance(m, int) and m >= 1 for m in mults):
        raise ValueError(f"DDPM: dim_mults must be a non-empty list of positive integers, got {mults!r}")
    levels = hp["linear_attn_levels"]
    if not all(isinstance(i, int) and 0 <= i < len(mults) for i in levels):
        raise ValueError(
            f"DDPM: linear_attn_levels must be level indices in [0, {len(mults)}), got {levels!r}"
        )
    if hp["dim"] % 2 or hp["dim"] < 4:
        raise ValueError(
            f"DDPM: dim must be even and >= 4 (it is also the time embedding's width), got {hp['dim']}"
        )
    widths = sorted({hp["dim"] * m for m in [1, *mults]})
    if any(w % hp["norm_groups"] for w in widths):
        raise ValueError(f"DDPM: norm_groups={hp['norm_groups']} must divide every U-Net width {widths}")
    if not isinstance(hp["score_t"], int) or not 0 <= hp["score_t"] < hp["timesteps"]:
        raise ValueError(f"DDPM: score_t must be an integer in [0, timesteps), got {hp['score_t']!r}")
    if hp["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"DDPM: beta_schedule must be one of {BETA_SCHEDULES}, got {hp['beta_schedule']!r}")
    if not 0 < hp["beta_start"] <= hp["beta_end"] < 1:
        raise ValueError(
            f"DDPM: need 0 < beta_start <= beta_end < 1, got {hp['beta_start']!r}, {hp['beta_end']!r}"
        )


class DDPM(DensityModel):
    name = "ddpm"
    renamed_params = {"groups": "norm_groups"}
    loss_name = "L_simple (noise-prediction MSE per pixel)"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        dim: int = 16,
        dim_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        norm_groups: int = 8,
        attn_heads: int = 4,
        attn_dim_head: int = 16,
        linear_attn_levels: Sequence[int] = (1, 2),
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        score_t: int = 0,
        n_q_samples: int = 1,
    ):
        super().__init__()
        _check_hparams(self.arguments_of(DDPM))
        self.input_shape = (in_channels, image_size, image_size)
        self.timesteps, self.score_t, self.n_q_samples = timesteps, score_t, n_q_samples
        self.unet = Unet(
            in_channels,
            dim,
            list(dim_mults),
            num_res_blocks,
            norm_groups,
            attn_heads,
            attn_dim_head,
            list(linear_attn_levels),
        )
        # the schedule follows from the hparams: kept out of the state dict (and the fingerprint), float64
        # so a float64 reference model sees it unrounded
        betas = make_betas(beta_schedule, timesteps, beta_start, beta_end)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0), persistent=False)

    def noise_spec(self) -> dict[str, NoiseSpec]:
        return {
            "eps": NoiseSpec((self.n_q_samples, *self.input_shape), "normal"),
            "t_train": NoiseSpec((), "uniform"),
        }

    def normalise(self, x: Tensor) -> Tensor:
        """Pixels in [0, 255] -> x0 in [-1, 1], in the model's dtype (a new tensor: x is never mutated)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"DDPM expects x of shape [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}"
            )
        return x.to(self.unet.final_conv.weight.dtype) / 127.5 - 1

    def diffuse(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x0); t: long step indices [B]."""
        abar = self.alphas_cumprod[t].to(x0.dtype)[:, None, None, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def eps_theta(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, t.to(x_t.dtype))

    def denoising_error(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """||eps - eps_theta(x_t, t)||^2 summed over pixels, [B]."""
        return (eps - self.eps_theta(self.diffuse(x0, t, eps), t)).square().flatten(1).sum(1)

    def _eps(self, x0: Tensor, noise: dict[str, Tensor]) -> Tensor:
        eps = noise["eps"]
        if eps.shape != (len(x0), self.n_q_samples, *self.input_shape):
            raise ValueError(
                f"DDPM expects noise['eps'] of shape [B, {self.n_q_samples}, "
                f"{', '.join(map(str, self.input_shape))}], got {tuple(eps.shape)}"
            )
        return eps.to(x0.dtype)

    def log_prob(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """-L_t(x) for t = ``score_t``, averaged over ``n_q_samples`` noise draws: a proxy, not nats."""
        x0 = self.normalise(x)
        eps = self._eps(x0, noise)
        t = torch.full((len(x0),), self.score_t, dtype=torch.long, device=x0.device)
        errors = [self.denoising_error(x0, t, eps[:, k]) for k in range(self.n_q_samples)]
        return -torch.stack(errors).mean(0)

    def training_loss(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """L_simple: the per-pixel mean squared noise-prediction error at a uniform random step per row."""
        x0 = self.normalise(x)
        eps = self._eps(x0, noise)[:, 0]
        t = (noise["t_train"] * self.timesteps).long().clamp(0, self.timesteps - 1).to(x0.device)
        return self.denoising_error(x0, t, eps).mean() / self.num_dims

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling over all T steps with sigma_t^2 = beta_t; ``n`` images as pixels in [0, 255]."""
        ref = self.unet.final_conv.weight

        def randn() -> Tensor:
            return torch.randn(
                (n, *self.input_shape), generator=generator, device=ref.device, dtype=ref.dtype
            )

        x = randn()
        for step in reversed(range(self.timesteps)):
            t = torch.full((n,), step, dtype=torch.long, device=ref.device)
            beta, abar = self.betas[step].to(ref.dtype), self.alphas_cumprod[step].to(ref.dtype)
            x = (x - beta / (1 - abar).sqrt() * self.eps_theta(x, t)) / (1 - beta).sqrt()
            if step > 0:
                x = x + beta.sqrt() * randn()
        return torch.round((x.clamp(-1, 1) + 1) * 127.5)
