"""DDPM: beta schedules, forward process, time embedding and the L_t proxy against float64 numpy
references; per-row independence, noise handling, sampling, hparams and checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
from features_zoo import assert_rows_independent
from torch import nn

from gradood.models import build_model
from gradood.models.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from gradood.models.ddpm import DDPM, SinusoidalTimeEmbedding, make_betas
from gradood.seeding import draw_noise

TINY = dict(
    image_size=8,
    dim=8,
    dim_mults=[1, 2],
    norm_groups=4,
    attn_heads=2,
    attn_dim_head=4,
    linear_attn_levels=[0, 1],
    timesteps=20,
)


def tiny(**overrides) -> DDPM:
    return DDPM(**{**TINY, **overrides}).double()


def pixels(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).double()


def noise_for(model: DDPM, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return draw_noise(model.noise_spec(), [f"row{i}" for i in range(n)], seed, dtype=torch.float64)


def numpy_alphas_cumprod(schedule: str, timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    if schedule == "linear":
        betas = beta_start + (beta_end - beta_start) * np.arange(timesteps) / (timesteps - 1)
    else:
        f = np.cos((np.arange(timesteps + 1) / timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 1000])
def test_beta_schedules_match_numpy(schedule, timesteps):
    model = DDPM(**{**TINY, "timesteps": timesteps, "beta_schedule": schedule, "beta_start": 2e-4})
    expected = numpy_alphas_cumprod(schedule, timesteps, 2e-4, 0.02)
    np.testing.assert_allclose(model.alphas_cumprod.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        make_betas(schedule, timesteps, 2e-4).numpy(), 1 - expected / np.r_[1, expected[:-1]]
    )
    assert model.alphas_cumprod.dtype == torch.float64
    assert "alphas_cumprod" not in model.state_dict() and "betas" not in model.state_dict()


def test_linear_schedule_is_ho_et_al():
    betas = make_betas("linear", 1000).numpy()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)


@pytest.mark.parametrize("t", [0, 7, 19])
def test_forward_process_marginal(t):
    model = tiny()
    n = 20000
    x0 = torch.tensor([[-1.0, -0.3], [0.4, 1.0]], dtype=torch.float64).expand(n, 1, 2, 2)
    eps = torch.randn(n, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x_t = model.diffuse(x0, torch.full((n,), t), eps).numpy()
    abar = numpy_alphas_cumprod("linear", 20, 1e-4, 0.02)[t]
    std = math.sqrt(1 - abar)
    np.testing.assert_allclose(x_t.mean(0), math.sqrt(abar) * x0[0].numpy(), atol=5 * std / math.sqrt(n))
    np.testing.assert_allclose(x_t.std(0), std, rtol=5 / math.sqrt(2 * n))


def test_time_embedding_matches_numpy():
    t = np.array([0.0, 1.0, 17.0, 999.0])
    emb = SinusoidalTimeEmbedding(12)(torch.from_numpy(t)).numpy()
    freqs = 10000.0 ** (-np.arange(6) / 5)
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    assert emb.shape == (4, 12)
    np.testing.assert_allclose(emb, expected, rtol=1e-12, atol=1e-12)


def hand_written_proxy(model: DDPM, x: torch.Tensor, eps: np.ndarray, t: int, schedule: str) -> np.ndarray:
    """-||eps - eps_theta(x_t, t)||^2 per row from numpy x0, abar and x_t, calling only the U-Net."""
    x0 = x.numpy() / 127.5 - 1.0
    abar = numpy_alphas_cumprod(schedule, model.timesteps, 1e-4, 0.02)[t]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    with torch.no_grad():
        pred = model.unet(torch.from_numpy(x_t), torch.full((len(x),), float(t), dtype=torch.float64)).numpy()
    return -((eps - pred) ** 2).reshape(len(x), -1).sum(1)


@pytest.mark.parametrize("score_t, schedule", [(0, "linear"), (11, "linear"), (3, "cosine")])
def test_log_prob_is_the_l_t_proxy(score_t, schedule):
    model = tiny(score_t=score_t, beta_schedule=schedule)
    x, noise = pixels(3, model.input_shape), noise_for(model, 3)
    with torch.no_grad():
        log_prob = model.log_prob(x, noise).numpy()
    expected = hand_written_proxy(model, x, noise["eps"][:, 0].numpy(), score_t, schedule)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-12)


def test_n_q_samples_average_single_draw_proxies():
    model = tiny(n_q_samples=3)
    single = tiny(n_q_samples=1)
    single.load_state_dict(model.state_dict())
    x, noise = pixels(4, model.input_shape), noise_for(model, 4)
    with torch.no_grad():
        averaged = model.log_prob(x, noise)
        draws = [single.log_prob(x, {"eps": noise["eps"][:, k : k + 1]}) for k in range(3)]
    assert noise["eps"].shape == (4, 3, 1, 8, 8)
    assert not torch.allclose(draws[0], draws[1])
    torch.testing.assert_close(averaged, torch.stack(draws).mean(0), rtol=1e-13, atol=0)


def test_training_loss_is_l_simple_at_the_drawn_steps():
    model = tiny(n_q_samples=2)
    x, noise = pixels(5, model.input_shape), noise_for(model, 5)
    noise["t_train"] = torch.tensor([0.0, 0.049, 0.05, 0.5, 0.9999], dtype=torch.float64)
    steps = [0, 0, 1, 10, 19]
    eps = noise["eps"][:, 0].numpy()
    errors = [
        -hand_written_proxy(model, x[i : i + 1], eps[i : i + 1], t, "linear")[0] for i, t in enumerate(steps)
    ]
    with torch.no_grad():
        loss = model.training_loss(x, noise).item()
    assert loss == pytest.approx(np.mean(errors) / 64, rel=1e-12)


def test_inputs_are_not_mutated_and_noise_is_used():
    model = tiny()
    x, noise = pixels(4, model.input_shape), noise_for(model, 4)
    x_before, noise_before = x.clone(), {k: v.clone() for k, v in noise.items()}
    with torch.no_grad():
        first = model.log_prob(x, noise)
        again = model.log_prob(x.clone(), {k: v.clone() for k, v in noise.items()})
        other = model.log_prob(x, noise_for(model, 4, seed=9))
        model.training_loss(x, noise)
    assert torch.equal(x, x_before)
    assert all(torch.equal(noise[k], noise_before[k]) for k in noise)
    assert torch.equal(first, again)
    assert (first - other).abs().min() > 0


def test_noise_depends_on_row_id_not_position():
    model = tiny()
    x = pixels(1, model.input_shape).expand(3, -1, -1, -1)
    noise = draw_noise(model.noise_spec(), ["a", "b", "a"], seed=0, dtype=torch.float64)
    with torch.no_grad():
        lp = model.log_prob(x, noise)
    assert lp[0] == lp[2] and lp[0] != lp[1]


def test_log_prob_rows_are_independent():
    model = tiny()
    assert_rows_independent(model, pixels(5, model.input_shape), noise_for(model, 5))


@pytest.mark.parametrize("image_size, mults", [(7, [1, 2, 2]), (28, [1, 2, 2, 2]), (5, [1])])
def test_unet_handles_sizes_that_do_not_halve_evenly(image_size, mults):
    model = tiny(image_size=image_size, dim_mults=mults, linear_attn_levels=[0])
    x, noise = pixels(2, model.input_shape), noise_for(model, 2)
    with torch.no_grad():
        pred = model.eps_theta(model.normalise(x), torch.zeros(2, dtype=torch.long))
        lp = model.log_prob(x, noise)
    assert pred.shape == x.shape and lp.shape == (2,) and torch.isfinite(lp).all()


def test_every_parameter_belongs_to_a_module_with_an_exact_rule():
    owners = {type(m) for m in DDPM().modules() if list(m.parameters(recurse=False))}
    assert owners == {nn.Conv2d, nn.Linear, nn.GroupNorm}


def test_sampling():
    model = tiny(timesteps=5).float()
    draws = [model.sample(3, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    sample = draws[0]
    assert sample.shape == (3, 1, 8, 8) and sample.dtype == torch.float32
    assert sample.min() >= 0 and sample.max() <= 255 and torch.equal(sample, sample.round())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_hparams_round_trip():
    model = DDPM(**{**TINY, "in_channels": 3, "beta_schedule": "cosine", "score_t": 4, "n_q_samples": 2})
    hparams = json.loads(json.dumps(model.hparams()))
    assert hparams == model.hparams()
    assert hparams["dim_mults"] == [1, 2] and hparams["score_t"] == 4
    rebuilt = build_model("ddpm", hparams)
    assert rebuilt.input_shape == (3, 8, 8)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert rebuilt.noise_spec()["eps"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(rebuilt.alphas_cumprod, model.alphas_cumprod, rtol=0, atol=0)


def test_checkpoint_round_trip(tmp_path):
    model = DDPM(**{**TINY, "score_t": 2})
    fp = save_checkpoint(model, tmp_path)
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["fingerprint"] == fp == model_fingerprint(loaded)
    assert meta["params"] == model.hparams() and isinstance(loaded, DDPM) and not loaded.training
    x, noise = pixels(3, model.input_shape), noise_for(model, 3)
    noise = {k: v.float() for k, v in noise.items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x, noise), model.log_prob(x, noise), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(dim=7),
        dict(norm_groups=3),
        dict(dim_mults=[]),
        dict(dim_mults=[1, 1.5]),
        dict(linear_attn_levels=[2]),
        dict(score_t=20),
        dict(timesteps=0),
        dict(n_q_samples=0),
        dict(beta_schedule="quadratic"),
        dict(beta_start=0.1, beta_end=0.01),
        dict(image_size=8.0),
    ],
)
def test_invalid_hparams_raise(bad):
    with pytest.raises(ValueError):
        DDPM(**{**TINY, **bad})


def test_wrong_shapes_raise():
    model = tiny(n_q_samples=2)
    x, noise = pixels(2, model.input_shape), noise_for(model, 2)
    with pytest.raises(ValueError, match="x of shape"):
        model.log_prob(x[:, :, :4], noise)
    with pytest.raises(ValueError, match="eps"):
        model.log_prob(x, {"eps": noise["eps"][:, :1]})


def test_the_old_name_of_norm_groups_fails_naming_the_new_one():
    with pytest.raises(ValueError, match=r"^model 'ddpm': parameter groups was renamed to norm_groups"):
        build_model("ddpm", {**TINY, "groups": 4})
    assert build_model("ddpm", TINY).hparams()["norm_groups"] == 4
