"""Every extractor on the VAE (default config, parameters perturbed) vs a float64 per-sample loop, with one
ELBO sample and with two (the decoder then runs twice per batch, each parameter fed by two calls)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from features_zoo import batch

from gradood.features import extract_features, group_ids
from gradood.models.vae import VAE


def vae(n_elbo_samples: int) -> VAE:
    torch.manual_seed(0)
    model = VAE(n_elbo_samples=n_elbo_samples)
    with torch.no_grad():  # default inits give zero biases; move everything off its init
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.prepare_for_scoring()
    return model


@pytest.mark.parametrize("n_elbo_samples", [1, 2])
@pytest.mark.parametrize("group_size", [1, 5])
def test_all_methods_match_float64_loop(n_elbo_samples, group_size):
    model = vae(n_elbo_samples)
    n = 7
    x, noise = batch(model, n, seed=1)
    groups = group_ids(n, group_size)
    m64 = copy.deepcopy(model).double()
    ref = extract_features(m64, x.double(), {k: v.double() for k, v in noise.items()}, groups, method="loop")
    assert len(ref.layer_names) == len(list(model.parameters()))
    assert (ref.sqnorms > 0).all()
    for method in ("vmap", "engine"):
        res = extract_features(model, x, noise, groups, method=method)
        rel = np.abs(res.sqnorms - ref.sqnorms) / ref.sqnorms
        worst = res.layer_names[rel.max(0).argmax()]
        assert rel.max() <= 1e-4, f"{method}: {worst} relative error {rel.max():.2e}"
        np.testing.assert_allclose(res.log_prob, ref.log_prob, rtol=1e-5)
