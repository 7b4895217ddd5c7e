"""Small models, corpora and an in-process reference shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source
from gradood.features import extract_features
from gradood.models.checkpoint import save_checkpoint
from gradood.models.glow import Glow
from gradood.seeding import draw_noise
from gradood.stats.detector import LogGaussianDetector, TypicalityTest

TINY_GLOW = {"in_channels": 1, "image_size": 28, "num_levels": 2, "num_steps": 1, "hidden_channels": 8}


def tiny_glow_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Glow with ActNorm initialised on real FashionMNIST rows."""
    torch.manual_seed(seed)
    model = Glow(**TINY_GLOW)
    train, _ = load_fashion_mnist("train")
    x = torch.from_numpy(train[:64].astype(np.float32))[:, None]
    model.init_from_data(x, draw_noise(model.noise_spec(), [f"init{i}" for i in range(len(x))], seed))
    with torch.no_grad():  # the zero-initialised output convolutions would make the model trivial
        for p in model.parameters():
            if not p.any():
                p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(model, directory, {"note": "test model, not trained"})
    return directory


def write_png_folder(directory: Path, n_id: int = 12, n_ood: int = 6, corrupt: bool = True) -> Path:
    """FashionMNIST test rows (from index 5000 on) plus inverted ones, and optionally a corrupt file."""
    test, _ = load_fashion_mnist("test")
    (directory / "fashion_mnist").mkdir(parents=True, exist_ok=True)
    (directory / "fashion_mnist_inverted").mkdir(parents=True, exist_ok=True)
    for i in range(n_id):
        Image.fromarray(test[5000 + i]).save(directory / "fashion_mnist" / f"test-{5000 + i:05d}.png")
    for i in range(n_ood):
        Image.fromarray(255 - test[6000 + i]).save(
            directory / "fashion_mnist_inverted" / f"test-{6000 + i:05d}.png"
        )
    if corrupt:
        (directory / "fashion_mnist" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return directory


def reference_scores(
    checkpoint_model: Glow, fit_uri: str, fit_size: int, corpus_uri: str, seed: int, group_size: int = 1
) -> dict[str, dict[str, float]]:
    """The whole method in-process with the per-sample loop: {id: {ood_score, typicality, log_prob}}."""
    model = checkpoint_model
    converter = ImageConverter(model.image_mode, model.input_shape[1:])

    def features(uri: str, limit: int | None):
        rows = load_all(open_source(uri, limit=limit), converter)
        x = torch.from_numpy(rows.images).float()
        groups = torch.from_numpy(np.asarray(rows.indices) // group_size)
        groups = torch.unique(groups, return_inverse=True)[1]
        res = extract_features(
            model, x, draw_noise(model.noise_spec(), rows.ids, seed), groups, method="loop"
        )
        g = groups.numpy()
        log_prob = np.bincount(g, weights=res.log_prob) / np.bincount(g)
        first = [rows.ids[int(np.flatnonzero(g == k)[0])] for k in range(g.max() + 1)]
        return first, log_prob, res.sqnorms, res.layer_names

    _, fit_lp, fit_sq, names = features(fit_uri, fit_size)
    det = LogGaussianDetector().fit(fit_sq, names)
    typ = TypicalityTest().fit(fit_lp)
    ids, lp, sq, _ = features(corpus_uri, None)
    s, t = det.ood_score(sq), typ.ood_score(lp)
    return {i: {"ood_score": s[k], "typicality": t[k], "log_prob": lp[k]} for k, i in enumerate(ids)}
