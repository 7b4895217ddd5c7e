"""Every extractor on the default PixelCNN (parameters perturbed) vs a float64 per-sample loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from features_zoo import batch

from gradood.features import FeatureEngine, extract_features, group_ids
from gradood.models.pixelcnn import PixelCNN


@pytest.fixture(scope="module")
def pixelcnn() -> PixelCNN:
    torch.manual_seed(0)
    model = PixelCNN()
    with torch.no_grad():  # away from the default init, so no layer sits at a special point
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.prepare_for_scoring()
    return model


@pytest.mark.parametrize("group_size", [1, 5])
def test_all_methods_match_float64_loop(pixelcnn, group_size):
    n = 7
    x, noise = batch(pixelcnn, n, seed=1)
    assert noise == {}
    groups = group_ids(n, group_size)
    m64 = copy.deepcopy(pixelcnn).double()
    ref = extract_features(m64, x.double(), {}, groups, method="loop")
    assert len(ref.layer_names) == len(list(pixelcnn.parameters())) == 43
    assert (ref.sqnorms > 0).all()
    for method in ("vmap", "engine"):
        res = extract_features(pixelcnn, x, noise, groups, method=method)
        assert res.layer_names == ref.layer_names
        rel = np.abs(res.sqnorms - ref.sqnorms) / ref.sqnorms
        worst = res.layer_names[rel.max(0).argmax()]
        assert rel.max() <= 1e-4, f"{method}: {worst} relative error {rel.max():.2e}"
        np.testing.assert_allclose(res.log_prob, ref.log_prob, rtol=1e-5)


def test_engine_uses_the_conv_rule_for_every_layer(pixelcnn):
    """No per-module vmap replay: every hooked module is a plain Conv2d with its closed-form rule."""
    engine = FeatureEngine(pixelcnn, check="always")
    rules = {spec.rule.__name__ for spec in engine.rules.values()}
    assert rules == {"conv_rule"}
    x, noise = batch(pixelcnn, 3, seed=2)
    log_prob, sqnorms = engine(x, noise, group_ids(3, 1))  # coverage check: rules add up to autograd
    assert sqnorms.shape == (3, 43) and torch.isfinite(log_prob).all()
