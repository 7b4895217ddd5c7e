"""VAE: discretised logistic likelihood and KL against scipy / torch.distributions, the ELBO against the
exact log-likelihood of a 1-D-latent model (quadrature), multi-sample averaging, per-row eps,
independence of rows, hparams and checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
from features_zoo import move_parameters
from scipy.stats import logistic
from torch.distributions import Normal, kl_divergence

from gradood.models import build_model
from gradood.models.checkpoint import load_checkpoint, save_checkpoint
from gradood.models.vae import (
    VAE,
    discretized_logistic_log_prob,
    gaussian_kl_to_standard,
    sample_discretized_logistic,
    to_unit_range,
)
from gradood.seeding import draw_noise

TINY = dict(in_channels=1, image_size=4, hidden_channels=4, latent_dim=1, norm_groups=2)


def pixels(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float()


def noise_for(model: VAE, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return draw_noise(model.noise_spec(), [f"row{i}" for i in range(n)], seed)


def scipy_log_pmf(x: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    """log P(bin x) from scipy's logistic CDF; upper tail bins as survival-function differences, which
    keep their precision where both CDF values are close to 1."""
    scale = np.exp(log_scale)
    upper = np.where(x >= 255, np.inf, (x + 0.5) / 127.5 - 1.0)
    lower = np.where(x <= 0, -np.inf, (x - 0.5) / 127.5 - 1.0)
    by_cdf = logistic.cdf(upper, mean, scale) - logistic.cdf(lower, mean, scale)
    by_sf = logistic.sf(lower, mean, scale) - logistic.sf(upper, mean, scale)
    with np.errstate(divide="ignore"):  # bins whose probability underflows float64
        return np.log(np.where(lower > mean, by_sf, by_cdf))


def test_discretized_logistic_matches_scipy_including_edge_bins():
    gen = np.random.default_rng(0)
    x = np.tile(np.arange(256.0), (6, 1))  # every bin, the edge bins 0 and 255 included
    mean = gen.uniform(-1.2, 1.2, (6, 1)) * np.ones_like(x)
    log_scale = np.array([[-7.0], [-4.0], [-2.5], [-1.0], [0.0], [1.0]]) * np.ones_like(x)
    ours = discretized_logistic_log_prob(*(torch.from_numpy(a) for a in (x, mean, log_scale))).numpy()
    ref = scipy_log_pmf(x, mean, log_scale)
    finite = ref > -600  # scipy's float64 CDFs underflow far out in the tails of the narrowest scale
    assert finite[3:, [0, 255]].all() and finite.sum() > 1200  # edge bins of the wider scales included
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-9, atol=1e-9)
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_logistic_sums_to_one_over_all_levels(dtype):
    gen = torch.Generator().manual_seed(1)
    mean = 3 * torch.rand(50, 1, generator=gen, dtype=dtype) - 1.5
    log_scale = 16 * torch.rand(50, 1, generator=gen, dtype=dtype) - 9  # past both clamp bounds too
    x = torch.arange(256, dtype=dtype).expand(50, 256)
    total = discretized_logistic_log_prob(x, mean, log_scale).exp().sum(1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (total - 1).abs().max().item() < tol


def test_sampler_follows_the_pmf():
    mean = torch.tensor([-0.98, 0.1, 0.97], dtype=torch.float64)[:, None]
    log_scale = torch.tensor([-3.5, -4.5, -3.0], dtype=torch.float64)[:, None]
    u = torch.rand(3, 40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_discretized_logistic(mean, log_scale, u)
    pmf = discretized_logistic_log_prob(torch.arange(256.0, dtype=torch.float64), mean, log_scale).exp()
    for row in range(3):
        freq = torch.bincount(draws[row].long(), minlength=256).double() / u.shape[1]
        assert 0.5 * (freq - pmf[row]).abs().sum() < 0.02


def test_analytic_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    logvar = 2 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl_to_standard(mean, logvar), ref, rtol=1e-12, atol=1e-12)


def exact_log_likelihood(model: VAE, x: torch.Tensor, half_width: float = 12.0, points: int = 6001):
    """log P(x) = log int p(x | z) N(z; 0, 1) dz for a 1-D latent, by the trapezoid rule on a grid."""
    z = torch.linspace(-half_width, half_width, points, dtype=torch.float64)[:, None]
    mean, log_scale = model.decoder(z)
    log_lik = discretized_logistic_log_prob(x[:, None], mean[None], log_scale[None]).flatten(2).sum(2)
    log_joint = log_lik + Normal(0.0, 1.0).log_prob(z[:, 0])
    weights = torch.full((points,), 2 * half_width / (points - 1), dtype=torch.float64)
    weights[[0, -1]] /= 2
    return torch.logsumexp(log_joint + weights.log(), dim=1)


def test_elbo_is_a_lower_bound_on_the_exact_log_likelihood():
    k = 400
    model = move_parameters(VAE(**TINY, n_elbo_samples=k), scale=0.3).double()
    x = pixels(3, model.input_shape, seed=4).double()
    eps = draw_noise(model.noise_spec(), ["a", "b", "c"], seed=0, dtype=torch.float64)["eps"]
    with torch.no_grad():
        exact = exact_log_likelihood(model, x)
        coarse = exact_log_likelihood(model, x, half_width=10.0, points=2001)
        log_lik, _ = model.elbo_terms(x, eps)
        elbo = model.log_prob(x, {"eps": eps})
        # the ELBO's parts rebuilt from torch.distributions and the decoder called on z_k = mean + std eps_k
        mean, logvar = model.encoder(to_unit_range(x))
        q, prior = Normal(mean[:, None], (0.5 * logvar).exp()[:, None]), Normal(0.0, 1.0)
        z = q.mean + q.stddev * eps
        ref_log_lik = torch.stack(
            [discretized_logistic_log_prob(x, *model.decoder(z[:, j])).flatten(1).sum(1) for j in range(k)], 1
        )
        kl = kl_divergence(q, prior).sum(-1)[:, 0]
        log_ratio = (prior.log_prob(z) - q.log_prob(z)).sum(-1)
    torch.testing.assert_close(exact, coarse, rtol=0, atol=1e-8)  # the quadrature has converged
    torch.testing.assert_close(log_lik, ref_log_lik, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(elbo, log_lik.mean(1) - kl, rtol=1e-12, atol=1e-10)
    # analytic KL against its Monte Carlo estimate
    assert ((-log_ratio.mean(1) - kl).abs() <= 4 * log_ratio.std(1) / math.sqrt(k)).all()
    assert (exact < 0).all()
    assert (elbo <= exact + 4 * log_lik.std(1) / math.sqrt(k)).all(), (elbo, exact)
    assert (exact - elbo).min() > 1e-2  # q is not the exact posterior, so the bound is not tight


def test_multi_sample_elbo_is_the_mean_of_single_sample_elbos():
    model3 = move_parameters(VAE(n_elbo_samples=3, hidden_channels=8, latent_dim=4), scale=0.1).double()
    model1 = VAE(n_elbo_samples=1, hidden_channels=8, latent_dim=4).double().eval()
    model1.load_state_dict(model3.state_dict())
    x = pixels(4, model3.input_shape).double()
    eps = noise_for(model3, 4)["eps"].double()
    with torch.no_grad():
        together = model3.log_prob(x, {"eps": eps})
        draws = torch.stack([model1.log_prob(x, {"eps": eps[:, k : k + 1]}) for k in range(3)])
    torch.testing.assert_close(together, draws.mean(0), rtol=1e-12, atol=1e-9)
    assert (draws.std(0) > 1e-3).all()  # the three draws really differ


def test_each_row_gets_its_own_eps_reproducibly():
    model = move_parameters(VAE(hidden_channels=8, latent_dim=4), scale=0.1)
    eps = draw_noise(model.noise_spec(), ["a", "b", "a"], seed=0)["eps"]
    assert torch.equal(eps[0], eps[2]) and not torch.equal(eps[0], eps[1])
    x = pixels(1, model.input_shape).expand(3, -1, -1, -1)
    with torch.no_grad():
        first = model.log_prob(x, {"eps": eps})
        again = model.log_prob(x.clone(), {"eps": eps.clone()})
    assert torch.equal(first, again)
    assert first[0] == first[2] and abs(first[0] - first[1]) > 1e-3
    other_seed = draw_noise(model.noise_spec(), ["a"], seed=1)["eps"]
    assert not torch.equal(other_seed[0], eps[0])


def test_rows_are_independent_and_inputs_untouched():
    model = move_parameters(VAE(hidden_channels=8, latent_dim=4), scale=0.1)
    x, noise = pixels(5, model.input_shape), noise_for(model, 5)
    x_before, eps_before = x.clone(), noise["eps"].clone()
    with torch.no_grad():
        batch = model.log_prob(x, noise)
        single = torch.cat([model.log_prob(x[i : i + 1], {"eps": noise["eps"][i : i + 1]}) for i in range(5)])
        changed = x.clone()
        changed[1:] = 255 - changed[1:]
        first_row = model.log_prob(changed, noise)[0]
    assert torch.equal(x, x_before) and torch.equal(noise["eps"], eps_before)
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(first_row, batch[0], rtol=1e-5, atol=1e-3)


def test_training_loss_is_mean_negative_elbo_in_bits_per_dim():
    model = move_parameters(VAE(hidden_channels=8, latent_dim=4), scale=0.1).double()
    x, noise = pixels(3, model.input_shape).double(), noise_for(model, 3)
    with torch.no_grad():
        loss = model.training_loss(x, noise)
        ref = -model.log_prob(x, noise).mean() / (28 * 28 * math.log(2))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_a_few_adam_steps_lower_the_loss():
    model = VAE(image_size=8, hidden_channels=8, latent_dim=4)
    x, noise = pixels(16, model.input_shape), noise_for(model, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.training_loss(x, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_hparams_and_checkpoint_round_trip(tmp_path):
    model = move_parameters(VAE(hidden_channels=8, latent_dim=5, n_elbo_samples=2), scale=0.1)
    hp = json.loads(json.dumps(model.hparams()))
    rebuilt = build_model("vae", hp)
    assert rebuilt.hparams() == model.hparams() and rebuilt.noise_spec() == model.noise_spec()
    fp = save_checkpoint(model, tmp_path / "ckpt")
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["fingerprint"] == fp and meta["model"] == "vae" and not loaded.training
    x, noise = pixels(2, model.input_shape), noise_for(model, 2)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x, noise), model.log_prob(x, noise))


def test_sample_gives_images_of_pixel_values():
    model = move_parameters(VAE(hidden_channels=8, latent_dim=4), scale=0.1)
    images = model.sample(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28)
    assert torch.equal(images, images.round()) and images.min() >= 0 and images.max() <= 255
    assert torch.equal(images, model.sample(3, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(image_size=30), "divisible by 4"),
        (dict(hidden_channels=12, norm_groups=8), "norm_groups"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(n_elbo_samples=1.5), "n_elbo_samples"),
    ],
)
def test_bad_hparams_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        VAE(**params)


def test_wrong_shapes_are_refused():
    model = VAE(hidden_channels=8, latent_dim=4)
    x, noise = pixels(2, model.input_shape), noise_for(model, 2)
    with pytest.raises(ValueError, match="noise\\['eps'\\]"):
        model.log_prob(x, {"eps": noise["eps"][:, :, :3]})
    with pytest.raises(ValueError, match="VAE expects"):
        model.log_prob(pixels(2, (1, 32, 32)), noise)
