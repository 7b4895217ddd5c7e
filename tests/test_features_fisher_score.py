"""The diagonal-Fisher score statistic against an explicit float64 per-group loop (zoo model, shipped Glow
and VAE), its chunking and eps behaviour, and the Fisher's npz round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from features_zoo import batch, zoo
from torch import nn

import gradood.features.reference as reference
from gradood.features import group_ids
from gradood.features.fisher_score import DiagonalFisher, diagonal_fisher, fisher_score_statistic
from gradood.models.base import DensityModel
from gradood.models.checkpoint import load_checkpoint

PRETRAINED = Path(__file__).resolve().parents[1] / "gradood" / "pretrained"


def _loop_grads(model: DensityModel, x: torch.Tensor, noise: dict, groups: torch.Tensor) -> torch.Tensor:
    """[G, P]: float64 gradient of each group's summed log-likelihood, one backward per group."""
    m64 = copy.deepcopy(model).double()
    params = [p for p in m64.parameters() if p.requires_grad]
    out = []
    for g in range(int(groups.max()) + 1):
        rows = (groups == g).nonzero().flatten()
        lp = m64.log_prob(x[rows].double(), {k: v[rows].double() for k, v in noise.items()}).sum()
        grads = torch.autograd.grad(lp, params, materialize_grads=True)
        out.append(torch.cat([gr.flatten() for gr in grads]))
    return torch.stack(out)


def _flat(fisher: DiagonalFisher, model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [fisher.values[name].flatten() for name, p in model.named_parameters() if p.requires_grad]
    )


def _statistic(grads: torch.Tensor, f: torch.Tensor, eps: float) -> np.ndarray:
    return (grads.square() / (f + eps * f.mean())).sum(1).numpy()


def _zoo(name: str = "conv") -> DensityModel:
    torch.manual_seed(0)
    return zoo()[name]


def _shipped(family: str) -> DensityModel:
    return load_checkpoint(PRETRAINED / f"{family}_fmnist_small")[0]


@pytest.mark.parametrize("source", ["zoo", "glow", "vae"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_matches_float64_loop(source, group_size):
    """Fisher streamed from two batches (7 rows: groups of 3 leave a short last group in each) and the
    statistic of 5 other rows, in float32 and in float64, against the loop."""
    model = _zoo() if source == "zoo" else _shipped(source)
    x, noise = batch(model, 12, seed=1)
    fit, test = slice(0, 7), slice(7, 12)
    split = [slice(0, 4), slice(4, 7)]
    batches = [
        (x[fit][s], {k: v[fit][s] for k, v in noise.items()}, group_ids(len(x[fit][s]), group_size))
        for s in split
    ]
    ref_fit = torch.cat([_loop_grads(model, *b) for b in batches])
    f_ref = ref_fit.square().mean(0)
    test_groups = group_ids(5, group_size)
    x_test, noise_test = x[test], {k: v[test] for k, v in noise.items()}
    s_ref = _statistic(_loop_grads(model, x_test, noise_test, test_groups), f_ref, 1e-8)
    assert (f_ref > 0).float().mean() > 0.5 and s_ref.shape == (len(test_groups.unique()),)

    fisher = diagonal_fisher(model, batches)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert fisher.n == len(ref_fit) and list(fisher.values) == names
    assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in fisher.values.values())
    f = _flat(fisher, model)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-7 * float(f_ref.max()))
    stat = fisher_score_statistic(model, x_test, noise_test, test_groups, fisher)
    assert stat.dtype == np.float64
    np.testing.assert_allclose(stat, s_ref, rtol=1e-4)

    m64 = copy.deepcopy(model).double()
    as64 = [(xb.double(), {k: v.double() for k, v in nb.items()}, gb) for xb, nb, gb in batches]
    fisher64 = diagonal_fisher(m64, as64)
    torch.testing.assert_close(_flat(fisher64, m64), f_ref, rtol=1e-9, atol=0)
    stat64 = fisher_score_statistic(
        m64, x_test.double(), {k: v.double() for k, v in noise_test.items()}, test_groups, fisher64
    )
    np.testing.assert_allclose(stat64, s_ref, rtol=1e-9)


