"""Small models, corpora and an in-process reference shared by the pipeline tests."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradood.config import DetectConfig
from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source
from gradood.features import extract_features
from gradood.models.checkpoint import save_checkpoint
from gradood.models.glow import Glow
from gradood.pipeline.stages import SPLIT_STREAM, group_id
from gradood.seeding import draw_noise, row_uniforms
from gradood.stats import DetectorSuite, Moments, log_features, split_of

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


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def reference_scores(
    checkpoint_model: Glow,
    fit_uri: str,
    fit_size: int,
    corpus_uri: str,
    seed: int,
    group_size: int = 1,
    calibration_fraction: float = 0.8,
    part_2_fraction: float | None = 0.5,
) -> dict[str, dict[str, float]]:
    """The whole method in-process with the per-sample loop: {id: {ood_score, p_value, score:*, log_prob}}."""
    model = checkpoint_model
    converter = ImageConverter(model.image_mode, model.input_shape[1:])

    def features(uri: str, limit: int | None):
        rows = load_all(open_source(uri, limit=limit), converter)
        x = torch.from_numpy(rows.images).float()
        global_groups = np.asarray(rows.row_index) // group_size
        groups = torch.unique(torch.from_numpy(global_groups), return_inverse=True)[1]
        res = extract_features(
            model, x, draw_noise(model.noise_spec(), rows.ids, seed), groups, method="loop"
        )
        g = groups.numpy()
        log_prob = np.bincount(g, weights=res.log_prob) / np.bincount(g)
        png = [8.0 * len(_png(image[0])) for image in rows.images]  # the input's size as a PNG, in bits
        bits = np.bincount(g, weights=png) / np.bincount(g)
        first = [int(np.flatnonzero(g == k)[0]) for k in range(g.max() + 1)]
        ids = [rows.ids[i] if group_size == 1 else group_id(int(global_groups[i])) for i in first]
        matrix = np.column_stack([log_features(res.sqnorms, 1e-30), log_prob, bits])
        return ids, matrix, res.layer_names, np.bincount(g)

    fit_ids, fit_x, names, _ = features(fit_uri, fit_size)
    part = split_of(row_uniforms(seed, fit_ids, SPLIT_STREAM), calibration_fraction, part_2_fraction)
    suite = DetectorSuite(
        components=tuple(c.value for c in DetectConfig().components),  # the job's default
        calibration_fraction=calibration_fraction,
        part_2_fraction=part_2_fraction,
        combination="adaptive",
    ).fit_parts(
        Moments.from_values(fit_x[part == 0]),
        fit_x[part == 1],
        fit_x[part == 2],
        [*names, "log_prob", "complexity_bits"],
        [i for i, k in zip(fit_ids, part, strict=True) if k == 2],
    )
    ids, x, _, sizes = features(corpus_uri, None)
    # the night's adaptive test, trained on every complete row (a small night: the rate is 1)
    night = suite.adapt_to_night(suite.tails(x[sizes == group_size]), 1.0, seed)
    results = suite.score_all(x, night)
    out = {}
    for k, row_id in enumerate(ids):
        out[row_id] = {
            "ood_score": results["combined"]["score"][k],
            "p_value": results["combined"]["p_index"][k] / (suite.calibration_size("combined") + 1),
            "score:typicality": results["typicality"]["score"][k],
            "score:paper": results["paper"]["score"][k],
            "score:complexity": results["complexity"]["score"][k],
            "log_prob": x[k, -2],
        }
    return out


def stop_shared_ray() -> None:
    """For a module that needs a Ray of its own (other CPUs, or an environment its workers must
    inherit): stop the shared one; the next module that asks for ``local_ray`` starts it again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point pyarrow, boto3 and Ray's workers at a local S3 server: fixed dummy
    credentials, no instance metadata, no profile files, so nothing reaches for real AWS."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
