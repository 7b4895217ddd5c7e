"""Every extractor on the default DDPM (every parameter perturbed) vs a float64 per-sample loop, with one
noise draw and with several (the U-Net then runs once per draw on the same rows)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from features_zoo import batch

from gradood.features import extract_features, group_ids
from gradood.models.ddpm import DDPM


def perturbed_ddpm(**params) -> DDPM:
    torch.manual_seed(0)
    model = DDPM(**params)
    with torch.no_grad():  # GroupNorm's unit weights and zero biases would give degenerate gradients
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.prepare_for_scoring()
    return model


@pytest.fixture(scope="module")
def ddpm() -> DDPM:
    return perturbed_ddpm()


def assert_methods_match_float64_loop(model: DDPM, n: int, group_size: int, methods: tuple[str, ...]) -> None:
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


@pytest.mark.parametrize("group_size", [1, 5])
def test_engine_and_vmap_match_float64_loop(ddpm, group_size):
    assert_methods_match_float64_loop(ddpm, 7, group_size, ("vmap", "engine"))


@pytest.mark.parametrize("group_size", [1, 5])
def test_engine_with_several_noise_draws(group_size):
    model = perturbed_ddpm(n_q_samples=2, score_t=3)
    assert_methods_match_float64_loop(model, 6, group_size, ("engine",))
