"""Every extractor on the default DDPM (every parameter perturbed) vs a float64 per-sample loop, with one
noise draw and with several (the U-Net then runs once per draw on the same rows)."""

from __future__ import annotations

import pytest
import torch
from features_zoo import assert_methods_match_float64_loop, perturbed

from gradood.models.ddpm import DDPM


def perturbed_ddpm(**params) -> DDPM:
    torch.manual_seed(0)
    return perturbed(DDPM(**params))


@pytest.fixture(scope="module")
def ddpm() -> DDPM:
    return perturbed_ddpm()


@pytest.mark.parametrize("group_size", [1, 5])
def test_engine_and_vmap_match_float64_loop(ddpm, group_size):
    assert_methods_match_float64_loop(ddpm, 7, group_size, ("vmap", "engine"))


@pytest.mark.parametrize("group_size", [1, 5])
def test_engine_with_several_noise_draws(group_size):
    model = perturbed_ddpm(n_q_samples=2, score_t=3)
    assert_methods_match_float64_loop(model, 6, group_size, ("engine",))
