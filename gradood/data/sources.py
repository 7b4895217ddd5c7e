"""Corpus sources: a deterministic, shardable order of raw rows behind a URI.

Local paths and pyarrow filesystem URIs (s3://, gs://, file://, hdfs://) take one code path through
``pyarrow.fs.FileSystem.from_uri``, so what the tests exercise locally is what runs against a bucket.
Sources are shipped to Ray actors: filesystem handles, listings and datasets are built lazily and left
out of the pickled state.

Every entry found under a file source's URI is accounted for, in one of three ways:
- an input row that decodes;
- an input row that becomes an error entry with the reason, never an exception, so one bad file cannot
  take the good files of its shard down with it: a file with an image extension whose content is not a
  readable image (empty, truncated, HTML saved as .jpg ...), a file or Parquet cell over ``max_bytes``,
  an image over ``max_pixels``, a Parquet file whose footer cannot be read (one row, id = the file URI),
  Parquet rows of a row group that cannot be read;
- a skipped entry, counted by reason in :meth:`CorpusSource.skipped` (see :mod:`gradood.data.listing`):
  hidden files and folders, other extensions, broken symlinks, symlink loops, FIFOs and sockets. These
  are not inputs a user expects scored, so they do not enter the row order.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from gradood.data.base import DEFAULT_MAX_BYTES, CorpusSource, RawRow, Shard
from gradood.data.fashion_mnist import TORCHVISION_ROOT, fashion_mnist_origin, load_fashion_mnist
from gradood.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageConverter,
    ImageDecodeError,
    check_pixels,
    decode_image,
)
from gradood.data.listing import Listing, list_files, resolve
from gradood.data.parquet import (
    PARQUET_EXTENSION,
    Footer,
    read_footer,
    read_payloads,
    resolve_image_column,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
TORCHVISION_SCHEME = "torchvision"
#: files whose size and modification time are asked for at once
_INFO_CHUNK = 10_000
#: Parquet footers read at once while planning (I/O bound: threads, not processes)
FOOTER_READERS = 16
#: rows an unreadable Parquet file (no footer, so no row count) takes in the order: one, for its error
_UNREADABLE_FILE_ROWS = 1


# ---------------------------------------------------------------------------------------------
# files on a pyarrow filesystem


def file_id(uri: str, fs: pafs.FileSystem, path: str) -> str:
    """A file's id: its absolute path on the local filesystem, else a URI keeping the source's scheme."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    parsed = urlsplit(uri)
    # s3/gs paths start with the bucket; hdfs-like paths are absolute and need the host back
    authority = parsed.netloc if path.startswith("/") else ""
    return f"{parsed.scheme}://{authority}{path}"


class _FileSource(CorpusSource):
    """Shared by folder and Parquet sources: a lazily opened filesystem and a listing of their files.

    A subclass names the extensions it reads (``what`` they hold, for messages); the listing's other
    files are counted as skipped under ``skip_reason``.
    """

    extensions: ClassVar[tuple[str, ...]]
    what: ClassVar[str]
    skip_reason: ClassVar[str]

    def __init__(
        self,
        uri: str,
        start: int = 0,
        limit: int | None = None,
        listing: Listing | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        super().__init__(uri, start, limit, max_pixels, max_bytes)
        if listing is not None:
            self._cache["scan"] = self._select(listing)

    def _select(self, listing: Listing) -> Listing:
        selected = listing.keep(self.extensions, self.skip_reason)
        if not selected.files:
            raise ValueError(f"no {self.what} under {self.uri} (looked for {', '.join(self.extensions)})")
        return selected

    @property
    def _fs(self) -> pafs.FileSystem:
        return self._cached("fs", lambda: resolve(self.uri)[0])

    def _scan(self) -> Listing:
        """The one listing pass: this source's files and what it skipped."""
        return self._cached("scan", lambda: self._select(list_files(self.uri)))

    def _listing(self) -> list[str]:
        """The input files in order (a separate key, so a copy can be narrowed to some of the files)."""
        return self._cached("listing", lambda: list(self._scan().files))

    def skipped(self) -> dict[str, int]:
        return dict(self._scan().skipped)

    def input_files(self) -> pa.Table:
        paths = self._listing()
        chunks = []
        for lo in range(0, len(paths), _INFO_CHUNK):  # in chunks: FileInfo objects are large
            part = paths[lo : lo + _INFO_CHUNK]
            infos = self._fs.get_file_info(part)
            chunks.append(
                pa.table(
                    {
                        "uri": pa.array([self._id_of(p) for p in part], pa.string()),
                        "size": pa.array([int(i.size or 0) for i in infos], pa.int64()),
                        "mtime_ns": pa.array([int(i.mtime_ns or 0) for i in infos], pa.int64()),
                    }
                )
            )
        schema = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])
        return pa.concat_tables(chunks) if chunks else schema.empty_table()

    def with_files(self, uris: list[str]) -> _FileSource:
        keep = set(uris)
        narrowed = copy.copy(self)
        # what was derived from the full listing (row offsets) is rebuilt from the narrowed one
        narrowed._cache = {k: v for k, v in self._cache.items() if k != "offsets"}
        narrowed._cache["listing"] = [p for p in self._listing() if self._id_of(p) in keep]
        return narrowed

    def _id_of(self, path: str) -> str:
        return file_id(self.uri, self._fs, path)


