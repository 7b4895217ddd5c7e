from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradood.data.demo import (
    DEMO_ID_SOURCE,
    DEMO_OOD_SOURCES,
    EVALUATION_OOD_SOURCES,
    build_image_corpus,
    demo_source_of,
    source_info,
)
from gradood.data.fashion_mnist import fashion_mnist_origin, load_fashion_mnist
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source

needs_fashion_mnist = pytest.mark.skipif(fashion_mnist_origin() == "missing", reason="FashionMNIST missing")
NEW_SOURCES = ("fashion_mnist_vflip", "fashion_mnist_hflip", "glyphs", "photo_patches")
RANDOM_SOURCES = ("uniform_noise", "glyphs", "photo_patches")


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    """File name -> pixels of every PNG in a source folder; each must be 8-bit grayscale 28x28."""
    images = {}
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28)), path
            images[path.name] = np.asarray(image)
    return images


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_registry():
    assert EVALUATION_OOD_SOURCES[: len(DEMO_OOD_SOURCES)] == DEMO_OOD_SOURCES
    assert set(NEW_SOURCES) <= set(EVALUATION_OOD_SOURCES)
    assert DEMO_ID_SOURCE not in EVALUATION_OOD_SOURCES
    infos = {name: source_info(name) for name in (DEMO_ID_SOURCE, *EVALUATION_OOD_SOURCES)}
    assert infos[DEMO_ID_SOURCE]["far_ood"] is None
    assert {name for name, info in infos.items() if info["far_ood"] is False} == set(NEW_SOURCES[:2])
    assert infos["glyphs"]["far_ood"] is True and infos["photo_patches"]["far_ood"] is True
    for name, info in infos.items():
        assert info["name"] == name and info["description"] and "\n" not in info["description"]
    with pytest.raises(ValueError, match="unknown image source 'nope'"):
        source_info("nope")


@needs_fashion_mnist
def test_evaluation_corpus_row_blocks_and_manifest(tmp_path):
    n, id_start = 5, 100
    names = (DEMO_ID_SOURCE, *EVALUATION_OOD_SOURCES)
    manifest = build_image_corpus(tmp_path, names, rows_per_source=n, seed=3, id_start=id_start)
    assert manifest["counts"] == {name: n for name in names}  # no corrupt folder unless asked
    assert not (tmp_path / "corrupt").exists()
    assert manifest["id_source"] == DEMO_ID_SOURCE
    assert manifest["ood_sources"] == list(EVALUATION_OOD_SOURCES)
    assert manifest["sources"]["glyphs"] == source_info("glyphs")

    test_images = load_fashion_mnist("test")[0]
    # one disjoint block of n rows per FashionMNIST source, in this order after id_start
    expected = {
        DEMO_ID_SOURCE: (0, lambda rows: rows),
        "fashion_mnist_inverted": (1, lambda rows: 255 - rows),
        "fashion_mnist_vflip": (2, lambda rows: rows[:, ::-1, :]),
        "fashion_mnist_hflip": (3, lambda rows: rows[:, :, ::-1]),
    }
    for name, (block, transform) in expected.items():
        first = id_start + block * n
        images = read_folder(tmp_path / name)
        assert list(images) == [f"test-{row:05d}.png" for row in range(first, first + n)]
        np.testing.assert_array_equal(
            np.stack(list(images.values())), transform(test_images[first : first + n])
        )
    for name in names:
        assert len(read_folder(tmp_path / name)) == n

    loaded = load_all(open_source(str(tmp_path)), ImageConverter("L", (28, 28)))
    assert Counter(map(demo_source_of, loaded.ids)) == {name: n for name in names}
    assert loaded.errors == []


@needs_fashion_mnist
def test_row_blocks_do_not_depend_on_the_selection(tmp_path):
    """A source reads its own block even when the sources before it are not built."""
    manifest = build_image_corpus(tmp_path, ["fashion_mnist_hflip"], rows_per_source=2, id_start=5000)
    assert manifest["id_source"] is None and manifest["ood_sources"] == ["fashion_mnist_hflip"]
    images = read_folder(tmp_path / "fashion_mnist_hflip")
    assert list(images) == ["test-05006.png", "test-05007.png"]
    np.testing.assert_array_equal(images["test-05007.png"], load_fashion_mnist("test")[0][5007, :, ::-1])


@needs_fashion_mnist
def test_too_small_test_split(tmp_path):
    # hflip is the fourth block: id_start + 4 * n rows are needed, and the split has 10000
    build_image_corpus(tmp_path / "fits", ["fashion_mnist_hflip"], rows_per_source=1, id_start=9996)
    assert list(read_folder(tmp_path / "fits" / "fashion_mnist_hflip")) == ["test-09999.png"]
    with pytest.raises(ValueError, match=r"\[9997, 10001\) .*, but the test split has 10000 rows"):
        build_image_corpus(tmp_path / "over", ["fashion_mnist_hflip"], rows_per_source=1, id_start=9997)
    with pytest.raises(ValueError, match="but the test split has 10000 rows"):
        build_image_corpus(tmp_path / "over", [DEMO_ID_SOURCE, *NEW_SOURCES], rows_per_source=1300)
    assert not (tmp_path / "over").exists()


