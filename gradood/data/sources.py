"""Corpus sources: a deterministic, shardable order of raw rows behind a URI.

Local paths and pyarrow filesystem URIs (s3://, gs://, file://, hdfs://) take one code path through
``pyarrow.fs.FileSystem.from_uri``, so what the tests exercise locally is what runs against a bucket.
Sources are shipped to Ray actors: filesystem handles, listings and datasets are built lazily and left
out of the pickled state. A row that cannot be read or decoded becomes an error entry, never an
exception, so one bad file cannot take the good files of its shard down with it.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from gradood.data.fashion_mnist import TORCHVISION_ROOT, fashion_mnist_origin, load_fashion_mnist
from gradood.data.images import ImageConverter, ImageDecodeError, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PARQUET_EXTENSION = ".parquet"
TORCHVISION_SCHEME = "torchvision"


@dataclass(frozen=True)
class RawRow:
    """One undecoded row; ``index`` is its position in the source's full deterministic order."""

    id: str
    index: int
    payload: bytes | np.ndarray | Image.Image | None
    error: str | None = None


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_start + num_rows)`` (numbered like :attr:`RawRow.index`).

    ``locator`` is whatever the source needs to read them without re-listing (file paths, Parquet
    pieces, an index range); it stays small so shards travel cheaply to workers.
    """

    index: int
    row_start: int
    num_rows: int
    locator: tuple


class CorpusSource(ABC):
    """A corpus in a fixed order; ``start``/``limit`` select a contiguous range of that order."""

    kind: str = ""

    def __init__(self, uri: str, start: int = 0, limit: int | None = None):
        if start < 0 or (limit is not None and limit < 0):
            raise ValueError(f"start and limit must be non-negative, got start={start}, limit={limit}")
        self.uri = uri
        self.start = start
        self.limit = limit
        self._cache: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        # filesystem handles (with their credentials), listings and datasets are rebuilt where needed
        return {**self.__dict__, "_cache": {}}

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @abstractmethod
    def _total_rows(self) -> int:
        """Rows in the whole source, before start/limit."""

    @abstractmethod
    def _locate(self, row_start: int, row_stop: int) -> tuple:
        """The :attr:`Shard.locator` of rows ``[row_start, row_stop)`` of the full order."""

    @abstractmethod
    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        """Exactly ``shard.num_rows`` rows, in order; unreadable ones carry ``error`` instead of raising."""

    def num_rows(self) -> int:
        total = self._total_rows()
        if self.start > total:
            raise ValueError(f"{self.uri}: start={self.start} is past the end of its {total} rows")
        stop = total if self.limit is None else min(total, self.start + self.limit)
        return stop - self.start

    def shards(self, shard_size: int, align: int = 1) -> list[Shard]:
        """Consecutive shards of at most ``shard_size`` rows whose boundaries are multiples of ``align``.

        Boundaries count in the full order (like :attr:`RawRow.index`), so the groups consumers form as
        ``index // align`` never straddle two shards. With ``start`` a multiple of ``align`` (the usual
        case) every shard but the last holds a multiple of ``align`` rows; otherwise the first shard
        ends at the first boundary. ``shard_size`` is rounded down to a multiple of ``align``.
        """
        if shard_size < 1 or align < 1:
            raise ValueError(f"shard_size and align must be positive, got {shard_size} and {align}")
        size = max(align, shard_size // align * align)
        stop = self.start + self.num_rows()
        shards: list[Shard] = []
        row_start = self.start
        while row_start < stop:
            row_stop = min(stop, (row_start + size) // align * align)
            shards.append(
                Shard(len(shards), row_start, row_stop - row_start, self._locate(row_start, row_stop))
            )
            row_start = row_stop
        return shards

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "uri": self.uri,
            "start": self.start,
            "limit": self.limit,
            "num_rows": self.num_rows(),
        }


# ---------------------------------------------------------------------------------------------
# files on a pyarrow filesystem


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def _list_files(uri: str) -> list[str]:
    """Every non-hidden file at or under ``uri``, sorted by path.

    Hidden entries (a path component starting with ".") are skipped: macOS writes "._name.png"
    resource forks and notebooks ".ipynb_checkpoints" folders that are not corpus images.
    """
    fs, root = _resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        return [root]
    selector = pafs.FileSelector(root, recursive=True)
    files = []
    for entry in fs.get_file_info(selector):
        relative = entry.path[len(root) :].lstrip("/")
        if entry.type == pafs.FileType.File and not any(part.startswith(".") for part in relative.split("/")):
            files.append(entry.path)
    return sorted(files)


def _file_uri(uri: str, fs: pafs.FileSystem, path: str) -> str:
    """A file's id: its absolute path on the local filesystem, else a URI keeping the source's scheme."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    parsed = urlsplit(uri)
    # s3/gs paths start with the bucket; hdfs-like paths are absolute and need the host back
    authority = parsed.netloc if path.startswith("/") else ""
    return f"{parsed.scheme}://{authority}{path}"


