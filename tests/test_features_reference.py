"""The reference extractors (loop, vmap) against numpy closed forms and each other in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from features_zoo import ZooDensity, batch, zoo
from torch import nn

from gradood.features import extract_features, feature_layer_names, group_ids


def _linear_model() -> ZooDensity:
    model = ZooDensity(nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 5)), (2, 3, 3))
    model.prepare_for_scoring()
    return model


def _numpy_features(model: ZooDensity, x: torch.Tensor, noise: dict, groups: np.ndarray):
    """log p = -1/2 ||W u + b||^2 + log 2, so grad_W = -sum_i r_i u_i^T and grad_b = -sum_i r_i per group."""
    lin = model.body[1]
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    u = ((x.double() + noise["u"].double()) / 256.0 - 0.5).flatten(1).numpy()
    r = u @ w.T + b
    log_prob = -0.5 * (r**2).sum(1) + np.log(2.0)
    sq = []
    for g in range(groups.max() + 1):
        rows = groups == g
        gw = -(r[rows, :, None] * u[rows, None, :]).sum(0)
        gb = -r[rows].sum(0)
        sq.append([(gw**2).sum(), (gb**2).sum()])
    return log_prob, np.array(sq)


@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_matches_numpy_closed_form(method, group_size):
    model = _linear_model()
    x, noise = batch(model, 8)
    groups = group_ids(8, group_size)
    res = extract_features(model, x, noise, groups, method=method)
    log_prob, sq = _numpy_features(model, x, noise, groups.numpy())
    assert res.layer_names == ["body.1.weight", "body.1.bias"]
    assert res.log_prob.dtype == np.float64 and res.sqnorms.dtype == np.float64
    assert res.sqnorms.shape == (len(sq), 2)
    np.testing.assert_allclose(res.log_prob, log_prob, rtol=1e-5)
    np.testing.assert_allclose(res.sqnorms, sq, rtol=1e-4)


@pytest.mark.parametrize("name", ["conv", "group_norm", "tied", "outside_param", "multihead_attention"])
@pytest.mark.parametrize("group_size", [1, 5])
def test_vmap_matches_float64_loop(name, group_size):
    model = zoo()[name]
    x, noise = batch(model, 11)
    groups = group_ids(11, group_size)
    res = extract_features(model, x, noise, groups, method="vmap")
    model.double()
    ref = extract_features(
        model, x.double(), {k: v.double() for k, v in noise.items()}, groups, method="loop"
    )
    assert res.layer_names == ref.layer_names == feature_layer_names(model)
    np.testing.assert_allclose(res.log_prob, ref.log_prob, rtol=1e-5)
    np.testing.assert_allclose(res.sqnorms, ref.sqnorms, rtol=1e-4)


def test_vmap_chunks_split_groups_exactly():
    """Chunks of 3 rows cut groups of 5: the carried partial sums must give the same features."""
    from gradood.features.reference import vmap_sqnorms

    model = zoo()["conv"]
    x, noise = batch(model, 12)
    groups = group_ids(12, 5)
    whole = extract_features(model, x, noise, groups, method="vmap")
    lp, sq = vmap_sqnorms(model, x, noise, groups, chunk_size=3)
    np.testing.assert_allclose(sq.numpy(), whole.sqnorms, rtol=1e-5)
    np.testing.assert_allclose(lp.numpy(), whole.log_prob, rtol=1e-6)


@pytest.mark.parametrize("method", ["loop", "vmap", "engine"])
def test_leaves_no_grad_and_runs_under_no_grad_and_inference_mode(method):
    model = _linear_model()
    x, noise = batch(model, 4)
    expected = extract_features(model, x, noise, method=method).sqnorms
    with torch.no_grad():
        under_no_grad = extract_features(model, x, noise, method=method).sqnorms
    with torch.inference_mode():
        xi, ni = x.clone(), {k: v.clone() for k, v in noise.items()}
        under_inference = extract_features(model, xi, ni, method=method).sqnorms
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_array_equal(under_no_grad, expected)
    np.testing.assert_allclose(under_inference, expected, rtol=1e-6)
    assert (expected > 0).all()


def test_frozen_parameters_are_not_features():
    model = _linear_model()
    model.body[1].bias.requires_grad_(False)
    x, noise = batch(model, 3)
    res = extract_features(model, x, noise, method="vmap")
    assert res.layer_names == ["body.1.weight"] and res.sqnorms.shape == (3, 1)
    _, sq = _numpy_features(model, x, noise, np.arange(3))
    np.testing.assert_allclose(res.sqnorms[:, 0], sq[:, 0], rtol=1e-4)


def test_group_ids_and_validation():
    assert group_ids(7, 3).tolist() == [0, 0, 0, 1, 1, 1, 2]
    model = _linear_model()
    x, noise = batch(model, 4)
    with pytest.raises(ValueError, match="unknown feature method"):
        extract_features(model, x, noise, method="backpack")
    for bad in ([0, 1, 0, 1], [1, 1, 2, 2], [0, 0, 2, 2]):
        with pytest.raises(ValueError, match="groups"):
            extract_features(model, x, noise, torch.tensor(bad), method="loop")
    with pytest.raises(ValueError, match="group_size"):
        group_ids(4, 0)