@needs_fashion_mnist
def test_a_night_like_corpus_has_its_own_in_distribution_count_and_no_row_twice(tmp_path):
    """id_rows sets the held-out FashionMNIST count apart; the derived sources read the rows after it."""
    names = [DEMO_ID_SOURCE, "fashion_mnist_inverted", "fashion_mnist_vflip", "fashion_mnist_hflip", "digits"]
    manifest = build_image_corpus(tmp_path, names, rows_per_source=2, id_start=5000, id_rows=3)
    assert manifest["counts"] == {DEMO_ID_SOURCE: 3, "fashion_mnist_inverted": 2, "fashion_mnist_vflip": 2,
                                  "fashion_mnist_hflip": 2, "digits": 2}  # fmt: skip
    rows = {name: list(read_folder(tmp_path / name)) for name in names[:4]}
    assert rows[DEMO_ID_SOURCE] == ["test-05000.png", "test-05001.png", "test-05002.png"]
    assert rows["fashion_mnist_inverted"] == ["test-05003.png", "test-05004.png"]
    assert rows["fashion_mnist_hflip"] == ["test-05007.png", "test-05008.png"]


@pytest.mark.parametrize(
    ("sources", "kwargs", "match"),
    [
        (["glyphs"], {"id_start": -1}, "id_start >= 0"),
        (["glyphs"], {"rows_per_source": 0}, "rows_per_source >= 1"),
        (["glyphs"], {"id_rows": 0}, "id_rows >= 1"),
        (["glyphs", "glyphs"], {}, "distinct"),
        ([], {}, "non-empty"),
        (["glyphs", "cifar"], {}, "unknown image source 'cifar'"),
    ],
)
def test_bad_arguments(tmp_path, sources, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_image_corpus(tmp_path, sources, **{"rows_per_source": 2, **kwargs})


def test_random_sources_are_deterministic_per_seed(tmp_path):
    n = 12
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        manifest = build_image_corpus(tmp_path / run, RANDOM_SOURCES, rows_per_source=n, seed=seed)
        assert manifest["counts"] == {name: n for name in RANDOM_SOURCES}
    for name in RANDOM_SOURCES:
        same, other = (folder_bytes(tmp_path / run / name) for run in ("b", "c"))
        assert folder_bytes(tmp_path / "a" / name) == same
        assert same.keys() == other.keys()
        assert sum(same[f] != other[f] for f in same) >= n - 1, name  # another seed, other images
        assert len(read_folder(tmp_path / "a" / name)) == n


def test_glyphs_are_white_strokes_on_black_and_vary(tmp_path):
    n = 60
    build_image_corpus(tmp_path, ["glyphs"], rows_per_source=n, seed=0)
    glyphs = np.stack(list(read_folder(tmp_path / "glyphs").values()))
    ink = (glyphs > 127).mean(axis=(1, 2))
    assert ink.min() > 0.01 and ink.max() < 0.5  # never blank, never a filled square
    assert (glyphs.max(axis=(1, 2)) >= 200).all()  # white ink (rotation blurs thin strokes a little)
    assert (np.median(glyphs.reshape(n, -1), axis=1) == 0).all()  # on black, like FashionMNIST
    assert len({g.tobytes() for g in glyphs}) == n
    assert len(np.unique(np.round(ink, 3))) > n // 3  # sizes, faces and characters differ


def test_photo_patches_differ(tmp_path):
    n = 30
    build_image_corpus(tmp_path, ["photo_patches"], rows_per_source=n, seed=0)
    patches = np.stack(list(read_folder(tmp_path / "photo_patches").values())).astype(np.int16)
    pairwise = np.abs(patches[:, None] - patches[None]).mean(axis=(2, 3))
    assert pairwise[~np.eye(n, dtype=bool)].min() > 1.0  # no two crops alike
    assert np.median(patches.std(axis=(1, 2))) > 5.0  # textured, not flat grey
    assert len(np.unique(patches.mean(axis=(1, 2)).round())) > n // 2


def test_rebuild_drops_folders_of_sources_no_longer_selected(tmp_path):
    build_image_corpus(tmp_path, ["glyphs", "uniform_noise"], rows_per_source=2, include_corrupt=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt",
        "glyphs",
        "manifest.json",
        "uniform_noise",
    ]
    truncated = (tmp_path / "corrupt" / "truncated.png").read_bytes()
    assert truncated == (tmp_path / "glyphs" / "glyph-0000.png").read_bytes()[: len(truncated)]

    manifest = build_image_corpus(tmp_path, ["photo_patches"], rows_per_source=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "photo_patches"]
    assert manifest["counts"] == {"photo_patches": 3} and manifest["id_source"] is None
    loaded = load_all(open_source(str(tmp_path)), ImageConverter("L", (28, 28)))
    assert Counter(map(demo_source_of, loaded.ids)) == {"photo_patches": 3}
