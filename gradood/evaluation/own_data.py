"""The evaluation corpus from a user's own images: their in-distribution images, their OOD examples, or,
when they have none, OOD sets derived from the in-distribution images (said to be synthetic).

Every source becomes a folder of PNG files under the corpus, named after the source, so the grid's
machinery (one score-corpus run per family, a row's source = its folder) measures a team's own data the
way it measures the public one.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from gradood.config import EvaluateConfig
from gradood.data.sources import open_source
from gradood.seeding import row_seed

#: the folder (and source name) of the user's in-distribution rows
OWN_ID_SOURCE = "in_distribution"


def _inverted(image: Image.Image, seed: int, name: str) -> Image.Image:
    return ImageOps.invert(image)


def _noise(image: Image.Image, seed: int, name: str) -> Image.Image:
    rng = np.random.default_rng(row_seed(seed, name, "synthetic-noise"))
    shape = (image.height, image.width) + ((len(image.getbands()),) if image.mode != "L" else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), image.mode)


def _blurred(image: Image.Image, seed: int, name: str) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(image.size) / 16)))


def _vflip(image: Image.Image, seed: int, name: str) -> Image.Image:
    return ImageOps.flip(image)


def _hflip(image: Image.Image, seed: int, name: str) -> Image.Image:
    return ImageOps.mirror(image)


#: synthetic OOD sets derived from the in-distribution images: name -> (far-OOD, transform); far sets
#: change what an image is (its intensities, or all of it), near ones keep most of it
SYNTHETIC: dict[str, tuple[bool, Callable[[Image.Image, int, str], Image.Image]]] = {
    "synthetic_inverted": (True, _inverted),
    "synthetic_noise": (True, _noise),
    "synthetic_blur": (False, _blurred),
    "synthetic_vflip": (False, _vflip),
    "synthetic_hflip": (False, _hflip),
}


def export_as_pngs(uri: str, folder: Path, limit: int) -> None:
    """The first ``limit`` rows of any corpus URI as PNG files, so they join the evaluation corpus."""
    marker = folder / ".exported.json"
    params = {"uri": uri, "limit": limit}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    shutil.rmtree(folder, ignore_errors=True)
    source = open_source(uri, limit=limit)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in source.shards(max(1, source.num_rows())):
        for row in source.read_shard(shard):
            if row.error is not None:
                raise ValueError(f"{uri}: row {row.row_index} cannot be read: {row.error}")
            payload = row.payload
            if isinstance(payload, bytes):  # a file's or a Parquet cell's encoded image
                image = Image.open(io.BytesIO(payload))
                image.seek(0)
            else:
                image = payload if isinstance(payload, Image.Image) else Image.fromarray(np.asarray(payload))
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            image.save(folder / f"{row.row_index:06d}.png")
    marker.write_text(json.dumps(params))


def build_own_corpus(cfg: EvaluateConfig, out: str) -> tuple[str, dict[str, bool]]:
    """The corpus of ``evaluate.id_uri`` (``id_rows`` rows) and ``evaluate.ood`` (``rows_per_source``
    rows of each), or of synthetic OOD sets derived from the first ``rows_per_source`` in-distribution
    images when ``evaluate.ood`` is empty; and each OOD source's far/near flag."""
    ev = cfg.evaluate
    corpus = Path(out) / "own_corpus"
    id_folder = corpus / OWN_ID_SOURCE
    export_as_pngs(str(ev.id_uri), id_folder, ev.id_rows)
    for stale in corpus.glob("synthetic_*"):
        shutil.rmtree(stale)
    far = {}
    for name, uri in ev.ood.items():
        if name == OWN_ID_SOURCE or name.startswith("synthetic_"):
            raise ValueError(f"evaluate.ood: {name!r} is a name the evaluation uses itself; choose another")
        export_as_pngs(uri, corpus / name, ev.rows_per_source)
        far[name] = True
    if not ev.ood:
        originals = sorted(id_folder.glob("*.png"))[: ev.rows_per_source]
        for name, (is_far, transform) in SYNTHETIC.items():
            (corpus / name).mkdir(parents=True)
            for path in originals:
                with Image.open(path) as image:
                    transform(image.copy(), cfg.seed, path.name).save(corpus / name / path.name)
            far[name] = is_far
    return str(corpus), far
