"""Image corpora of held-out FashionMNIST beside OOD images: the demo the default job scores, and more.

Every source is an entry of a small registry (name, near/far-OOD flag, description, builder), so the
demo and larger evaluation corpora are built by the same :func:`build_image_corpus`. Everything is
written as PNG files through PIL, so a corpus takes the same list/read/decode path as a real one, and
two broken files (a truncated PNG and an empty one) can exercise the error path. Files are written
through :mod:`gradood.core.storage`, so the corpus may live on a local path or under a pyarrow
filesystem URI (``s3://``, ``gs://``), like the job's other outputs. FashionMNIST rows come
from the test split after the first ``id_start`` rows, which the detector is fitted on, so
in-distribution corpus images are never fit images; each FashionMNIST-derived source reads its own
block of rows, so no test image appears twice in one corpus.
"""

from __future__ import annotations

import io
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gradood.core import storage
from gradood.data.fashion_mnist import fashion_mnist_origin, load_fashion_mnist

DEMO_ID_SOURCE = "fashion_mnist"
DEMO_OOD_SOURCES = ("digits", "fashion_mnist_inverted", "uniform_noise")
DEMO_CORRUPT_SOURCE = "corrupt"
MANIFEST_FILE = "manifest.json"
# bump when the generated content changes, so corpora built by older code are rebuilt
_FORMAT_VERSION = 1

#: (n, seed, FashionMNIST test images, first test row the source may use) -> uint8 [n, 28, 28];
#: a source may use rows [first_row, first_row + n), sources without a row block ignore both
Builder = Callable[[int, int, np.ndarray, int], np.ndarray]

# fixed per-source offsets to ``seed``, so sources draw independent streams; noise keeps offset 0,
# the stream the demo has always used
_NOISE_SEED = 0
_GLYPH_SEED = 1_000_003
_PHOTO_SEED = 2_000_003

GLYPH_CHARACTERS = string.ascii_letters + string.digits
# faces shipped in matplotlib's mpl-data/fonts/ttf; listed, not globbed, so a matplotlib release that
# adds a face does not change the glyphs drawn for a seed
GLYPH_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)


