"""Convolutional VAE (Kingma & Welling 2014), discretised logistic likelihood, as a :class:`DensityModel`.

``log_prob`` is the ELBO of the discrete image in nats: the mean over ``n_elbo_samples`` draws z_k of
log p(x | z_k), minus the analytic KL(q(z | x) || N(0, I)). Each row brings its own eps (noise input
"eps", from (seed, row id)), unlike the reference implementation, which shares one eps across the batch.

Only standard modules (Conv2d, ConvTranspose2d, GroupNorm, Linear) hold parameters, all with closed-form
per-sample rules in the feature engine. With several ELBO samples the decoder runs once per sample on
the batch's own rows (not once on rows repeated K times), so every decoder call still has one row per
input and the engine's rules apply; repeated rows would push the decoder to the slow whole-model vmap.

Layout for 28x28 (any size divisible by 4): encoder conv 3x3 -> 4x4 stride 2 (14x14) -> 4x4 stride 2
(7x7) -> Linear heads for the posterior mean and log-variance; decoder Linear -> two 4x4 stride-2
transposed convs back to 28x28 -> conv 3x3 to a per-pixel logistic mean and log-scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradood.models.base import DensityModel, require_positive_ints
from gradood.seeding import NoiseSpec

Tensor = torch.Tensor

#: half the width of one of the 256 bins once pixels are scaled to [-1, 1]
HALF_BIN = 1.0 / 255.0
#: log-scales are clamped here (PixelCNN++ uses the lower bound) so the bin-width term stays finite
LOG_SCALE_RANGE = (-7.0, 7.0)
#: posterior log-variances are clamped here so exp() cannot overflow on far out-of-distribution inputs
LOGVAR_RANGE = (-30.0, 20.0)


def to_unit_range(x: Tensor) -> Tensor:
    """Pixel values 0..255 -> bin centres in [-1, 1]."""
    return x / 127.5 - 1.0


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(pixel = x) per element, x integer pixel values in [0, 255], mean and log-scale of a logistic
    on the [-1, 1] scale; bin i covers to_unit_range(i) +- 1/255, the end bins extend to -inf / +inf.

    With a, b the standardised upper and lower bin edges, sigmoid(a) - sigmoid(b) equals
    sigmoid(a) sigmoid(-b) (1 - exp(b - a)), so its log is a sum of terms that are each accurate in
    float32 for any a, b (PixelCNN++ instead switches to a density approximation for narrow bins).
    The end bins keep only the term of their finite edge.
    """
    log_scale = log_scale.clamp(*LOG_SCALE_RANGE)
    inv_scale = torch.exp(-log_scale)
    centred = to_unit_range(x) - mean
    log_below_upper = F.logsigmoid(inv_scale * (centred + HALF_BIN))
    log_above_lower = F.logsigmoid(-inv_scale * (centred - HALF_BIN))
    log_width = torch.log(-torch.expm1(-2 * HALF_BIN * inv_scale))
    middle = log_below_upper + log_above_lower + log_width
    return torch.where(x <= 0, log_below_upper, torch.where(x >= 255, log_above_lower, middle))


def sample_discretized_logistic(mean: Tensor, log_scale: Tensor, u: Tensor) -> Tensor:
    """Pixel values 0..255 drawn by inverting the logistic CDF at uniform ``u`` and rounding to a bin."""
    u = u.clamp(1e-6, 1 - 1e-6)
    y = mean + torch.exp(log_scale.clamp(*LOG_SCALE_RANGE)) * (torch.log(u) - torch.log1p(-u))
    return torch.round((y + 1.0) * 127.5).clamp(0, 255)


