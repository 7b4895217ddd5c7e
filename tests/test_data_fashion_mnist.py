import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets.mnist import read_label_file

from gradood.data import fashion_mnist as fm
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source

DEBIAN_PRESENT = all((fm.DEBIAN_DIR / f"{p}-images-idx3-ubyte.gz").is_file() for p in ("train", "t10k"))
needs_debian = pytest.mark.skipif(not DEBIAN_PRESENT, reason="dataset-fashion-mnist not installed")

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fake_mnist(raw_dir: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """torchvision's raw layout (extracted IDX files), random content; returns the arrays per split."""
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = rng.integers(0, 256, (sizes[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, sizes[split], dtype=np.uint8)
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    array = (np.random.default_rng(1).standard_normal((3, 4, 5)) * 50).astype(dtype)
    out = fm.read_idx(write_idx(tmp_path / "x.idx", array, compress))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((2, 3), np.uint8)).read_bytes()
    cases = {
        "magic": b"\x01\x02" + good[2:],
        "type code": good[:2] + b"\x07" + good[3:],
        "needs 6 data bytes": good[:-1],
        "header": good[:6],
        "gzip": gzip.compress(good)[:20],
        "empty": b"",
    }
    for reason, raw in cases.items():
        (tmp_path / "bad").write_bytes(raw)
        with pytest.raises(ValueError, match=reason):
            fm.read_idx(tmp_path / "bad")


@needs_debian
def test_debian_fashion_mnist(tmp_path):
    train_x, train_y = fm.load_fashion_mnist("train")
    test_x, test_y = fm.load_fashion_mnist("test")
    assert train_x.shape == (60000, 28, 28) and train_y.shape == (60000,)
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert train_x.dtype == np.uint8 and test_y.dtype == np.uint8
    # torchvision's own IDX parser as the reference
    raw = tmp_path / "labels"
    raw.write_bytes(gzip.decompress((fm.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(test_y, read_label_file(str(raw)).numpy())
    # cached per process, and read-only so no caller can corrupt the cache
    assert fm.load_fashion_mnist("test")[0] is test_x
    with pytest.raises(ValueError):
        test_x[0, 0, 0] = 1
    assert fm.fashion_mnist_origin() == f"debian:{fm.DEBIAN_DIR}"


def test_torchvision_fallback_and_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    empty = tmp_path / "empty"
    assert fm.fashion_mnist_origin(str(empty)) == "missing"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("test", root=str(empty))
    with pytest.raises(SystemExit, match="download"):
        fm.main(["--root", str(empty)])

    arrays = write_fake_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", {"train": 7, "test": 5})
    images, labels = fm.load_fashion_mnist("test", root=str(tmp_path / "tv"))
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    assert fm.fashion_mnist_origin(str(tmp_path / "tv")) == f"torchvision:{tmp_path / 'tv'}"

    source = open_source(f"torchvision://FashionMNIST?split=train&root={tmp_path / 'tv'}", start=2, limit=3)
    loaded = load_all(source, ImageConverter("L", (28, 28)))
    assert loaded.ids == ["FashionMNIST:train:2", "FashionMNIST:train:3", "FashionMNIST:train:4"]
    np.testing.assert_array_equal(loaded.images[:, 0], arrays["train"][0][2:5])


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation")


@needs_debian
def test_cli_reports_source(capsys):
    fm.main([])
    out = capsys.readouterr().out
    assert "train: 60000 images" in out and f"debian:{fm.DEBIAN_DIR}" in out


@needs_debian
def test_torchvision_source_fashion_mnist():
    source = open_source("torchvision://FashionMNIST?split=test", start=9990)
    assert source.num_rows() == 10
    loaded = load_all(source, ImageConverter("L", (28, 28)))
    assert loaded.ids == [f"FashionMNIST:test:{i}" for i in range(9990, 10000)]
    np.testing.assert_array_equal(loaded.row_index, np.arange(9990, 10000))
    np.testing.assert_array_equal(loaded.images[:, 0], fm.load_fashion_mnist("test")[0][9990:])
    assert source.describe()["origin"].startswith("debian:")


def test_torchvision_source_generic_dataset(tmp_path):
    arrays = write_fake_mnist(tmp_path / "MNIST" / "raw", {"train": 6, "test": 4})
    source = open_source(f"torchvision://MNIST?split=test&root={tmp_path}&download=false")
    loaded = load_all(source, ImageConverter("RGB", (28, 28)))
    assert loaded.ids == [f"MNIST:test:{i}" for i in range(4)]
    expected = np.repeat(arrays["test"][0][:, None], 3, axis=1)
    np.testing.assert_array_equal(loaded.images, expected)
    with pytest.raises(FileNotFoundError, match="download=true"):
        open_source(f"torchvision://MNIST?root={tmp_path / 'nothing'}").num_rows()


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("torchvision://NoSuchSet?split=test", "no dataset 'NoSuchSet'"),
        ("torchvision://FashionMNIST?split=val", "split must be"),
        ("torchvision://FashionMNIST?fold=1", "unknown query keys"),
        ("torchvision://FashionMNIST?download=maybe", "download"),
    ],
)
def test_torchvision_uri_errors(uri, match):
    with pytest.raises(ValueError, match=match):
        open_source(uri)
    with pytest.raises(ValueError, match="Parquet"):
        open_source("torchvision://FashionMNIST", image_column="image")
