"""The hook engine against a float64 per-sample loop: every module kind, every reduction strategy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from features_zoo import Odd, ZooDensity, batch, zoo
from torch import nn

from gradood.features import (
    CoverageError,
    FeatureEngine,
    ModuleCall,
    extract_features,
    group_ids,
    register_rule,
)
from gradood.features.core import grad_enabled
from gradood.features.engine import NORM_BLOCK, _sqnorms

ZOO = sorted(zoo())


def _float64_loop(model, x, noise, groups):
    m64 = copy.deepcopy(model).double()
    return extract_features(m64, x.double(), {k: v.double() for k, v in noise.items()}, groups, method="loop")


def _assert_close(res, ref, rtol=1e-4):
    assert res.layer_names == ref.layer_names
    rel = np.abs(res.sqnorms - ref.sqnorms) / np.abs(ref.sqnorms)
    worst = np.unravel_index(rel.argmax(), rel.shape)
    assert rel.max() <= rtol, f"{ref.layer_names[worst[1]]}: relative error {rel.max():.2e}"
    assert (ref.sqnorms > 0).all()  # every feature non-trivial, so the comparison means something
    np.testing.assert_allclose(res.log_prob, ref.log_prob, rtol=1e-5)


@pytest.mark.parametrize("group_size", [1, 5])
@pytest.mark.parametrize("name", ZOO)
def test_engine_matches_float64_loop_on_zoo(name, group_size):
    model = zoo()[name]
    x, noise = batch(model, 11)
    groups = group_ids(11, group_size)
    res = extract_features(model, x, noise, groups, method="engine")
    _assert_close(res, _float64_loop(model, x, noise, groups))


@pytest.mark.parametrize("strategy", ["ghost", "bmm", "grouped", "correlated", "shifted", "cost", "time"])
@pytest.mark.parametrize("name", ["conv", "conv_transpose", "linear_3d", "tied"])
def test_every_reduction_strategy_is_exact(name, strategy):
    model = zoo()[name]
    x, noise = batch(model, 11)
    groups = group_ids(11, 5)
    engine = FeatureEngine(model, check="always", strategy=strategy, workspace_bytes=4096)
    with grad_enabled():
        log_prob, sq = engine(x, noise, groups)
    ref = _float64_loop(model, x, noise, groups)
    np.testing.assert_allclose(sq.numpy(), ref.sqnorms, rtol=1e-4)
    np.testing.assert_allclose(log_prob.numpy(), ref.log_prob, rtol=1e-5)


def test_engine_leaves_no_grad_and_handles_no_grad_callers():
    model = zoo()["conv"]
    x, noise = batch(model, 6)
    with torch.no_grad():
        res = extract_features(model, x, noise, method="engine")
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(
        res.sqnorms, extract_features(model, x, noise, method="loop").sqnorms, rtol=1e-4
    )


class _Leaky(ZooDensity):
    """Uses a Linear's weight a second time outside the Linear's forward: invisible to its hook."""

    def log_prob(self, x, noise):
        return super().log_prob(x, noise) + (self.body[1].weight.sum() * x.flatten(1).mean(1) / 256)


def test_coverage_check_names_a_parameter_the_hooks_miss():
    model = _Leaky(nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)), (2, 3, 3))
    model.prepare_for_scoring()
    x, noise = batch(model, 4)
    with pytest.raises(CoverageError, match=r"body\.1\.weight") as err:
        extract_features(model, x, noise, method="engine")
    assert "body.1.bias" not in str(err.value)


def test_coverage_check_accepts_gradients_that_are_zero_in_exact_arithmetic():
    """A conv bias feeding a GroupNorm with one channel per group has zero gradient: float noise on both
    sides of the check must not be mistaken for a parameter the hooks miss."""
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.Conv2d(4, 2, 1))
    model = ZooDensity(body, (2, 5, 5))
    model.prepare_for_scoring()
    x, noise = batch(model, 6)
    res = extract_features(model, x, noise, method="engine")
    bias = res.layer_names.index("body.0.bias")
    assert res.sqnorms[:, bias].max() < 1e-10 * res.sqnorms.max()


class _OddWithRule(Odd):
    """Odd, with a closed-form rule registered below (a model author's custom rule)."""


calls: list[str] = []


@register_rule(_OddWithRule)
def _odd_rule(call: ModuleCall) -> dict:
    calls.append("odd")
    m, x, g = call.module, call.args[0], call.grad()
    sig = torch.sigmoid(m.gate)
    return {"gate": (g * x * sig * (1 - sig)).sum((2, 3)), "shift": (g * x.square()).sum((2, 3))}


class _OddWrongRule(Odd):
    pass


@register_rule(_OddWrongRule)
def _wrong_rule(call: ModuleCall) -> dict:
    return {"gate": torch.zeros(call.batch_size, call.module.gate.numel()), "shift": call.grad().sum((2, 3))}


@pytest.mark.parametrize("group_size", [1, 5])
def test_registered_rule_is_used_and_exact(group_size):
    torch.manual_seed(1)
    model = ZooDensity(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _OddWithRule(3)), (2, 4, 4))
    model.prepare_for_scoring()
    x, noise = batch(model, 11)
    groups = group_ids(11, group_size)
    calls.clear()
    res = extract_features(model, x, noise, groups, method="engine")
    assert calls == ["odd"]
    _assert_close(res, _float64_loop(model, x, noise, groups))


