"""Gated PixelCNN: causal structure (no leakage, no blind spot), exact normalised log-likelihood against
scipy, shifted convs against textbook masked convs, sampling, per-row independence, hparams, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from features_zoo import assert_rows_independent, move_parameters
from scipy import special, stats
from torch import nn

from gradood.models import build_model
from gradood.models.checkpoint import (
    WEIGHTS_FILE,
    checkpoint_exists,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from gradood.models.pixelcnn import PixelCNN, horizontal_conv, vertical_conv
from gradood.seeding import draw_noise

# receptive field 2 + 3 * 1 = 5 pixels: covers the whole 6x6 image, so the exact dependence set of
# pixel (i, j) must be every pixel before it in raster order
TINY = dict(image_size=6, channels=8, num_layers=3, kernel_size=3, first_kernel_size=5, head_channels=8)


def tiny(**overrides) -> PixelCNN:
    return move_parameters(PixelCNN(**{**TINY, **overrides}), scale=0.1).double()


def pixels(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("in_channels", [1, 2])
def test_logits_depend_on_exactly_the_raster_order_prefix(in_channels):
    model = tiny(in_channels=in_channels)
    c, h, w = model.input_shape
    x = pixels(1, model.input_shape).requires_grad_()
    logits = model.logits(x)
    assert logits.shape == (1, c, 256, h, w)
    gen = torch.Generator().manual_seed(1)
    for i in range(h):
        for j in range(w):
            for out_c in range(c):
                proj = torch.randn(256, generator=gen, dtype=torch.float64)  # no cancellation by chance
                (g,) = torch.autograd.grad(logits[0, out_c, :, i, j] @ proj, x, retain_graph=True)
                seen = (g[0] != 0).any(0).flatten()  # any input channel of each pixel
                expected = torch.arange(h * w) < i * w + j
                assert torch.equal(seen, expected), f"logits of ({out_c}, {i}, {j}) see {seen.nonzero()}"
                if i * w + j:
                    assert (g[0].flatten(1)[:, expected] != 0).all(), "every channel of the prefix is seen"


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("include", [True, False])
def test_shifted_convs_equal_textbook_masked_convs(k, include):
    """A k x k conv with zero padding k//2 whose mask keeps rows above the centre (plus the centre row)
    or taps left of the centre (plus the centre), as in van den Oord et al."""
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    for make, rows in ((vertical_conv, True), (horizontal_conv, False)):
        conv = make(3, 4, k, include).double()
        mask = torch.zeros(k, k, dtype=torch.float64)
        if rows:
            mask[: k // 2 + include] = 1
        else:
            mask[k // 2, : k // 2 + include] = 1
        kh, kw = conv.conv.kernel_size  # the kept taps, from the top-left corner of the kept region
        top = 0 if rows else k // 2
        full = torch.zeros(4, 3, k, k, dtype=torch.float64)
        full[:, :, top : top + kh, :kw] = conv.conv.weight.detach()
        assert int(mask.sum()) == kh * kw
        expected = F.conv2d(x, full * mask, conv.conv.bias.detach(), padding=k // 2)
        torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_log_prob_is_the_sum_of_picked_log_softmax():
    model = tiny(in_channels=2)
    x = pixels(3, model.input_shape, seed=2)
    with torch.no_grad():
        log_prob = model.log_prob(x, {}).numpy()
        logits = model.logits(x).numpy()
    log_p = special.log_softmax(logits, axis=2)
    picked = np.take_along_axis(log_p, x.numpy().astype(np.int64)[:, :, None], axis=2)
    np.testing.assert_allclose(log_prob, picked.reshape(3, -1).sum(1), rtol=1e-12)
    assert (log_prob < 0).all()


def test_conditionals_are_normalised_given_the_context():
    model = tiny()
    _, h, w = model.input_shape
    base = pixels(1, model.input_shape, seed=3)
    with torch.no_grad():
        for i, j in [(0, 0), (2, 3), (h - 1, w - 1)]:
            x = base.repeat(256, 1, 1, 1)
            x[:, 0, i, j] = torch.arange(256, dtype=x.dtype)
            per_pixel = model.pixel_log_probs(x)[:, 0, i, j]
            assert torch.logsumexp(per_pixel, 0).item() == pytest.approx(0.0, abs=1e-10)
            if (i, j) == (h - 1, w - 1):  # the last pixel marginalises out of the joint
                rest = model.log_prob(base, {}) - model.pixel_log_probs(base)[0, 0, i, j]
                total = torch.logsumexp(model.log_prob(x, {}), 0)
                assert total.item() == pytest.approx(rest.item(), rel=1e-12)


def test_bits_per_dim_and_training_loss():
    model = tiny()
    x = pixels(4, model.input_shape, seed=4)
    with torch.no_grad():
        probs = special.softmax(model.logits(x).numpy(), axis=2)
        bpd = model.bits_per_dim(model.log_prob(x, {})).numpy()
        loss = model.training_loss(x, {}).item()
    picked = np.take_along_axis(probs, x.numpy().astype(np.int64)[:, :, None], axis=2)
    expected = -np.log2(picked).reshape(4, -1).sum(1) / (6 * 6)
    np.testing.assert_allclose(bpd, expected, rtol=1e-12)
    assert loss == pytest.approx(expected.mean(), rel=1e-7)  # base class divides by a float32 log 2
    uniform = PixelCNN(**TINY).double()
    with torch.no_grad():
        nn.init.zeros_(uniform.head[-1].weight)
        nn.init.zeros_(uniform.head[-1].bias)
        assert uniform.bits_per_dim(uniform.log_prob(x, {})).numpy() == pytest.approx(8.0, rel=1e-12)


def test_rows_are_independent_and_inputs_untouched():
    model = tiny()
    assert_rows_independent(model, pixels(5, model.input_shape, seed=5), {})


def test_deterministic_without_noise():
    model = tiny()
    ids = [f"row{i}" for i in range(3)]
    assert model.noise_spec() == {}
    assert draw_noise(model.noise_spec(), ids, seed=0) == {}
    x = pixels(3, model.input_shape, seed=6)
    with torch.no_grad():
        first, again = model.log_prob(x, {}), model.log_prob(x.clone(), draw_noise({}, ids, seed=9))
    assert torch.equal(first, again)


def test_bad_inputs_fail():
    model = tiny()
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(torch.zeros(2, 1, 5, 6, dtype=torch.float64), {})
    with pytest.raises((IndexError, RuntimeError)):
        model.log_prob(torch.full((1, 1, 6, 6), 256.0, dtype=torch.float64), {})


def test_every_parameter_lives_in_a_plain_conv():
    """So the feature engine handles every layer with its exact Conv2d rule, no fallback."""
    owners = {type(m) for m in PixelCNN().modules() if list(m.parameters(recurse=False))}
    assert owners == {nn.Conv2d}


def test_default_size():
    model = PixelCNN()
    assert model.input_shape == (1, 28, 28)
    assert len(list(model.parameters())) == 4 + 5 * 7 + 4
    assert sum(p.numel() for p in model.parameters()) == 127_904


def randomised_pit(probs: np.ndarray, values: np.ndarray, u: np.ndarray) -> np.ndarray:
    """F(x - 1) + U p(x) per sub-pixel: uniform when ``values`` were drawn from ``probs`` [n, 256, ...]."""
    index = values.astype(np.int64)[:, None]
    cdf_below = np.take_along_axis(np.cumsum(probs, 1) - probs, index, 1)
    return (cdf_below + u * np.take_along_axis(probs, index, 1)).ravel()


def test_sampling_draws_from_the_conditionals():
    """Randomised probability integral transform: if every pixel is drawn from p(. | sampled prefix),
    the PIT values are i.i.d. uniform over all pixels and samples."""
    model = tiny(image_size=3, num_layers=1)
    with torch.no_grad():  # peaked, strongly context-dependent conditionals
        model.head[-1].weight.mul_(10.0)
        for stack in (model.v_in, model.h_in):
            stack.conv.weight.mul_(30.0)
    n = 400
    draws = [model.sample(n, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    sample = draws[0]
    assert sample.shape == (n, 1, 3, 3) and sample.dtype == torch.float64
    assert torch.equal(sample, sample.round()) and sample.min() >= 0 and sample.max() <= 255
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with torch.no_grad():
        probs = special.softmax(model.logits(sample).numpy(), axis=2)[:, 0]  # [n, 256, 3, 3]
    values, u = sample.numpy()[:, 0], np.random.default_rng(0).random((n, 1, 3, 3))
    assert stats.kstest(randomised_pit(probs, values, u), "uniform").pvalue > 1e-3
    # the test can tell a sampler that conditions on the wrong context (another sample's prefix)
    wrong = randomised_pit(np.roll(probs, 1, axis=0), values, u)
    assert stats.kstest(wrong, "uniform").pvalue < 1e-6


def test_hparams_round_trip():
    params = dict(
        in_channels=3,
        image_size=8,
        channels=4,
        num_layers=2,
        kernel_size=5,
        first_kernel_size=3,
        head_channels=6,
    )
    model = PixelCNN(**params)
    hparams = json.loads(json.dumps(model.hparams()))
    assert hparams == params
    rebuilt = build_model("pixelcnn", hparams)
    assert rebuilt.input_shape == (3, 8, 8) and rebuilt.image_mode == "RGB"
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize(
    "bad",
    [
        dict(channels=0),
        dict(num_layers=0),
        dict(image_size=28.0),
        dict(kernel_size=4),
        dict(kernel_size=1),
        dict(first_kernel_size=2),
        dict(in_channels=True),
    ],
)
def test_invalid_hparams_raise(bad):
    with pytest.raises(ValueError):
        PixelCNN(**bad)


def test_checkpoint_round_trip(tmp_path):
    model = move_parameters(PixelCNN(**TINY), scale=0.1)
    fp = save_checkpoint(model, tmp_path)
    loaded, meta = load_checkpoint(tmp_path)
    assert isinstance(loaded, PixelCNN) and not loaded.training
    assert meta["fingerprint"] == fp == model_fingerprint(loaded)
    assert meta["model"] == "pixelcnn" and meta["params"] == model.hparams()
    x = pixels(3, model.input_shape).float()
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x, {}), model.log_prob(x, {}), rtol=0, atol=0)
    state = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    state["head.3.bias"][0] += 1.0
    torch.save(state, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="fingerprint"):
        load_checkpoint(tmp_path)


PRETRAINED = "gradood/pretrained/pixelcnn_fmnist_small"


@pytest.mark.skipif(not checkpoint_exists(PRETRAINED), reason="no pretrained PixelCNN checkpoint")
def test_pretrained_checkpoint_models_fashion_mnist():
    from gradood.data.fashion_mnist import load_fashion_mnist

    model, meta = load_checkpoint(PRETRAINED)
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(np.array(images[-16:])).float()[:, None]
    noise_images = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        bpd = model.bits_per_dim(model.log_prob(x, {})).mean().item()
        noise_bpd = model.bits_per_dim(model.log_prob(noise_images, {})).mean().item()
    assert math.isfinite(bpd) and bpd < 5.0 < 8.0 < noise_bpd
    assert meta["model"] == "pixelcnn"