class FolderSource(_FileSource):
    """Image files (png, jpg, jpeg, bmp, webp, tif, tiff, gif; any case) at or under a path, sorted.

    id = file URI. A file with an image extension is an input whatever its content: if it cannot be
    read or decoded it is an error row, because it is a file the user expects scored.
    """

    kind = "folder"
    reads_rows_alone = True
    extensions = IMAGE_EXTENSIONS
    what = "images"
    skip_reason = "not an image file extension"

    def total_rows(self) -> int:
        return len(self._listing())

    def _locate(self, first_row: int, end_row: int) -> tuple:
        return tuple(self._listing()[first_row:end_row])

    def row_ids(self, first_row: int, end_row: int) -> list[str]:
        return [self._id_of(path) for path in self._listing()[first_row:end_row]]

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        return self._read_files(((path, self._id_of(path)) for path in shard.locator), shard.first_row)

    def _read_files(self, files: Iterable[tuple[str, str]], first_row: int) -> Iterator[RawRow]:
        """One row per (path, id), numbered from ``first_row``."""
        for row_index, (path, row_id) in enumerate(files, start=first_row):
            try:
                with self._fs.open_input_file(path) as handle:
                    # checked before reading, so an oversized file is never loaded
                    error = self._oversize(handle.size(), "file")
                    payload = None if error else handle.read()
            except OSError as err:
                payload, error = None, f"cannot read file: {err}"
            yield RawRow(row_id, row_index, payload, error)