def test_a_wrong_rule_fails_the_coverage_check():
    model = ZooDensity(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _OddWrongRule(3)), (2, 4, 4))
    model.prepare_for_scoring()
    x, noise = batch(model, 5)
    with pytest.raises(CoverageError, match=r"body\.1\.gate"):
        extract_features(model, x, noise, method="engine")


def test_coverage_check_runs_on_the_first_batch_only_by_default():
    model = zoo()["linear_2d"]
    x, noise = batch(model, 4)
    engine = FeatureEngine(model)
    with grad_enabled():
        engine(x, noise, torch.arange(4))
        assert engine.checked
        _, again = engine(x, noise, torch.arange(4))
    np.testing.assert_allclose(
        again.numpy(), extract_features(model, x, noise, method="loop").sqnorms, rtol=1e-4
    )


class _Doubled(ZooDensity):
    """Runs the body on the batch and its mirror image stacked (2N rows), as a model drawing several
    noise samples per row would: no module sees the batch's own rows, so the engine must fall back."""

    def log_prob(self, x, noise):
        h = (x + noise["u"]) / 256.0 - 0.5
        out = self.body(torch.cat([h, h.flip(-1)])).flatten(1)
        return -0.5 * out.square().sum(1).view(2, -1).sum(0)


@pytest.mark.parametrize("group_size", [1, 5])
def test_modules_called_on_other_rows_fall_back_exactly(group_size):
    model = _Doubled(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1)), (2, 4, 4))
    model.prepare_for_scoring()
    x, noise = batch(model, 11)
    groups = group_ids(11, group_size)
    res = extract_features(model, x, noise, groups, method="engine")
    _assert_close(res, _float64_loop(model, x, noise, groups))


def test_engine_in_float64_is_exact():
    """In float64 the engine must agree with the loop to round-off: the rules are exact, not approximate."""
    model = zoo()["conv"].double()
    x, noise = batch(model, 7)
    x, noise = x.double(), {k: v.double() for k, v in noise.items()}
    groups = group_ids(7, 3)
    for strategy in ("ghost", "bmm", "grouped", "correlated", "shifted"):
        engine = FeatureEngine(model, check="always", strategy=strategy)
        with grad_enabled():
            _, sq = engine(x, noise, groups)
        ref = extract_features(model, x, noise, groups, method="loop").sqnorms
        np.testing.assert_allclose(sq.numpy(), ref, rtol=1e-10)


def _peak_bytes(fn) -> int:
    """Peak torch CPU allocations during ``fn``, replayed from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_engine_peak_memory_stays_near_a_plain_backward():
    from gradood.models.glow import Glow

    model = Glow(image_size=16, hidden_channels=16, num_steps=2)
    x, noise = batch(model, 16)
    model.init_from_data(x, noise)
    model.prepare_for_scoring()
    params = list(model.parameters())

    def plain():
        with torch.enable_grad():
            torch.autograd.grad(model.log_prob(x, noise).sum(), params)

    def engine():
        extract_features(model, x, noise, method="engine")

    plain(), engine()  # warm: coverage check and strategy choice happen on the first batch
    assert _peak_bytes(engine) <= 1.5 * _peak_bytes(plain)


@pytest.mark.parametrize("length", [7, 4 * NORM_BLOCK, 37 * NORM_BLOCK + 513, 1 << 20])
def test_squared_norms_keep_float32_rows_to_round_off(length):
    """Rows of up to a million float32 terms must reduce to ~1e-7 of the float64 sum: an unblocked
    sequential reduction loses up to ~1e-5 there, enough to show in a 1e-4 comparison of features."""
    gen = torch.Generator().manual_seed(length)
    t = torch.randn(3, 2, length, generator=gen) * torch.logspace(-3, 3, length).sqrt()
    got = _sqnorms(t.transpose(0, 2), 0)  # a strided, non-last reduction dim
    want = t.double().square().sum(-1).T
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-6)


def test_group_norm_rule_recomputes_statistics_when_the_output_is_not_the_kernels():
    """The GroupNorm rule reads mean and 1/std from the autograd node that produced the module's output;
    when another forward hook has replaced that output, it must recompute them and stay exact."""
    model = zoo()["group_norm"]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    for m in norms:
        m.register_forward_hook(lambda mod, args, out: out * 1.0)
    x, noise = batch(model, 9)
    with grad_enabled():
        produced = norms[0](torch.randn(2, norms[0].num_channels, 3, 3, requires_grad=True))
    assert type(produced.grad_fn).__name__ != "NativeGroupNormBackward0"
    groups = group_ids(9, 4)
    res = extract_features(model, x, noise, groups, method="engine")
    _assert_close(res, _float64_loop(model, x, noise, groups))
