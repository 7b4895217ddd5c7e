"""Glow: exact inverse, log-det and density against brute force, per-row independence, ActNorm init,
sampling, hparams and dequantisation."""

import json
import math

import numpy as np
import pytest
import torch
from features_zoo import assert_rows_independent, move_parameters
from scipy.stats import norm
from torch import nn
from torch.func import functional_call, grad, vmap

from gradood.models import build_model
from gradood.models.checkpoint import load_checkpoint, save_checkpoint
from gradood.models.glow import ActNorm, Glow, InvConv2dLU, LearnedPrior, ZeroConv2d
from gradood.seeding import draw_noise

TINY = dict(in_channels=1, image_size=4, num_levels=2, num_steps=2, hidden_channels=8)


def pixels(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float()


def noise_for(model: Glow, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return draw_noise(model.noise_spec(), [f"row{i}" for i in range(n)], seed)


def initialised(model: Glow, n: int = 16) -> Glow:
    model.init_from_data(pixels(n, model.input_shape), noise_for(model, n))
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_reverse_inverts_forward_flow(dtype, tol):
    model = move_parameters(initialised(Glow(hidden_channels=16)), scale=0.05).to(dtype)
    x_c = torch.rand(4, 1, 28, 28, dtype=dtype) - 0.5
    with torch.no_grad():
        zs, logdet, _ = model.forward_flow(x_c)
        back = model.reverse(zs)
    assert [tuple(z.shape) for z in zs] == [(4, 2, 14, 14), (4, 8, 7, 7)]
    assert logdet.abs().min() > 1.0
    assert (back - x_c).abs().max().item() < tol


def flat_latents(model: Glow, shape: tuple[int, ...]):
    def fn(flat: torch.Tensor) -> torch.Tensor:
        zs, _, _ = model.forward_flow(flat.reshape(1, *shape))
        return torch.cat([z.flatten() for z in zs])

    return fn


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dict(TINY, num_steps=1),
        dict(in_channels=3, image_size=4, num_levels=1, num_steps=2, hidden_channels=4),
        dict(in_channels=2, image_size=8, num_levels=3, num_steps=1, hidden_channels=4),
    ],
)
def test_logdet_matches_brute_force_jacobian(config):
    model = move_parameters(Glow(**config), scale=0.3).double()
    x_c = torch.rand(3, *model.input_shape, dtype=torch.float64) - 0.5
    with torch.no_grad():
        _, logdet, _ = model.forward_flow(x_c)
    for row in range(len(x_c)):
        jac = torch.autograd.functional.jacobian(flat_latents(model, model.input_shape), x_c[row].flatten())
        sign, logabsdet = np.linalg.slogdet(jac.numpy())
        assert sign != 0
        assert logdet[row].item() == pytest.approx(logabsdet, rel=1e-8)


def prior_params(model: Glow, x: torch.Tensor, noise: dict[str, torch.Tensor]):
    """log_prob of the batch plus the (mean, std) every split's conditional prior produced meanwhile."""
    captured = []
    hooks = [
        split.prior.register_forward_hook(lambda m, args, out: captured.append(out.detach().chunk(2, dim=1)))
        for split in model.splits
    ]
    try:
        with torch.no_grad():
            log_prob = model.log_prob(x, noise)
    finally:
        for h in hooks:
            h.remove()
    return log_prob, [(mean.numpy(), np.exp(logs.numpy())) for mean, logs in captured]


@pytest.mark.parametrize("n_bits", [8, 5])
def test_log_prob_is_change_of_variables(n_bits):
    model = move_parameters(Glow(**TINY, n_bits=n_bits), scale=0.3).double()
    x, noise = pixels(3, model.input_shape), noise_for(model, 3)
    log_prob, split_priors = prior_params(model, x, noise)

    bins = 2.0**n_bits
    x_np = np.floor(x.numpy() / (256 / bins))
    x_c = torch.from_numpy((x_np + noise["dequant"].double().numpy()) / bins - 0.5)
    top_mean = model.top_prior.mean.detach().numpy()
    top_std = np.exp(model.top_prior.logs.detach().numpy())
    for row in range(len(x)):
        with torch.no_grad():
            zs, _, _ = model.forward_flow(x_c[row : row + 1])
        zs = [z.numpy()[0] for z in zs]
        priors = [(m[row], s[row]) for m, s in split_priors] + [(top_mean[0], top_std[0])]
        log_density = sum(norm.logpdf(z, loc=m, scale=s).sum() for z, (m, s) in zip(zs, priors, strict=True))
        jac = torch.autograd.functional.jacobian(flat_latents(model, model.input_shape), x_c[row].flatten())
        _, logabsdet = np.linalg.slogdet(jac.numpy())
        expected = log_density + logabsdet - model.num_dims * math.log(bins)
        assert log_prob[row].item() == pytest.approx(expected, rel=1e-8)


def test_log_prob_rows_are_independent():
    model = move_parameters(initialised(Glow(**dict(TINY, image_size=8))), scale=0.2).double()
    assert_rows_independent(model, pixels(5, model.input_shape), noise_for(model, 5))


class LogProbCall(nn.Module):
    """Makes log_prob the forward that functional_call runs."""

    def __init__(self, model: Glow):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x, {"dequant": u})


