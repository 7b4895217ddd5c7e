"""docs/models.md's custom-model example runs, trains a step, checkpoints and gets exact engine features."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gradood.features import extract_features
from gradood.models import DensityModel, build_model, model_names
from gradood.models.checkpoint import load_checkpoint, save_checkpoint
from gradood.seeding import draw_noise

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "models.md"


def readme_example() -> dict:
    text = GUIDE.read_text()
    block = re.search(r"<!-- custom-model-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/models.md lost its custom-model example"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(block.group(1), str(GUIDE), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def test_readme_custom_model_end_to_end(tmp_path):
    readme_example()
    assert "pixel_gaussian" in model_names()
    model = build_model("pixel_gaussian", {"image_size": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = [f"row{i}" for i in range(10)]
    x = torch.randint(0, 256, (10, 1, 8, 8)).float()
    noise = draw_noise(model.noise_spec(), ids, seed=0)

    # a training step through the default training_loss
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model.training_loss(x, noise)
    loss.backward()
    opt.step()

    save_checkpoint(model, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)
    for group_size in (1, 5):
        groups = torch.arange(10) // group_size
        engine = extract_features(loaded, x, noise, groups, method="engine")
        ref = extract_features(
            loaded.double(), x.double(), {k: v.double() for k, v in noise.items()}, groups, method="loop"
        )
        loaded.float()
        np.testing.assert_allclose(engine.sqnorms, ref.sqnorms, rtol=1e-4)
        np.testing.assert_allclose(engine.log_prob, ref.log_prob, rtol=1e-5)


def test_constructor_arguments_are_recorded_as_hparams():
    readme_example()
    assert build_model("pixel_gaussian", {"image_size": 8}).hparams() == {"in_channels": 1, "image_size": 8}

    class Wider(build_model("vae", {}).__class__):
        """A family's subclass: its own constructor's arguments are the ones a checkpoint rebuilds."""

        def __init__(self, width: int = 48, **rest: int):
            super().__init__(hidden_channels=width, **rest)

    model = Wider(width=16, latent_dim=4)
    assert model.hparams() == {"width": 16, "latent_dim": 4}
    rebuilt = Wider(**model.hparams())
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    assert Wider().hparams() == {"width": 48}

    class Positional(DensityModel):
        def __init__(self, *sizes: int):
            super().__init__()

    with pytest.raises(NotImplementedError, match=r"\*args parameters: override hparams"):
        Positional(1, 2).hparams()