class _FileSource(CorpusSource):
    """Shared by folder and Parquet sources: a lazily opened filesystem and a filtered file listing."""

    def __init__(self, uri: str, start: int = 0, limit: int | None = None, files: list[str] | None = None):
        super().__init__(uri, start, limit)
        if files is not None:
            self._cache["listing"] = self._select(files)

    @abstractmethod
    def _select(self, files: list[str]) -> list[str]:
        """The files of this source's kind among ``files``; raises ValueError when there are none."""

    @property
    def _fs(self) -> pafs.FileSystem:
        return self._cached("fs", lambda: _resolve(self.uri)[0])

    def _listing(self) -> list[str]:
        return self._cached("listing", lambda: self._select(_list_files(self.uri)))

    def _id_of(self, path: str) -> str:
        return _file_uri(self.uri, self._fs, path)


class FolderSource(_FileSource):
    """Image files (png, jpg, jpeg, bmp, webp; any case) at or under a path, sorted; id = file URI."""

    kind = "folder"

    def _select(self, files: list[str]) -> list[str]:
        images = [path for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise ValueError(f"no images under {self.uri} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return images

    def _total_rows(self) -> int:
        return len(self._listing())

    def _locate(self, row_start: int, row_stop: int) -> tuple:
        return tuple(self._listing()[row_start:row_stop])

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        for index, path in enumerate(shard.locator, start=shard.row_start):
            try:
                with self._fs.open_input_stream(path) as stream:
                    payload = stream.read()
            except OSError as err:
                yield RawRow(self._id_of(path), index, None, f"cannot read file: {err}")
                continue
            yield RawRow(self._id_of(path), index, payload)


# ---------------------------------------------------------------------------------------------
# Parquet


def _is_binary(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype)


def _is_image_field(field: pa.Field) -> bool:
    """A binary column, or a struct with a binary ``bytes`` field (how Hugging Face datasets store images)."""
    dtype = field.type
    if pa.types.is_struct(dtype):
        return dtype.get_field_index("bytes") >= 0 and _is_binary(dtype.field("bytes").type)
    return _is_binary(dtype)


def _image_column(schema: pa.Schema, name: str | None, where: str) -> str:
    columns = ", ".join(f"{field.name}: {field.type}" for field in schema)
    if name is not None:
        if name not in schema.names or not _is_image_field(schema.field(name)):
            raise ValueError(
                f"{where}: image_column {name!r} is not a binary or struct<bytes: binary> column; "
                f"columns are [{columns}]"
            )
        return name
    candidates = [field.name for field in schema if _is_image_field(field)]
    if len(candidates) != 1:
        raise ValueError(
            f"{where}: cannot pick the image column, {len(candidates)} candidates {candidates} among "
            f"[{columns}]; set image_column"
        )
    return candidates[0]


class ParquetSource(_FileSource):
    """Rows of a Parquet file or a folder of them (sorted); id = f"{file_uri}#{row within the file}"."""

    kind = "parquet"

    def __init__(
        self,
        uri: str,
        image_column: str | None = None,
        start: int = 0,
        limit: int | None = None,
        files: list[str] | None = None,
    ):
        super().__init__(uri, start, limit, files)
        # resolved once here, so workers read the column without re-detecting it
        self.image_column = _image_column(self._schema(self._listing()[0]), image_column, uri)

    def _select(self, files: list[str]) -> list[str]:
        tables = [path for path in files if path.lower().endswith(PARQUET_EXTENSION)]
        if not tables:
            raise ValueError(f"no {PARQUET_EXTENSION} files under {self.uri}")
        return tables

    def _schema(self, path: str) -> pa.Schema:
        with self._fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).schema_arrow

    def _row_counts(self) -> list[int]:
        def count() -> list[int]:
            counts = []
            for path in self._listing():
                with self._fs.open_input_file(path) as handle:
                    parquet = pq.ParquetFile(handle)
                    _image_column(parquet.schema_arrow, self.image_column, self._id_of(path))
                    counts.append(parquet.metadata.num_rows)
            return counts

        return self._cached("row_counts", count)

    def _total_rows(self) -> int:
        return sum(self._row_counts())

    def _locate(self, row_start: int, row_stop: int) -> tuple:
        pieces = []
        offset = 0
        for path, count in zip(self._listing(), self._row_counts(), strict=True):
            lo, hi = max(row_start, offset), min(row_stop, offset + count)
            if lo < hi:
                pieces.append((path, lo - offset, hi - offset))
            offset += count
        return tuple(pieces)

    def describe(self) -> dict:
        return {**super().describe(), "image_column": self.image_column, "files": len(self._listing())}

    def _read_piece(self, path: str, lo: int, hi: int) -> Iterator[Any]:
        """Payloads of rows [lo, hi) of one file, reading only the image column of the row groups needed."""
        with self._fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            is_struct = pa.types.is_struct(parquet.schema_arrow.field(self.image_column).type)
            column = f"{self.image_column}.bytes" if is_struct else self.image_column
            offset = 0
            for group in range(parquet.metadata.num_row_groups):
                count = parquet.metadata.row_group(group).num_rows
                first, stop = max(lo, offset), min(hi, offset + count)
                if first < stop:
                    values = parquet.read_row_group(group, columns=[column]).column(0)
                    values = values.slice(first - offset, stop - first).combine_chunks()
                    # flatten (unlike .field) keeps the struct's own nulls
                    yield from (values.flatten()[0] if is_struct else values).to_pylist()
                offset += count

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        index = shard.row_start
        for path, lo, hi in shard.locator:
            file_uri = self._id_of(path)
            row = lo
            reason = "file has fewer rows than when it was listed"
            try:
                for payload in self._read_piece(path, lo, hi):
                    error = None if payload is not None else f"null in column {self.image_column!r}"
                    yield RawRow(f"{file_uri}#{row}", index, payload, error)
                    row, index = row + 1, index + 1
            except (OSError, pa.ArrowException) as err:
                reason = f"cannot read Parquet rows: {err}"
            for missing in range(row, hi):
                yield RawRow(f"{file_uri}#{missing}", index, None, reason)
                index += 1


# ---------------------------------------------------------------------------------------------
# torchvision datasets


def _parse_bool(value: str, key: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{key}={value!r}: expected true or false")
    return lowered in ("true", "1", "yes")


class TorchvisionSource(CorpusSource):
    """``torchvision://Name?split=train|test&root=DIR&download=false``; id = f"{Name}:{split}:{index}".

    FashionMNIST goes through :func:`load_fashion_mnist` (Debian files first); other datasets are
    constructed from ``torchvision.datasets`` with ``train=`` or ``split=``, whichever they take, or
    ``background=`` (Omniglot: train is its background set, the one meant for training, test its
    evaluation set).
    """

    kind = "torchvision"

    def __init__(self, uri: str, start: int = 0, limit: int | None = None):
        super().__init__(uri, start, limit)
        parsed = urlsplit(uri)
        if parsed.scheme != TORCHVISION_SCHEME or not parsed.netloc or parsed.path not in ("", "/"):
            raise ValueError(f"expected torchvision://Name?split=train|test, got {uri!r}")
        query = {key: values[-1] for key, values in parse_qs(parsed.query, keep_blank_values=True).items()}
        unknown = set(query) - {"split", "root", "download"}
        if unknown:
            raise ValueError(f"{uri}: unknown query keys {sorted(unknown)} (known: split, root, download)")
        self.name = parsed.netloc
        self.split = query.get("split", "train")
        if self.split not in ("train", "test"):
            raise ValueError(f"{uri}: split must be train or test, got {self.split!r}")
        self.root = query.get("root") or None
        self.download = _parse_bool(query.get("download", "false"), "download")
        if self.name != "FashionMNIST":
            self._split_kwargs()

    def _split_kwargs(self) -> dict[str, Any]:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self.name, None)
        if not (inspect.isclass(cls) and issubclass(cls, torchvision.datasets.VisionDataset)):
            raise ValueError(f"{self.uri}: torchvision.datasets has no dataset {self.name!r}")
        parameters = inspect.signature(cls).parameters
        if "train" in parameters:
            return {"train": self.split == "train"}
        if "split" in parameters:
            return {"split": self.split}
        if "background" in parameters:
            return {"background": self.split == "train"}
        raise ValueError(f"{self.uri}: {self.name} takes none of train=, split=, background=")

    def _dataset(self) -> Any:
        def build() -> Any:
            if self.name == "FashionMNIST":
                return load_fashion_mnist(self.split, root=self.root, download=self.download)[0]
            import torchvision.datasets

            root = self.root or str(TORCHVISION_ROOT)
            try:
                return getattr(torchvision.datasets, self.name)(
                    root, download=self.download, **self._split_kwargs()
                )
            except RuntimeError as err:  # torchvision's "Dataset not found ... use download=True"
                raise FileNotFoundError(f"{self.uri}: {err} (add &download=true to the URI)") from err

        return self._cached("dataset", build)

    def _total_rows(self) -> int:
        return len(self._dataset())

    def _locate(self, row_start: int, row_stop: int) -> tuple:
        return (row_start, row_stop)

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        dataset = self._dataset()
        for index in range(*shard.locator):
            row_id = f"{self.name}:{self.split}:{index}"
            if isinstance(dataset, np.ndarray):
                yield RawRow(row_id, index, dataset[index])
                continue
            try:
                image = dataset[index][0]
            except (OSError, ValueError) as err:
                yield RawRow(row_id, index, None, f"cannot read dataset item: {err}")
                continue
            yield RawRow(row_id, index, image if isinstance(image, Image.Image) else np.asarray(image))

    def describe(self) -> dict:
        origin = (
            fashion_mnist_origin(self.root)
            if self.name == "FashionMNIST"
            else self.root or str(TORCHVISION_ROOT)
        )
        return {**super().describe(), "dataset": self.name, "split": self.split, "origin": origin}


# ---------------------------------------------------------------------------------------------


def open_source(
    uri: str, image_column: str | None = None, start: int = 0, limit: int | None = None
) -> CorpusSource:
    """The source behind ``uri``: torchvision://..., a Parquet file or folder, or a folder of images."""
    if urlsplit(uri).scheme == TORCHVISION_SCHEME:
        if image_column is not None:
            raise ValueError("image_column applies to Parquet sources only")
        return TorchvisionSource(uri, start, limit)
    files = _list_files(uri)
    has_parquet = any(path.lower().endswith(PARQUET_EXTENSION) for path in files)
    has_images = any(path.lower().endswith(IMAGE_EXTENSIONS) for path in files)
    if has_parquet and has_images:
        raise ValueError(f"{uri} holds both Parquet files and image files; point at one or the other")
    if has_parquet:
        return ParquetSource(uri, image_column, start, limit, files=files)
    if image_column is not None:
        raise ValueError(f"image_column applies to Parquet sources only, {uri} has no .parquet files")
    return FolderSource(uri, start, limit, files=files)


@dataclass
class LoadedRows:
    """Decoded rows (``images`` uint8 ``[N, C, H, W]``) and the rows that failed, as (id, index, reason)."""

    ids: list[str]
    indices: np.ndarray
    images: np.ndarray
    errors: list[tuple[str, int, str]]


def _convert(payload: Any, converter: ImageConverter) -> np.ndarray:
    if payload is None:
        raise ImageDecodeError("no image data")
    if isinstance(payload, bytes | bytearray | memoryview):
        payload = decode_image(bytes(payload))
    try:
        return converter(payload)
    except (ValueError, OSError) as err:
        raise ImageDecodeError(f"cannot convert image: {err}") from err


def _collect(rows: Iterable[RawRow], converter: ImageConverter, expected: int, where: str) -> LoadedRows:
    ids, indices, images, errors = [], [], [], []
    for row in rows:
        if row.error is not None:
            errors.append((row.id, row.index, row.error))
            continue
        try:
            images.append(_convert(row.payload, converter))
        except ImageDecodeError as err:
            errors.append((row.id, row.index, str(err)))
            continue
        ids.append(row.id)
        indices.append(row.index)
    if len(ids) + len(errors) != expected:
        raise RuntimeError(f"{where}: got {len(ids)} rows + {len(errors)} errors, expected {expected} rows")
    stacked = np.stack(images) if images else np.empty((0, *converter.shape), dtype=np.uint8)
    return LoadedRows(ids, np.asarray(indices, dtype=np.int64), stacked, errors)


def load_rows(source: CorpusSource, shard: Shard, converter: ImageConverter) -> LoadedRows:
    """Decode and convert one shard; every row ends up in ``ids`` or in ``errors``."""
    return _collect(source.read_shard(shard), converter, shard.num_rows, f"{source.uri} shard {shard.index}")


def load_all(source: CorpusSource, converter: ImageConverter) -> LoadedRows:
    """Every selected row of ``source`` in order (training sets, fit sets, tests)."""
    shards = source.shards(max(1, source.num_rows()))
    rows = chain.from_iterable(source.read_shard(shard) for shard in shards)
    return _collect(rows, converter, source.num_rows(), source.uri)
