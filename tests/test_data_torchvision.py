"""torchvision:// URIs of datasets other than FashionMNIST, on tiny copies the tests write themselves.

Each writer lays a dataset out the way torchvision 0.29 reads it from disk and returns, per split, the
images in the order the dataset indexes them. Where torchvision checks the md5 of its files against
the published archives, the test points that check at the md5 of the files it wrote (monkeypatching
the class attribute for the test only): the check still runs, and nothing is ever downloaded.
"""

import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets as tvd
from PIL import Image
from test_data_fashion_mnist import write_fake_mnist

from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source

L28 = ImageConverter("L", (28, 28))
SIZES = {"train": 5, "test": 3}
Writer = Callable[[Path, pytest.MonkeyPatch], dict[str, list[np.ndarray]]]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def rgb_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_mnist_like(name: str) -> Writer:
    """MNIST and its drop-ins: extracted IDX files under root/<Name>/raw/ (checked for existence only)."""

    def write(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
        arrays = write_fake_mnist(root / name / "raw", SIZES, seed=len(name))
        return {split: list(images) for split, (images, _) in arrays.items()}

    return write


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
    """cifar-10-batches-py: pickled batches of rows of 3072 bytes (R plane, G plane, B plane)."""
    folder = root / tvd.CIFAR10.base_folder
    folder.mkdir(parents=True)
    batches = {name: "train" for name, _ in tvd.CIFAR10.train_list}
    batches.update({name: "test" for name, _ in tvd.CIFAR10.test_list})
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    per_batch = {"train": SIZES["train"] // len(tvd.CIFAR10.train_list), "test": SIZES["test"]}
    for seed, (batch, split) in enumerate(batches.items()):
        hwc = rgb_images(per_batch[split], seed)
        entry = {"data": hwc.transpose(0, 3, 1, 2).reshape(len(hwc), -1), "labels": [seed % 10] * len(hwc)}
        (folder / batch).write_bytes(pickle.dumps(entry))
        images[split].extend(hwc)
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / tvd.CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta))
    for attribute in ("train_list", "test_list"):
        listed = [[name, md5(folder / name)] for name, _ in getattr(tvd.CIFAR10, attribute)]
        monkeypatch.setattr(tvd.CIFAR10, attribute, listed)
    monkeypatch.setattr(
        tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5(folder / tvd.CIFAR10.meta["filename"])}
    )
    return images


def write_svhn(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
    """<split>_32x32.mat with X [32, 32, 3, N] and labels y [N, 1] in 1..10 (10 is the digit 0)."""
    root.mkdir(parents=True)
    split_list = dict(tvd.SVHN.split_list)
    images = {}
    for seed, (split, n) in enumerate(SIZES.items()):
        hwc = rgb_images(n, 10 + seed)
        url, file_name, _ = split_list[split]
        labels = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]
        scipy.io.savemat(root / file_name, {"X": hwc.transpose(1, 2, 3, 0), "y": labels})
        split_list[split] = [url, file_name, md5(root / file_name)]
        images[split] = list(hwc)
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    return images


def write_omniglot(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
    """omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png, bilevel 105x105 black
    strokes on white, beside the zip whose md5 torchvision checks before reading the extracted folder.
    """
    base = root / tvd.Omniglot.folder
    rng = np.random.default_rng(20)
    zips_md5, images = {}, {}
    for split, target in (("train", "images_background"), ("test", "images_evaluation")):
        written = {}
        for k in range(SIZES[split]):
            path = base / target / f"Alphabet_{k % 2}" / f"character{k // 2 + 1:02d}" / f"{k:04d}_01.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            white = rng.random((105, 105)) < 0.8
            Image.fromarray(white).save(path)  # mode "1", like the real files
            written[path] = white.astype(np.uint8) * 255
        with zipfile.ZipFile(base / f"{target}.zip", "w") as archive:
            for path in written:
                archive.write(path, path.relative_to(base).as_posix())
        zips_md5[target] = md5(base / f"{target}.zip")
        # Omniglot indexes alphabets, characters and files in os.listdir order, which is not sorted
        target_dir = base / target
        order = [
            target_dir / alphabet / character / name
            for alphabet in os.listdir(target_dir)
            for character in os.listdir(target_dir / alphabet)
            for name in os.listdir(target_dir / alphabet / character)
        ]
        images[split] = [written[path] for path in order]
    monkeypatch.setattr(tvd.Omniglot, "zips_md5", zips_md5)
    return images


WRITERS: dict[str, Writer] = {
    "MNIST": write_mnist_like("MNIST"),
    "KMNIST": write_mnist_like("KMNIST"),
    "CIFAR10": write_cifar10,
    "SVHN": write_svhn,
    "Omniglot": write_omniglot,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_dataset_by_uri(tmp_path, monkeypatch, name):
    root = tmp_path / "data"
    written = WRITERS[name](root, monkeypatch)
    assert {split: len(images) for split, images in written.items()} == SIZES
    for split, start, limit in (("test", 0, None), ("train", 1, 3)):
        source = open_source(
            f"torchvision://{name}?split={split}&root={root}&download=false", start=start, limit=limit
        )
        stop = len(written[split]) if limit is None else start + limit
        assert source.num_rows() == stop - start
        assert source.describe()["origin"] == str(root)
        loaded = load_all(source, L28)
        assert loaded.errors == []
        assert loaded.ids == [f"{name}:{split}:{i}" for i in range(start, stop)]
        np.testing.assert_array_equal(loaded.row_index, np.arange(start, stop))
        expected = np.stack([L28(image) for image in written[split][start:stop]])
        assert loaded.images.shape == (stop - start, 1, 28, 28)
        np.testing.assert_array_equal(loaded.images, expected)


@pytest.mark.parametrize("name", list(WRITERS))
def test_missing_dataset_asks_for_download(tmp_path, name):
    source = open_source(f"torchvision://{name}?split=test&root={tmp_path / 'nothing'}")
    with pytest.raises(FileNotFoundError, match="download=true"):
        source.num_rows()
    assert list((tmp_path / "nothing").rglob("*")) == []  # nothing fetched


@pytest.mark.parametrize(
    ("name", "checked_file"),
    [
        ("CIFAR10", "cifar-10-batches-py/test_batch"),
        ("SVHN", "test_32x32.mat"),
        ("Omniglot", "omniglot-py/images_evaluation.zip"),
    ],
)
def test_md5_checks_stay_live(tmp_path, monkeypatch, name, checked_file):
    """The writers swap in the md5 of the files they wrote; they do not switch the check off."""
    root = tmp_path / "data"
    WRITERS[name](root, monkeypatch)
    with open(root / checked_file, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(FileNotFoundError, match="corrupted"):
        open_source(f"torchvision://{name}?split=test&root={root}").num_rows()
