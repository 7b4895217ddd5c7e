"""Every extractor on the VAE (default config, parameters perturbed) vs a float64 per-sample loop, with one
ELBO sample and with two (the decoder then runs twice per batch, each parameter fed by two calls)."""

from __future__ import annotations

import pytest
import torch
from features_zoo import assert_methods_match_float64_loop, perturbed

from gradood.models.vae import VAE


@pytest.mark.parametrize("n_elbo_samples", [1, 2])
@pytest.mark.parametrize("group_size", [1, 5])
def test_all_methods_match_float64_loop(n_elbo_samples, group_size):
    torch.manual_seed(0)
    assert_methods_match_float64_loop(perturbed(VAE(n_elbo_samples=n_elbo_samples)), 7, group_size)