def test_irregular_group_sizes_match_loop():
    """Sizes 2, 1, 3, 3, 1: every change of size starts a new vmap run."""
    model = _zoo("group_norm")
    x, noise = batch(model, 10)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 3, 4])
    fisher = diagonal_fisher(model, [(x, noise, groups)])
    grads = _loop_grads(model, x, noise, groups)
    torch.testing.assert_close(_flat(fisher, model), grads.square().mean(0), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(
        fisher_score_statistic(model, x, noise, groups, fisher),
        _statistic(grads, _flat(fisher, model), 1e-8),
        rtol=1e-4,
    )


def test_invariant_to_chunk_size_and_budget(monkeypatch):
    model = _zoo()
    x, noise = batch(model, 11)
    groups = group_ids(11, 3)
    fisher = diagonal_fisher(model, [(x, noise, groups)])
    whole = fisher_score_statistic(model, x, noise, groups, fisher)
    for chunk_size in (1, 2):
        np.testing.assert_allclose(
            fisher_score_statistic(model, x, noise, groups, fisher, chunk_size=chunk_size), whole, rtol=1e-6
        )
        chunked = diagonal_fisher(model, [(x, noise, groups)], chunk_size=chunk_size)
        torch.testing.assert_close(_flat(chunked, model), _flat(fisher, model), rtol=1e-5, atol=0)
    monkeypatch.setattr(reference, "VMAP_GRAD_BUDGET_BYTES", 1)
    np.testing.assert_allclose(fisher_score_statistic(model, x, noise, groups, fisher), whole, rtol=1e-6)


def test_eps_bounds_zero_fisher_elements():
    """A Fisher zeroed on one tensor weights it by 1 / (eps * mean F): finite, exactly that, inf at eps=0;
    a parameter log_prob never uses gets F = 0 and adds nothing (not nan) under the default eps."""
    model = _zoo()
    x, noise = batch(model, 6)
    fisher = diagonal_fisher(model, [(x, noise, None)])
    zeroed = copy.deepcopy(fisher)
    zeroed.values["body.10.weight"].zero_()
    grads = _loop_grads(model, x, noise, torch.arange(6))
    expected = _statistic(grads, _flat(zeroed, model), 1e-3)
    stat = fisher_score_statistic(model, x, noise, None, zeroed, eps=1e-3)
    assert (
        np.isfinite(stat).all()
        and (stat > fisher_score_statistic(model, x, noise, None, fisher, eps=1e-3)).all()
    )
    np.testing.assert_allclose(stat, expected, rtol=1e-4)
    assert np.isinf(fisher_score_statistic(model, x, noise, None, zeroed, eps=0.0)).all()
    with pytest.raises(ValueError, match="eps"):
        fisher_score_statistic(model, x, noise, None, fisher, eps=-1.0)

    model.unused = nn.Parameter(torch.ones(3))
    with_unused = diagonal_fisher(model, [(x, noise, None)])
    assert torch.equal(with_unused.values["unused"], torch.zeros(3, dtype=torch.float64))
    expected = _statistic(_loop_grads(model, x, noise, torch.arange(6)), _flat(with_unused, model), 1e-8)
    np.testing.assert_allclose(
        fisher_score_statistic(model, x, noise, None, with_unused), expected, rtol=1e-4
    )
    assert np.isnan(fisher_score_statistic(model, x, noise, None, with_unused, eps=0.0)).all()


def test_npz_round_trip(tmp_path):
    model = _zoo("outside_param")
    x, noise = batch(model, 5)
    fisher = diagonal_fisher(model, [(x, noise, group_ids(5, 2))])
    np.savez(tmp_path / "fisher.npz", **fisher.to_numpy())
    with np.load(tmp_path / "fisher.npz", allow_pickle=False) as arrays:
        loaded = DiagonalFisher.from_numpy(arrays)
    assert loaded.n == fisher.n == 3 and list(loaded.values) == list(fisher.values)
    for name, v in fisher.values.items():
        assert loaded.values[name].dtype == torch.float64 and torch.equal(loaded.values[name], v)
    np.testing.assert_array_equal(
        fisher_score_statistic(model, x, noise, None, loaded),
        fisher_score_statistic(model, x, noise, None, fisher),
    )
    with pytest.raises(ValueError, match="not a DiagonalFisher"):
        DiagonalFisher.from_numpy({"weights": np.zeros(2)})


def test_no_grad_inference_mode_no_param_grad_and_mismatch():
    model = _zoo("linear_2d")
    x, noise = batch(model, 4)
    fisher = diagonal_fisher(model, [(x, noise, None)])
    expected = fisher_score_statistic(model, x, noise, None, fisher)
    with torch.no_grad():
        np.testing.assert_array_equal(fisher_score_statistic(model, x, noise, None, fisher), expected)
    with torch.inference_mode():
        xi, ni = x.clone(), {k: v.clone() for k, v in noise.items()}
        under_inference = fisher_score_statistic(model, xi, ni, None, fisher)
        fisher_inference = diagonal_fisher(model, [(xi, ni, None)])
    np.testing.assert_allclose(under_inference, expected, rtol=1e-6)
    torch.testing.assert_close(_flat(fisher_inference, model), _flat(fisher, model))
    assert all(p.grad is None for p in model.parameters()) and (expected > 0).all()
    with pytest.raises(ValueError, match="does not match"):
        fisher_score_statistic(_zoo("conv"), x, noise, None, fisher)
    with pytest.raises(ValueError, match="at least one row"):
        diagonal_fisher(model, [])
