import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from gradood.data.demo import DEMO_ID_SOURCE, DEMO_OOD_SOURCES, _digits, build_demo_corpus, demo_source_of
from gradood.data.fashion_mnist import fashion_mnist_origin, load_fashion_mnist
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source

pytestmark = pytest.mark.skipif(fashion_mnist_origin() == "missing", reason="FashionMNIST not available")


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_build_demo_corpus(tmp_path):
    n, n_id, id_start, seed = 4, 6, 100, 7
    manifest = build_demo_corpus(tmp_path, rows_per_source=n, seed=seed, id_start=id_start, id_rows=n_id)
    assert manifest["counts"] == {DEMO_ID_SOURCE: n_id, **{s: n for s in DEMO_OOD_SOURCES}, "corrupt": 2}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    test_images = load_fashion_mnist("test")[0]
    for k in range(n_id):
        i = id_start + k
        np.testing.assert_array_equal(
            read_png(tmp_path / "fashion_mnist" / f"test-{i:05d}.png"), test_images[i]
        )
    for k in range(n):  # the inverted rows follow the in-distribution block: no test row twice
        i = id_start + n_id + k
        inverted = tmp_path / "fashion_mnist_inverted" / f"test-{i:05d}.png"
        np.testing.assert_array_equal(read_png(inverted), 255 - test_images[i].astype(int))
    noise = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    for k in range(n):
        np.testing.assert_array_equal(read_png(tmp_path / "uniform_noise" / f"noise-{k:04d}.png"), noise[k])
        digit = load_digits().images[k]
        small = Image.fromarray(np.round(digit / 16.0 * 255.0).astype(np.uint8))
        reference = np.asarray(small.resize((28, 28), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(read_png(tmp_path / "digits" / f"digit-{k:04d}.png"), reference)
        assert reference.max() > 200 and reference[0, 0] < 50  # bright strokes on black, like FashionMNIST
    assert (tmp_path / "corrupt" / "empty.png").stat().st_size == 0

    loaded = load_all(open_source(str(tmp_path)), ImageConverter("L", (28, 28)))
    assert Counter(map(demo_source_of, loaded.ids)) == {
        DEMO_ID_SOURCE: n_id,
        **{s: n for s in DEMO_OOD_SOURCES},
    }
    assert sorted(demo_source_of(e[0]) for e in loaded.errors) == ["corrupt", "corrupt"]
    assert {e[2].split(":")[0] for e in loaded.errors} == {"empty file", "cannot decode image"}


def test_demo_corpus_is_idempotent_and_rebuilds_on_new_params(tmp_path):
    build_demo_corpus(tmp_path, rows_per_source=3)
    marker = tmp_path / "digits" / "digit-0000.png"
    marker.write_bytes(b"edited")  # survives only if the second call writes nothing
    build_demo_corpus(tmp_path, rows_per_source=3)
    assert marker.read_bytes() == b"edited"

    manifest = build_demo_corpus(tmp_path, rows_per_source=2)
    assert manifest["params"]["rows_per_source"] == 2
    assert len(list((tmp_path / "digits").iterdir())) == 2  # no stale files from the larger build
    assert marker.read_bytes() != b"edited"
    with pytest.raises(ValueError, match="but the test split has 10000 rows"):
        build_demo_corpus(tmp_path / "other", rows_per_source=3001, id_start=5000)


def test_digits_cycle(tmp_path):
    digits = _digits(1799)
    np.testing.assert_array_equal(digits[1797:], digits[:2])


@pytest.mark.parametrize(
    ("row_id", "source"),
    [
        ("/data/demo_corpus/digits/digit-0001.png", "digits"),
        ("s3://bucket/demo/uniform_noise/noise-0002.png", "uniform_noise"),
        ("gs://b/x/fashion_mnist_inverted/test-05500.png", "fashion_mnist_inverted"),
        ("corrupt/empty.png", "corrupt"),
    ],
)
def test_demo_source_of(row_id, source):
    assert demo_source_of(row_id) == source


def test_demo_source_of_needs_a_folder():
    with pytest.raises(ValueError):
        demo_source_of("s3://bucket/top.png")
