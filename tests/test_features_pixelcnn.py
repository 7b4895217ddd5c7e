"""Every extractor on the default PixelCNN (parameters perturbed) vs a float64 per-sample loop."""

from __future__ import annotations

import pytest
import torch
from features_zoo import assert_methods_match_float64_loop, batch, perturbed

from gradood.features import FeatureEngine, group_ids
from gradood.models.pixelcnn import PixelCNN


@pytest.fixture(scope="module")
def pixelcnn() -> PixelCNN:
    torch.manual_seed(0)
    return perturbed(PixelCNN())


@pytest.mark.parametrize("group_size", [1, 5])
def test_all_methods_match_float64_loop(pixelcnn, group_size):
    assert pixelcnn.noise_spec() == {} and len(list(pixelcnn.parameters())) == 43
    assert_methods_match_float64_loop(pixelcnn, 7, group_size)


def test_engine_uses_the_conv_rule_for_every_layer(pixelcnn):
    """No per-module vmap replay: every hooked module is a plain Conv2d with its closed-form rule."""
    engine = FeatureEngine(pixelcnn, check="always")
    rules = {spec.rule.__name__ for spec in engine.rules.values()}
    assert rules == {"conv_rule"}
    x, noise = batch(pixelcnn, 3, seed=2)
    log_prob, sqnorms = engine(x, noise, group_ids(3, 1))  # coverage check: rules add up to autograd
    assert sqnorms.shape == (3, 43) and torch.isfinite(log_prob).all()