@dataclass(frozen=True)
class _Source:
    """A registry entry; ``row_block`` k means FashionMNIST test rows [id_start + k*n, id_start + (k+1)*n)."""

    name: str
    far_ood: bool | None  # None: the in-distribution source
    description: str
    build: Builder
    row_block: int | None = None
    file_prefix: str = ""  # files of sources without a row block; row sources name files by test row

    def file_names(self, n: int, first_row: int) -> list[str]:
        if self.row_block is not None:
            return [f"test-{first_row + k:05d}.png" for k in range(n)]
        return [f"{self.file_prefix}-{k:04d}.png" for k in range(n)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _held_out(transform: Callable[[np.ndarray], np.ndarray]) -> Builder:
    """A builder applying ``transform`` to the n test rows from ``first_row`` on."""

    def build(n: int, seed: int, test_images: np.ndarray, first_row: int) -> np.ndarray:
        return np.ascontiguousarray(transform(test_images[first_row : first_row + n]), dtype=np.uint8)

    return build


def _generated(make: Callable[[int, int], np.ndarray]) -> Builder:
    """A builder of images made from (n, seed) alone, without FashionMNIST rows."""
    return lambda n, seed, test_images, first_row: make(n, seed)


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


def _uniform_noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + _NOISE_SEED).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@cache
def _font(file_name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib  # only for the fonts it bundles; slow import

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the DejaVu fonts bundled with matplotlib are missing")
    return ImageFont.truetype(str(path), size)


def _glyphs(n: int, seed: int) -> np.ndarray:
    """Letters and digits in DejaVu faces, white on black, at random size, offset and small rotation.

    Bright strokes on black, FashionMNIST's polarity, but no garment shape: far-OOD that a detector must
    flag by content, not by an inverted background.
    """
    rng = np.random.default_rng(seed + _GLYPH_SEED)
    images = []
    for _ in range(n):
        char = GLYPH_CHARACTERS[rng.integers(len(GLYPH_CHARACTERS))]
        font = _font(GLYPH_FONTS[rng.integers(len(GLYPH_FONTS))], int(rng.integers(14, 25)))
        dx, dy = rng.integers(-3, 4, size=2)
        canvas = Image.new("L", (28, 28), 0)
        ImageDraw.Draw(canvas).text((14 + int(dx), 14 + int(dy)), char, fill=255, font=font, anchor="mm")
        angle = float(rng.uniform(-15.0, 15.0))
        images.append(np.asarray(canvas.rotate(angle, resample=Image.Resampling.BILINEAR)))
    return np.stack(images)


def _photo_patches(n: int, seed: int) -> np.ndarray:
    """Random square crops (32..160 px) of scikit-learn's two sample photos, grayscale, resized to 28x28.

    Natural-image texture, no black background: the far end of far-OOD for a FashionMNIST model.
    """
    from sklearn.datasets import load_sample_images  # bundled with scikit-learn, never downloaded

    photos = [Image.fromarray(photo).convert("L") for photo in load_sample_images().images]
    rng = np.random.default_rng(seed + _PHOTO_SEED)
    images = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(32, 161))
        left, top = int(rng.integers(photo.width - side + 1)), int(rng.integers(photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        images.append(np.asarray(crop.resize((28, 28), Image.Resampling.BILINEAR)))
    return np.stack(images)


_SOURCES = {
    source.name: source
    for source in (
        _Source(DEMO_ID_SOURCE, None, "held-out FashionMNIST test rows", _held_out(lambda r: r), row_block=0),
        _Source(
            "digits",
            True,
            "scikit-learn 8x8 digits upscaled to 28x28",
            _generated(lambda n, _: _digits(n)),
            file_prefix="digit",
        ),
        _Source(
            "fashion_mnist_inverted",
            True,
            "held-out FashionMNIST rows with inverted intensities (dark garments on white)",
            _held_out(lambda r: 255 - r),
            row_block=1,
        ),
        _Source(
            "uniform_noise",
            True,
            "i.i.d. uniform 0..255 pixels",
            _generated(_uniform_noise),
            file_prefix="noise",
        ),
        _Source(
            "fashion_mnist_vflip",
            False,
            "held-out FashionMNIST rows flipped upside down",
            _held_out(lambda r: r[:, ::-1, :]),
            row_block=2,
        ),
        _Source(
            "fashion_mnist_hflip",
            False,
            "held-out FashionMNIST rows mirrored left-right (many garments are nearly symmetric)",
            _held_out(lambda r: r[:, :, ::-1]),
            row_block=3,
        ),
        _Source(
            "glyphs",
            True,
            "letters and digits rendered in DejaVu fonts, white on black",
            _generated(_glyphs),
            file_prefix="glyph",
        ),
        _Source(
            "photo_patches",
            True,
            "grayscale crops of scikit-learn's sample photos",
            _generated(_photo_patches),
            file_prefix="photo",
        ),
    )
}

#: every OOD source, the demo's first: what an evaluation corpus beside DEMO_ID_SOURCE holds
EVALUATION_OOD_SOURCES = tuple(name for name, source in _SOURCES.items() if source.far_ood is not None)


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise ValueError(f"unknown image source {name!r}; known: {', '.join(_SOURCES)}")
    return _SOURCES[name]


def source_info(name: str) -> dict:
    """``{"name", "far_ood", "description"}`` of a source; far_ood is None for the in-distribution one."""
    source = _source(name)
    return {"name": source.name, "far_ood": source.far_ood, "description": source.description}


def build_image_corpus(
    out_dir: str | Path,
    sources: Sequence[str],
    rows_per_source: int,
    seed: int = 0,
    id_start: int = 5000,
    include_corrupt: bool = False,
    id_rows: int | None = None,
) -> dict:
    """Write ``rows_per_source`` PNGs per source under ``out_dir/<source>/``; the corpus's manifest.

    ``out_dir`` is a local path or a pyarrow filesystem URI (``s3://bucket/prefix``).

    ``id_rows`` (default ``rows_per_source``) sets the in-distribution source's count apart, so a corpus can
    be what a night is, mostly in-distribution; the FashionMNIST-derived OOD sources read the test rows
    after the in-distribution block. ``include_corrupt`` adds a ``corrupt`` folder (the corpus's first PNG
    cut in half, and an empty file) for the error path. Nothing is written when a corpus with the same
    parameters is there. Rebuilding replaces every folder a registry source (or the corrupt files) would
    use, so neither files of an earlier, larger build nor folders of sources no longer selected linger.
    The manifest is written last: an interrupted build is redone on the next call.
    """
    selected = [_source(name) for name in sources]
    names = [source.name for source in selected]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"sources must be a non-empty list of distinct names, got {names}")
    n = rows_per_source
    n_id = n if id_rows is None else id_rows
    if n < 1 or n_id < 1 or id_start < 0:
        raise ValueError(
            f"need rows_per_source >= 1, id_rows >= 1 and id_start >= 0, got {n}, {n_id} and {id_start}"
        )
    out = storage.absolute(str(out_dir))
    params = {
        "sources": names,
        "rows_per_source": n,
        "seed": seed,
        "id_start": id_start,
        "id_rows": n_id,
        "include_corrupt": include_corrupt,
        "version": _FORMAT_VERSION,
    }
    manifest_uri = storage.join(out, MANIFEST_FILE)
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        if manifest.get("params") == params:
            return manifest

    blocks = max((s.row_block + 1 for s in selected if s.row_block is not None), default=0)
    test_images = load_fashion_mnist("test")[0] if blocks else np.empty((0, 28, 28), np.uint8)
    end = id_start + n_id + (blocks - 1) * n
    if blocks and end > len(test_images):
        raise ValueError(
            f"sources {names} need FashionMNIST test rows [{id_start}, {end}) (id_rows {n_id}, then "
            f"rows_per_source {n} per derived source), but the test split has {len(test_images)} rows"
        )
    folders: dict[str, dict[str, bytes]] = {}
    for source in selected:
        block = source.row_block or 0
        first_row = id_start + (0 if block == 0 else n_id + (block - 1) * n)
        rows = n_id if source.far_ood is None else n
        images = source.build(rows, seed, test_images, first_row)
        folders[source.name] = {
            file_name: _png(image)
            for file_name, image in zip(source.file_names(rows, first_row), images, strict=True)
        }
    if include_corrupt:
        real_png = next(iter(folders[names[0]].values()))
        folders[DEMO_CORRUPT_SOURCE] = {"truncated.png": real_png[: len(real_png) // 2], "empty.png": b""}

    if storage.exists(manifest_uri):
        storage.delete_file(manifest_uri)
    for name in (*_SOURCES, DEMO_CORRUPT_SOURCE):
        storage.delete_dir(storage.join(out, name))
    for name, folder in folders.items():
        for file_name, raw in folder.items():
            storage.write_bytes(storage.join(out, name, file_name), raw)

    manifest = {
        "params": params,
        "counts": {name: len(folder) for name, folder in folders.items()},
        "id_source": next((s.name for s in selected if s.far_ood is None), None),
        "ood_sources": [s.name for s in selected if s.far_ood is not None],
        "sources": {name: source_info(name) for name in names},
        "fashion_mnist_origin": fashion_mnist_origin(),
    }
    # atomic (a temporary name and a move, or one object), key order kept
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_demo_corpus(
    out_dir: str | Path,
    rows_per_source: int = 50,
    seed: int = 0,
    id_start: int = 5000,
    id_rows: int = 2000,
) -> dict:
    """The demo corpus, a night as a lake has them: ``id_rows`` held-out FashionMNIST images and
    ``rows_per_source`` of each demo OOD source (a few % each), plus two corrupt files; its manifest."""
    return build_image_corpus(
        out_dir,
        (DEMO_ID_SOURCE, *DEMO_OOD_SOURCES),
        rows_per_source,
        seed,
        id_start,
        include_corrupt=True,
        id_rows=id_rows,
    )


def demo_source_of(row_id: str) -> str:
    """The demo source (folder name) of a row id, file path or URI."""
    path = urlsplit(row_id).path if "://" in row_id else row_id
    source = PurePosixPath(path).parent.name
    if not source:
        raise ValueError(f"{row_id!r} is not inside a demo source folder")
    return source
