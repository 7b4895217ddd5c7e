"""FashionMNIST from the Debian package (``dataset-fashion-mnist``) or, failing that, torchvision.

The Debian files need no network and no write access, so they win when present. Arrays are cached per
process and returned read-only: the training set, the fit set and the demo corpus all read them, and a
caller mutating the cached copy would silently change every later read.
"""

from __future__ import annotations

import argparse
import gzip
import zlib
from functools import cache
from math import prod
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_ROOT = Path.home() / ".cache" / "gradood" / "torchvision"
SPLITS = {"train": "train", "test": "t10k"}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into an array of its declared dtype and shape."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        found = len(raw) - header
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} data bytes, file has {found}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _file_names(split: str) -> tuple[str, str]:
    if split not in SPLITS:
        raise ValueError(f"FashionMNIST split must be one of {sorted(SPLITS)}, got {split!r}")
    prefix = SPLITS[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _debian_available() -> bool:
    return all((DEBIAN_DIR / f"{name}.gz").is_file() for split in SPLITS for name in _file_names(split))


def _torchvision_available(root: Path) -> bool:
    # the same check torchvision's MNIST._check_exists does: extracted files under ROOT/FashionMNIST/raw
    raw = root / "FashionMNIST" / "raw"
    return all((raw / name).is_file() for split in SPLITS for name in _file_names(split))


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.flags.writeable = False
    return arrays


@cache
def _load_debian(split: str) -> tuple[np.ndarray, ...]:
    images, labels = (read_idx(DEBIAN_DIR / f"{name}.gz") for name in _file_names(split))
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{DEBIAN_DIR}: unexpected FashionMNIST shapes {images.shape}, {labels.shape}")
    return _frozen(images.astype(np.uint8, copy=False), labels.astype(np.uint8, copy=False))


@cache
def _load_torchvision(split: str, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    from torchvision.datasets import FashionMNIST

    dataset = FashionMNIST(str(root), train=split == "train", download=download)
    images, labels = dataset.data.numpy(), dataset.targets.numpy()
    return _frozen(images.astype(np.uint8, copy=False), labels.astype(np.uint8))


def load_fashion_mnist(
    split: str, root: str | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 ``[N, 28, 28]``, labels uint8 ``[N]``) of the train or test split; read-only arrays.

    Downloads (through torchvision, into ``root`` or ~/.cache/gradood/torchvision) only when
    ``download`` is set and neither the Debian files nor an earlier torchvision copy exist.
    """
    _file_names(split)
    if _debian_available():
        return _load_debian(split)
    tv_root = Path(root).expanduser().absolute() if root else TORCHVISION_ROOT
    if not download and not _torchvision_available(tv_root):
        raise FileNotFoundError(
            f"FashionMNIST not found in {DEBIAN_DIR} nor under {tv_root}: run "
            "`apt-get install dataset-fashion-mnist`, or pass download=True "
            "(`python -m gradood.data.fashion_mnist --download`)"
        )
    return _load_torchvision(split, tv_root, download)


def fashion_mnist_origin(root: str | None = None) -> str:
    """Where :func:`load_fashion_mnist` reads from (no download): debian:DIR, torchvision:ROOT or missing."""
    if _debian_available():
        return f"debian:{DEBIAN_DIR}"
    tv_root = Path(root).expanduser().absolute() if root else TORCHVISION_ROOT
    return f"torchvision:{tv_root}" if _torchvision_available(tv_root) else "missing"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make FashionMNIST available to gradood.")
    parser.add_argument("--download", action="store_true", help="download with torchvision if not installed")
    parser.add_argument("--root", default=None, help=f"torchvision root (default {TORCHVISION_ROOT})")
    args = parser.parse_args(argv)
    try:
        for split in SPLITS:
            images, _ = load_fashion_mnist(split, root=args.root, download=args.download)
            print(f"{split}: {images.shape[0]} images")
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err
    print(f"FashionMNIST source: {fashion_mnist_origin(args.root)}")


if __name__ == "__main__":
    main()