def gaussian_kl_to_standard(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per row, summed over the last dimension."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def conv_block(conv: nn.Module, channels: int, norm_groups: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.GroupNorm(norm_groups, channels), nn.SiLU())


class Encoder(nn.Module):
    """x on the [-1, 1] scale -> mean and log-variance of the diagonal Gaussian posterior q(z | x)."""

    def __init__(self, in_channels: int, image_size: int, hidden: int, latent_dim: int, norm_groups: int):
        super().__init__()
        self.net = nn.Sequential(
            conv_block(nn.Conv2d(in_channels, hidden, 3, padding=1), hidden, norm_groups),
            conv_block(nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), hidden, norm_groups),
            conv_block(nn.Conv2d(hidden, 2 * hidden, 4, stride=2, padding=1), 2 * hidden, norm_groups),
            nn.Flatten(),
        )
        features = 2 * hidden * (image_size // 4) ** 2
        self.to_mean = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x)
        return self.to_mean(h), self.to_logvar(h).clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """z -> per-pixel mean and log-scale of the discretised logistic p(x | z)."""

    def __init__(self, in_channels: int, image_size: int, hidden: int, latent_dim: int, norm_groups: int):
        super().__init__()
        side = image_size // 4
        self.from_latent = nn.Sequential(
            nn.Linear(latent_dim, 2 * hidden * side * side),
            nn.SiLU(),
            nn.Unflatten(1, (2 * hidden, side, side)),
        )
        self.net = nn.Sequential(
            conv_block(nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1), hidden, norm_groups),
            conv_block(nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), hidden, norm_groups),
            nn.Conv2d(hidden, 2 * in_channels, 3, padding=1),
        )

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_scale = self.net(self.from_latent(z)).chunk(2, dim=1)
        return mean, log_scale


def _check_hparams(**values: int) -> None:
    require_positive_ints("VAE", **values)
    if values["image_size"] % 4:
        raise ValueError(
            f"VAE: image_size {values['image_size']} must be divisible by 4 (two stride-2 stages)"
        )
    if values["hidden_channels"] % values["norm_groups"]:
        raise ValueError(
            f"VAE: hidden_channels {values['hidden_channels']} must be divisible by norm_groups "
            f"{values['norm_groups']} (GroupNorm)"
        )


class VAE(DensityModel):
    name = "vae"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        hidden_channels: int = 32,
        latent_dim: int = 16,
        norm_groups: int = 8,
        n_elbo_samples: int = 1,
    ):
        super().__init__()
        _check_hparams(**self.arguments_of(VAE))
        self.input_shape = (in_channels, image_size, image_size)
        self.latent_dim = latent_dim
        self.n_elbo_samples = n_elbo_samples
        sizes = (in_channels, image_size, hidden_channels, latent_dim, norm_groups)
        self.encoder = Encoder(*sizes)
        self.decoder = Decoder(*sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.net[-1].weight.dtype

    def noise_spec(self) -> dict[str, NoiseSpec]:
        return {"eps": NoiseSpec((self.n_elbo_samples, self.latent_dim), "normal")}

    def _check_inputs(self, x: Tensor, eps: Tensor) -> None:
        want_eps = (len(x), self.n_elbo_samples, self.latent_dim)
        if tuple(x.shape[1:]) != self.input_shape or tuple(eps.shape) != want_eps:
            raise ValueError(
                f"VAE expects x of shape [B, {', '.join(map(str, self.input_shape))}] and noise['eps'] of "
                f"shape {list(want_eps)}, got {tuple(x.shape)} and {tuple(eps.shape)}"
            )

    def elbo_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x | z_k) per row and sample [B, K], KL(q(z | x) || p(z)) per row [B]), in nats."""
        self._check_inputs(x, eps)
        x, eps = x.to(self.dtype), eps.to(self.dtype)
        mean, logvar = self.encoder(to_unit_range(x))
        std = torch.exp(0.5 * logvar)
        log_lik = []
        for k in range(self.n_elbo_samples):
            px_mean, px_log_scale = self.decoder(mean + std * eps[:, k])
            log_lik.append(discretized_logistic_log_prob(x, px_mean, px_log_scale).flatten(1).sum(1))
        return torch.stack(log_lik, 1), gaussian_kl_to_standard(mean, logvar)

    def log_prob(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """ELBO in nats per row: a lower bound on log P(x) of the discrete image."""
        log_lik, kl = self.elbo_terms(x, noise["eps"])
        return log_lik.mean(1) - kl

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images as float pixel values in [0, 255]: z ~ N(0, I), then every pixel from p(x | z)."""
        like = dict(dtype=self.dtype, device=self.decoder.net[-1].weight.device)
        z = torch.randn((n, self.latent_dim), generator=generator, **like)
        mean, log_scale = self.decoder(z)
        u = torch.rand(mean.shape, generator=generator, **like)
        return sample_discretized_logistic(mean, log_scale, u)