class ParquetSource(_FileSource):
    """Rows of a Parquet file or a folder of them (sorted); id = f"{file_uri}#{row within the file}".

    A file whose footer cannot be read (truncated, empty, not Parquet) has no row count; it takes one
    row of the order, an error row with id = the file URI, so that ``scored + rejected = inputs`` still
    holds and every other file keeps its ids and row indices. Construction reads every footer (the
    image column must be resolved and checked on the driver) and fails only when none is readable.
    """

    kind = "parquet"
    extensions = (PARQUET_EXTENSION,)
    what = f"{PARQUET_EXTENSION} files"
    skip_reason = f"not a {PARQUET_EXTENSION} file"

    def __init__(
        self,
        uri: str,
        image_column: str | None = None,
        start: int = 0,
        limit: int | None = None,
        listing: Listing | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        super().__init__(uri, start, limit, listing, max_pixels, max_bytes)
        readable = [
            (path, footer.schema)
            for path, footer in zip(self._listing(), self._footers(), strict=True)
            if footer.schema is not None
        ]
        if not readable:
            first = self._id_of(self._listing()[0])
            raise ValueError(
                f"{uri}: none of its {len(self._listing())} Parquet files is readable ({first}: "
                f"{self._footers()[0].error})"
            )
        # resolved once here, so workers read the column without re-detecting it
        self.image_column = resolve_image_column(readable[0][1], image_column, uri)
        for path, schema in readable[1:]:
            resolve_image_column(schema, self.image_column, self._id_of(path))

    def _footers(self) -> list[Footer]:
        """Every file's footer, read once, several at a time (on an object store each is a round trip)."""

        known: dict[str, Footer] = self._cached("footers", dict)  # by path, so a narrowed copy keeps them
        missing = [path for path in self._listing() if path not in known]
        if missing:
            with ThreadPoolExecutor(max_workers=min(FOOTER_READERS, len(missing))) as pool:
                footers = list(pool.map(lambda path: read_footer(self._fs, path), missing))
            known.update(zip(missing, footers, strict=True))
        return [known[path] for path in self._listing()]

    def _row_counts(self) -> list[int]:
        return [_UNREADABLE_FILE_ROWS if footer.error else footer.num_rows for footer in self._footers()]

    def _file_offsets(self) -> np.ndarray:
        """Row of the full order where each file starts, and the total at the end."""
        return self._cached("offsets", lambda: np.concatenate([[0], np.cumsum(self._row_counts())]))

    def total_rows(self) -> int:
        return int(self._file_offsets()[-1])

    def _locate(self, first_row: int, end_row: int) -> tuple:
        """(path, first row, stop row, footer error or None) per file in ``[first_row, end_row)``."""
        offsets = self._file_offsets()
        paths, footers = self._listing(), self._footers()
        first = int(np.searchsorted(offsets, first_row, side="right")) - 1
        pieces = []
        for f in range(max(first, 0), len(paths)):
            lo, hi = max(first_row, int(offsets[f])), min(end_row, int(offsets[f + 1]))
            if int(offsets[f]) >= end_row:
                break
            if lo < hi:
                pieces.append((paths[f], lo - int(offsets[f]), hi - int(offsets[f]), footers[f].error))
        return tuple(pieces)

    def row_ids(self, first_row: int, end_row: int) -> list[str]:
        ids = []
        for path, lo, hi, footer_error in self._locate(first_row, end_row):
            file_uri = self._id_of(path)
            ids += [file_uri] if footer_error is not None else [f"{file_uri}#{row}" for row in range(lo, hi)]
        return ids

    def describe(self) -> dict:
        return {
            **super().describe(),
            "image_column": self.image_column,
            "files": len(self._listing()),
            "unreadable_files": sum(footer.error is not None for footer in self._footers()),
        }

    def _row_error(self, payload: bytes | None) -> str | None:
        if payload is None:
            return f"null in column {self.image_column!r}"
        return self._oversize(len(payload), "row")

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        row_index = shard.first_row
        for path, lo, hi, footer_error in shard.locator:
            file_uri = self._id_of(path)
            if footer_error is not None:
                yield RawRow(file_uri, row_index, None, footer_error)
                row_index += 1
                continue
            row = lo
            reason = "file has fewer rows than when it was listed"
            try:
                for payload, error in read_payloads(self._fs, path, self.image_column, lo, hi):
                    yield RawRow(f"{file_uri}#{row}", row_index, payload, error or self._row_error(payload))
                    row, row_index = row + 1, row_index + 1
            except (OSError, pa.ArrowException) as err:
                reason = f"cannot read Parquet rows: {err}"
            for missing in range(row, hi):
                yield RawRow(f"{file_uri}#{missing}", row_index, None, reason)
                row_index += 1


# ---------------------------------------------------------------------------------------------
# torchvision datasets


def _parse_bool(value: str, key: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{key}={value!r}: expected true or false")
    return lowered in ("true", "1", "yes")


class TorchvisionSource(CorpusSource):
    """``torchvision://Name?split=train|test&root=DIR&download=false``; id = f"{Name}:{split}:{row_index}".

    FashionMNIST goes through :func:`load_fashion_mnist` (Debian files first); other datasets are
    constructed from ``torchvision.datasets`` with ``train=`` or ``split=``, whichever they take, or
    ``background=`` (Omniglot: train is its background set, the one meant for training, test its
    evaluation set).
    """

    kind = "torchvision"

    def __init__(
        self,
        uri: str,
        start: int = 0,
        limit: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        super().__init__(uri, start, limit, max_pixels, max_bytes)
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

    def total_rows(self) -> int:
        return len(self._dataset())

    def _locate(self, first_row: int, end_row: int) -> tuple:
        return (first_row, end_row)

    def _row_id(self, row_index: int) -> str:
        return f"{self.name}:{self.split}:{row_index}"

    def row_ids(self, first_row: int, end_row: int) -> list[str]:
        return [self._row_id(i) for i in range(first_row, end_row)]

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        dataset = self._dataset()
        for row_index in range(*shard.locator):
            row_id = self._row_id(row_index)
            if isinstance(dataset, np.ndarray):
                yield RawRow(row_id, row_index, dataset[row_index])
                continue
            try:
                image = dataset[row_index][0]
            except (OSError, ValueError) as err:
                yield RawRow(row_id, row_index, None, f"cannot read dataset item: {err}")
                continue
            yield RawRow(row_id, row_index, image if isinstance(image, Image.Image) else np.asarray(image))

    def describe(self) -> dict:
        origin = (
            fashion_mnist_origin(self.root)
            if self.name == "FashionMNIST"
            else self.root or str(TORCHVISION_ROOT)
        )
        return {**super().describe(), "dataset": self.name, "split": self.split, "origin": origin}


# ---------------------------------------------------------------------------------------------


def open_source(
    uri: str,
    image_column: str | None = None,
    start: int = 0,
    limit: int | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> CorpusSource:
    """The source behind ``uri``: torchvision://..., a Parquet file or folder, or a folder of images.

    A folder is listed once here; the source keeps that listing (and its skipped counts).
    """
    limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
    if urlsplit(uri).scheme == TORCHVISION_SCHEME:
        if image_column is not None:
            raise ValueError("image_column applies to Parquet sources only")
        return TorchvisionSource(uri, start, limit, **limits)
    listing = list_files(uri)
    has_parquet = any(path.lower().endswith(PARQUET_EXTENSION) for path in listing.files)
    has_images = any(path.lower().endswith(IMAGE_EXTENSIONS) for path in listing.files)
    if has_parquet and has_images:
        raise ValueError(f"{uri} holds both Parquet files and image files; point at one or the other")
    if has_parquet:
        return ParquetSource(uri, image_column, start, limit, listing, **limits)
    if image_column is not None:
        raise ValueError(f"image_column applies to Parquet sources only, {uri} has no .parquet files")
    return FolderSource(uri, start, limit, listing, **limits)


@dataclass
class LoadedRows:
    """Decoded rows (``images`` uint8 ``[N, C, H, W]``) and the failed rows as (id, row_index, reason)."""

    ids: list[str]
    row_index: np.ndarray
    images: np.ndarray
    errors: list[tuple[str, int, str]]


def _convert(payload: Any, converter: ImageConverter, max_pixels: int | None) -> np.ndarray:
    """Decoded arrays (in-memory datasets) go straight to the converter, which checks their shape."""
    if payload is None:
        raise ImageDecodeError("no image data")
    if isinstance(payload, bytes | bytearray | memoryview):
        payload = decode_image(bytes(payload), max_pixels)
    elif isinstance(payload, Image.Image):
        check_pixels(payload.width, payload.height, max_pixels)
    try:
        return converter(payload)
    except (ValueError, OSError) as err:
        raise ImageDecodeError(f"cannot convert image: {err}") from err


def _collect(
    rows: Iterable[RawRow], converter: ImageConverter, expected: int, where: str, max_pixels: int | None
) -> LoadedRows:
    ids, row_index, images, errors = [], [], [], []
    for row in rows:
        if row.error is not None:
            errors.append((row.id, row.row_index, row.error))
            continue
        try:
            images.append(_convert(row.payload, converter, max_pixels))
        except ImageDecodeError as err:
            errors.append((row.id, row.row_index, str(err)))
            continue
        ids.append(row.id)
        row_index.append(row.row_index)
    if len(ids) + len(errors) != expected:
        raise RuntimeError(f"{where}: got {len(ids)} rows + {len(errors)} errors, expected {expected} rows")
    stacked = np.stack(images) if images else np.empty((0, *converter.shape), dtype=np.uint8)
    return LoadedRows(ids, np.asarray(row_index, dtype=np.int64), stacked, errors)


def load_rows(source: CorpusSource, shard: Shard, converter: ImageConverter) -> LoadedRows:
    """Decode and convert one shard; every row ends up in ``ids`` or in ``errors``."""
    where = f"{source.uri} shard {shard.number}"
    return _collect(source.read_shard(shard), converter, shard.num_rows, where, source.max_pixels)


def load_row(source: CorpusSource, row_index: int, converter: ImageConverter) -> LoadedRows:
    """Decode and convert row ``row_index`` of the full order on its own (in ``ids`` or in ``errors``)."""
    return _collect(
        iter([source.read_row(row_index)]), converter, 1, f"{source.uri} row {row_index}", source.max_pixels
    )


def load_all(source: CorpusSource, converter: ImageConverter) -> LoadedRows:
    """Every selected row of ``source`` in order (training sets, fit sets, tests)."""
    shards = source.shards(max(1, source.num_rows()))
    rows = chain.from_iterable(source.read_shard(shard) for shard in shards)
    return _collect(rows, converter, source.num_rows(), source.uri, source.max_pixels)
