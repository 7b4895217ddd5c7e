"""Every extractor on Glow (default config, ActNorm initialised, zero-inits perturbed) vs a float64 loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from features_zoo import batch

from gradood.features import extract_features, group_ids
from gradood.models.glow import Glow


@pytest.fixture(scope="module")
def glow() -> Glow:
    torch.manual_seed(0)
    model = Glow()
    x, noise = batch(model, 16, seed=3)
    model.init_from_data(x, noise)
    with torch.no_grad():  # zero-initialised layers would give zero or degenerate gradients
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.prepare_for_scoring()
    return model


@pytest.mark.parametrize("group_size", [1, 5])
def test_all_methods_match_float64_loop(glow, group_size):
    n = 7
    x, noise = batch(glow, n, seed=1)
    groups = group_ids(n, group_size)
    m64 = copy.deepcopy(glow).double()
    ref = extract_features(m64, x.double(), {k: v.double() for k, v in noise.items()}, groups, method="loop")
    assert len(ref.layer_names) == len(list(glow.parameters()))
    assert (ref.sqnorms > 0).all()
    for method in ("loop", "vmap", "engine"):
        res = extract_features(glow, x, noise, groups, method=method)
        rel = np.abs(res.sqnorms - ref.sqnorms) / ref.sqnorms
        worst = res.layer_names[rel.max(0).argmax()]
        assert rel.max() <= 1e-4, f"{method}: {worst} relative error {rel.max():.2e}"
        np.testing.assert_allclose(res.log_prob, ref.log_prob, rtol=1e-5)
