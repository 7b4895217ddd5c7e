"""Every extractor on Glow (default config, ActNorm initialised, zero-inits perturbed) vs a float64 loop."""

from __future__ import annotations

import pytest
import torch
from features_zoo import assert_methods_match_float64_loop, batch, perturbed

from gradood.models.glow import Glow


@pytest.fixture(scope="module")
def glow() -> Glow:
    torch.manual_seed(0)
    model = Glow()
    x, noise = batch(model, 16, seed=3)
    model.init_from_data(x, noise)
    return perturbed(model)


@pytest.mark.parametrize("group_size", [1, 5])
def test_all_methods_match_float64_loop(glow, group_size):
    assert_methods_match_float64_loop(glow, 7, group_size, ("loop", "vmap", "engine"))