def test_vmapped_per_row_gradients_match_autograd():
    model = move_parameters(initialised(Glow(**dict(TINY, image_size=8))), scale=0.2).double()
    model.prepare_for_scoring()
    x, u = pixels(3, model.input_shape), noise_for(model, 3)["dequant"]
    call = LogProbCall(model)

    def row_log_prob(params, x_row, u_row):
        prefixed = {f"model.{k}": v for k, v in params.items()}
        return functional_call(call, prefixed, (x_row[None], u_row[None]), strict=False)[0]

    params = {k: v.detach() for k, v in model.named_parameters()}
    per_row = vmap(grad(row_log_prob), in_dims=(None, 0, 0))(params, x, u)
    for i in range(3):
        lp = model.log_prob(x[i : i + 1], {"dequant": u[i : i + 1]})
        grads = torch.autograd.grad(lp.sum(), list(model.parameters()))
        for name, g in zip(params, grads, strict=True):
            torch.testing.assert_close(per_row[name][i], g, rtol=1e-9, atol=1e-12)
            assert g.abs().sum() > 0, f"{name} gets no gradient from log_prob"


def test_every_parameter_belongs_to_a_known_leaf_module():
    owners = {type(m) for m in Glow().modules() if list(m.parameters(recurse=False))}
    assert owners == {ActNorm, InvConv2dLU, nn.Conv2d, ZeroConv2d, LearnedPrior}


def actnorm_outputs(model: Glow, x_c: torch.Tensor) -> list[np.ndarray]:
    outputs = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: outputs.append(out[0].detach().numpy()))
        for m in model.modules()
        if isinstance(m, ActNorm)
    ]
    try:
        with torch.no_grad():
            model.forward_flow(x_c)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def test_actnorm_data_dependent_init():
    model = Glow(**dict(TINY, image_size=8)).double()
    with pytest.raises(RuntimeError, match="ActNorm.*not initialised"):
        model.prepare_for_scoring()

    x, noise = pixels(32, model.input_shape), noise_for(model, 32)
    model.init_from_data(x, noise)
    outputs = actnorm_outputs(model, model.dequantize(x, noise["dequant"]))
    assert len(outputs) == 2 * 2
    for out in outputs:
        np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-10)
        np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    model.prepare_for_scoring()
    assert not model.training

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_from_data(255 - x, noise_for(model, 32, seed=1))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_actnorm_init_state_travels_with_the_state_dict(tmp_path):
    model = move_parameters(initialised(Glow(**TINY)), scale=0.1)
    state = model.state_dict()
    assert state["levels.0.steps.0.actnorm.initialized"].item() is True
    fresh = Glow(**model.hparams())
    with pytest.raises(RuntimeError, match="not initialised"):
        fresh.prepare_for_scoring()
    fresh.load_state_dict(state)
    fresh.prepare_for_scoring()

    save_checkpoint(model, tmp_path)
    loaded, meta = load_checkpoint(tmp_path)
    x, noise = pixels(4, model.input_shape), noise_for(model, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x, noise), model.log_prob(x, noise), rtol=0, atol=0)
    assert meta["params"] == model.hparams()


@pytest.mark.parametrize("n_bits", [8, 5])
def test_sampling(n_bits):
    model = move_parameters(initialised(Glow(**dict(TINY, image_size=8, n_bits=n_bits))), scale=0.1)
    draws = [model.sample(6, generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    sample = draws[0]
    assert sample.shape == (6, 1, 8, 8)
    assert sample.dtype == torch.float32
    assert sample.min() >= 0 and sample.max() <= 255
    assert torch.equal(sample, torch.floor(sample / 2 ** (8 - n_bits)) * 2 ** (8 - n_bits))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    assert sample.unique().numel() > 1


def test_hparams_round_trip():
    model = Glow(in_channels=3, image_size=8, num_levels=3, num_steps=1, hidden_channels=4, n_bits=5)
    hparams = json.loads(json.dumps(model.hparams()))
    assert hparams == dict(
        in_channels=3, image_size=8, num_levels=3, num_steps=1, hidden_channels=4, n_bits=5
    )
    rebuilt = build_model("glow", hparams)
    assert rebuilt.input_shape == model.input_shape == (3, 8, 8)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert rebuilt.noise_spec()["dequant"].shape == (3, 8, 8)


@pytest.mark.parametrize(
    "bad",
    [
        dict(image_size=28, num_levels=3),
        dict(image_size=6, num_levels=2),
        dict(num_steps=0),
        dict(num_levels=0),
        dict(hidden_channels=0),
        dict(in_channels=0),
        dict(n_bits=0),
        dict(n_bits=9),
        dict(image_size=28.0),
    ],
)
def test_invalid_hparams_raise(bad):
    with pytest.raises(ValueError):
        Glow(**bad)


def test_dequantisation_uses_the_given_noise_and_mutates_nothing():
    model = move_parameters(Glow(**TINY), scale=0.2)
    x, noise = pixels(4, model.input_shape), noise_for(model, 4)
    x_before, u_before = x.clone(), noise["dequant"].clone()
    with torch.no_grad():
        first = model.log_prob(x, noise)
        again = model.log_prob(x, {"dequant": noise["dequant"].clone()})
        other = model.log_prob(x, noise_for(model, 4, seed=7))
    assert torch.equal(x, x_before) and torch.equal(noise["dequant"], u_before)
    assert torch.equal(first, again)
    assert (first - other).abs().min() > 0
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(x, {"dequant": noise["dequant"][:, :, :2]})


def test_fewer_bits_share_a_bin():
    model = move_parameters(Glow(**dict(TINY, n_bits=5)), scale=0.2)
    base = torch.floor(pixels(4, model.input_shape) / 8) * 8
    noise = noise_for(model, 4)
    with torch.no_grad():
        in_bin = model.log_prob(base + 7, noise)
        next_bin = model.log_prob(torch.clamp(base + 8, max=255), noise)
    torch.testing.assert_close(model.log_prob(base, noise).detach(), in_bin, rtol=0, atol=0)
    assert not torch.equal(in_bin, next_bin)
