"""Small density models for the feature-extractor tests: one per module kind the engine must handle."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from gradood.models.base import DensityModel
from gradood.seeding import NoiseSpec, draw_noise


class ZooDensity(DensityModel):
    """log p(x) = -1/2 ||body(dequantised x)||^2 (+ a learned scale used outside any module).

    Not a normalised density, but any differentiable per-row scalar exercises the extractors the same way.
    """

    name = "zoo"

    def __init__(self, body: nn.Module, input_shape: tuple[int, int, int], outside_param: bool = False):
        super().__init__()
        self.body = body
        self.input_shape = input_shape
        self.scale = nn.Parameter(torch.tensor([0.7, -0.3])) if outside_param else None

    def noise_spec(self) -> dict[str, NoiseSpec]:
        return {"u": NoiseSpec(self.input_shape, "uniform")}

    def log_prob(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.body((x + noise["u"]) / 256.0 - 0.5).flatten(1)
        if self.scale is not None:
            h = h * self.scale[0].exp() + self.scale[1]
        return -0.5 * h.square().sum(1) + math.log(2.0)


class Tokens(nn.Module):
    """[B, C, H, W] -> [B, H*W, C], for modules on 3-D input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class TwiceLinear(nn.Module):
    """One Linear called twice: its per-sample gradient is the sum of both uses."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class TiedPair(nn.Module):
    """Two Linear modules sharing one weight (weight tying) and keeping their own bias."""

    def __init__(self, d: int):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sin(self.a(x)))


class Attention(nn.Module):
    """Single-head self-attention built from Linear layers, as a U-Net block would."""

    def __init__(self, d: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out(att @ v)


class Odd(nn.Module):
    """A module with no rule: an elementwise learned gate only the generic fallback understands."""

    def __init__(self, c: int):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(1, c, 1, 1))
        self.shift = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate) + self.shift.view(1, -1, 1, 1) * x.square()


def _mha_body(c: int) -> nn.Module:
    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = Tokens()
            self.mha = nn.MultiheadAttention(c, num_heads=2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.tokens(x)
            return self.mha(t, t, t, need_weights=False)[0]

    return MHA()


def zoo() -> dict[str, DensityModel]:
    """Fresh, randomly initialised zoo models (call under a fixed torch seed)."""
    c, s = 4, 6
    shape = (c, s, s)
    d = c * s * s
    bodies: dict[str, tuple[nn.Module, bool]] = {
        "linear_2d": (nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 8)), False),
        "linear_3d": (
            nn.Sequential(Tokens(), nn.Linear(c, 8), nn.GELU(), nn.Linear(8, 3, bias=False)),
            False,
        ),
        "conv": (
            nn.Sequential(
                nn.Conv2d(c, 8, 3, padding=1),
                nn.Softplus(),
                nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2),
                nn.Tanh(),
                nn.Conv2d(8, 6, 4, padding="same", padding_mode="reflect"),
                nn.Softplus(),
                nn.Conv2d(6, 6, 2, padding=2),
                nn.Tanh(),
                nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2),
                nn.Tanh(),
                nn.Conv2d(8, 6, 1, bias=False),
            ),
            False,
        ),
        "conv_transpose": (
            nn.Sequential(
                nn.Conv2d(c, 6, 3, stride=2, padding=1),
                nn.Tanh(),
                nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1),
                nn.Tanh(),
                nn.ConvTranspose2d(4, 4, 2, stride=1, groups=2, dilation=2),
            ),
            False,
        ),
        "inplace": (
            nn.Sequential(
                nn.Conv2d(c, 6, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(6, 4, 3),
                nn.LeakyReLU(0.1, inplace=True),
            ),
            False,
        ),
        "group_norm": (
            nn.Sequential(
                nn.Conv2d(c, 8, 3, padding=1),
                nn.GroupNorm(2, 8),
                nn.SiLU(),
                nn.Conv2d(8, 4, 1),
                nn.GroupNorm(2, 4, bias=False),
            ),
            False,
        ),
        "layer_norm": (nn.Sequential(Tokens(), nn.Linear(c, 8), nn.LayerNorm(8), nn.Linear(8, 4)), False),
        "attention": (nn.Sequential(Tokens(), nn.Linear(c, 8), Attention(8)), False),
        "multihead_attention": (_mha_body(c), False),
        "tied": (nn.Sequential(nn.Flatten(), nn.Linear(d, 12), TiedPair(12), TwiceLinear(12)), False),
        "outside_param": (nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.Tanh()), True),
        "custom": (nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), Odd(4), nn.Conv2d(4, 2, 3)), False),
    }
    models = {}
    for name, (body, outside) in bodies.items():
        model = ZooDensity(body, shape, outside_param=outside)
        _perturb_(model)
        model.prepare_for_scoring()
        models[name] = model
    return models


@torch.no_grad()
def _perturb_(model: nn.Module) -> None:
    """Non-zero, non-default values everywhere (zero biases / unit norms would hide rule errors)."""
    for p in model.parameters():
        p.add_(0.2 * torch.randn_like(p))


def batch(model: DensityModel, n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n random images (integer pixel values) and their per-row noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *model.input_shape), generator=gen).float()
    noise = draw_noise(model.noise_spec(), [f"row{i}" for i in range(n)], seed)
    return x, noise


def move_parameters(model: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """Every parameter moved off its init by scale * N(0, 1) noise from its own generator: zero biases,
    unit norms and zero-init convs would make some gradients or flow steps degenerate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def perturbed(model: DensityModel, scale: float = 0.02, seed: int = 0) -> DensityModel:
    """Parameters moved (:func:`move_parameters`), then the model put in scoring state."""
    move_parameters(model, scale, seed)
    model.prepare_for_scoring()
    return model


def assert_methods_match_float64_loop(
    model: DensityModel, n: int, group_size: int, methods: tuple[str, ...] = ("vmap", "engine")
) -> None:
    """Each method's float32 features within 1e-4 relative of a float64 per-sample loop, per feature."""
    from gradood.features import extract_features, group_ids

    x, noise = batch(model, n, seed=1)
    groups = group_ids(n, group_size)
    m64 = copy.deepcopy(model).double()
    ref = extract_features(m64, x.double(), {k: v.double() for k, v in noise.items()}, groups, method="loop")
    assert len(ref.layer_names) == len(list(model.parameters()))
    assert (ref.sqnorms > 0).all()
    for method in methods:
        res = extract_features(model, x, noise, groups, method=method)
        rel = np.abs(res.sqnorms - ref.sqnorms) / ref.sqnorms
        worst = res.layer_names[rel.max(0).argmax()]
        assert rel.max() <= 1e-4, f"{method}: {worst} relative error {rel.max():.2e}"
        np.testing.assert_allclose(res.log_prob, ref.log_prob, rtol=1e-5)


def assert_rows_independent(model: DensityModel, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> None:
    """log_prob of a batch equals each row's alone; changing row 0 changes its value only, bit for bit
    elsewhere; the inputs are not modified in place."""
    before = x.clone(), {k: v.clone() for k, v in noise.items()}
    with torch.no_grad():
        together = model.log_prob(x, noise)
        alone = torch.cat(
            [model.log_prob(x[i : i + 1], {k: v[i : i + 1] for k, v in noise.items()}) for i in range(len(x))]
        )
        x_changed = x.clone()
        x_changed[0] = 255 - x_changed[0]
        changed = model.log_prob(x_changed, noise)
    assert torch.equal(x, before[0]) and all(torch.equal(noise[k], v) for k, v in before[1].items())
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    assert changed[0] != together[0]
    torch.testing.assert_close(changed[1:], together[1:], rtol=0, atol=0)
