"""The demo corpus the default job scores: held-out FashionMNIST beside three kinds of OOD images.

Everything is written as PNG files through PIL, so the demo takes the same list/read/decode path as a
real corpus, and two broken files (a truncated PNG and an empty one) exercise the error path. The
FashionMNIST rows come from the test split after the first ``id_start`` rows, which the detector is
fitted on, so in-distribution demo images are never fit images.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from gradood.data.fashion_mnist import fashion_mnist_origin, load_fashion_mnist

DEMO_ID_SOURCE = "fashion_mnist"
DEMO_OOD_SOURCES = ("digits", "fashion_mnist_inverted", "uniform_noise")
DEMO_CORRUPT_SOURCE = "corrupt"
MANIFEST_FILE = "manifest.json"
# bump when the generated content changes, so corpora built by older code are rebuilt
_FORMAT_VERSION = 1


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _digits(n: int) -> np.ndarray:
    """n scikit-learn digits (8x8, ink 0..16, cycled) as uint8 28x28 images, bright strokes on black."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, never downloaded; slow import

    digits = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    return np.stack(
        [
            np.asarray(Image.fromarray(digits[i % len(digits)]).resize((28, 28), Image.Resampling.BILINEAR))
            for i in range(n)
        ]
    )


def build_demo_corpus(
    out_dir: str | Path, rows_per_source: int = 500, seed: int = 0, id_start: int = 5000
) -> dict:
    """Write the demo corpus under ``out_dir`` unless one with the same parameters is there; its manifest.

    Rebuilding (other parameters) replaces the corpus's own subfolders, so no files of an earlier,
    larger build linger. The manifest is written last: an interrupted build is redone on the next call.
    """
    out_dir = Path(out_dir)
    params = {
        "rows_per_source": rows_per_source,
        "seed": seed,
        "id_start": id_start,
        "version": _FORMAT_VERSION,
    }
    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params:
            return manifest

    n = rows_per_source
    test_images, _ = load_fashion_mnist("test")
    if n < 1 or id_start < 0 or id_start + 2 * n > len(test_images):
        raise ValueError(
            f"need 1 <= rows_per_source and id_start + 2 * rows_per_source <= {len(test_images)} "
            f"(FashionMNIST test rows), got rows_per_source={n}, id_start={id_start}"
        )
    noise = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    sources = {
        DEMO_ID_SOURCE: {f"test-{i:05d}.png": test_images[i] for i in range(id_start, id_start + n)},
        "digits": {f"digit-{i:04d}.png": image for i, image in enumerate(_digits(n))},
        "fashion_mnist_inverted": {
            f"test-{i:05d}.png": 255 - test_images[i] for i in range(id_start + n, id_start + 2 * n)
        },
        "uniform_noise": {f"noise-{i:04d}.png": image for i, image in enumerate(noise)},
    }
    real_png = _png(test_images[id_start])
    corrupt = {"truncated.png": real_png[: len(real_png) // 2], "empty.png": b""}

    manifest_path.unlink(missing_ok=True)
    for name in (*sources, DEMO_CORRUPT_SOURCE):
        shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / name).mkdir(parents=True)
    for name, images in sources.items():
        for file_name, image in images.items():
            (out_dir / name / file_name).write_bytes(_png(image))
    for file_name, raw in corrupt.items():
        (out_dir / DEMO_CORRUPT_SOURCE / file_name).write_bytes(raw)

    manifest = {
        "params": params,
        "counts": {
            **{name: len(images) for name, images in sources.items()},
            DEMO_CORRUPT_SOURCE: len(corrupt),
        },
        "id_source": DEMO_ID_SOURCE,
        "ood_sources": list(DEMO_OOD_SOURCES),
        "fashion_mnist_origin": fashion_mnist_origin(),
    }
    partial = manifest_path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.replace(manifest_path)
    return manifest


def demo_source_of(row_id: str) -> str:
    """The demo source (folder name) of a row id, file path or URI."""
    path = urlsplit(row_id).path if "://" in row_id else row_id
    source = PurePosixPath(path).parent.name
    if not source:
        raise ValueError(f"{row_id!r} is not inside a demo source folder")
    return source
