"""A folder corpus whose listing lives in Parquet parts instead of memory.

Listing tasks (:mod:`gradood.pipeline.plan`) walk the folder in pieces and write each piece's files as
one part (id, path, size, mtime; the run is the folder name, ``run_id=<id>``, hive style). The parts in
order are the listing, sorted by path as :func:`gradood.data.listing.list_files` sorts it, so ids and row
indices are the same as an in-memory :class:`~gradood.data.sources.FolderSource`'s. What the driver and
every shard descriptor hold is one (part, row count, digest) per part, not one path per file: a shard
names the part rows it reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradood.core import storage
from gradood.data.base import DEFAULT_MAX_BYTES, CorpusSource, RawRow, Shard
from gradood.data.images import DEFAULT_MAX_PIXELS
from gradood.data.sources import FolderSource

LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)
#: rows per row group of a part: a shard reads only the row groups its rows fall in
LISTING_ROW_GROUP = 16_384


@dataclass(frozen=True)
class ListingPart:
    """One written part: where it is, how many files it lists, and a digest of (uri, size, mtime)."""

    uri: str
    rows: int
    sha256: str


def listing_digest(table: pa.Table) -> str:
    digest = hashlib.sha256()
    for column in ("uri", "size", "mtime_ns"):
        digest.update("\n".join(map(str, table.column(column).to_pylist())).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def write_listing_part(table: pa.Table, uri: str) -> ListingPart:
    table = table.cast(LISTING_SCHEMA)
    storage.write_parquet(table, uri, row_group_size=LISTING_ROW_GROUP)
    return ListingPart(uri, table.num_rows, listing_digest(table))


def read_listing_rows(uri: str, lo: int, hi: int) -> pa.Table:
    """Rows ``[lo, hi)`` of one part (path and uri), reading only the row groups they fall in."""
    fs, path = storage.filesystem(uri)
    parquet = pq.ParquetFile(path, filesystem=fs)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    first = int(np.searchsorted(starts, lo, side="right") - 1)
    last = int(np.searchsorted(starts, hi, side="left"))
    table = parquet.read_row_groups(list(range(first, last)), columns=["path", "uri"])
    return table.slice(lo - int(starts[first]), hi - lo)


class StagedFolderSource(FolderSource):
    """A :class:`FolderSource` over listing parts (in order); reading, ids and errors are its parent's."""

    def __init__(
        self,
        uri: str,
        parts: Sequence[ListingPart],
        skipped: Mapping[str, int],
        start: int = 0,
        limit: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        CorpusSource.__init__(self, uri, start, limit, max_pixels, max_bytes)
        self.parts = tuple(part for part in parts if part.rows > 0)
        self._skipped = dict(sorted(skipped.items()))
        self._offsets = np.concatenate([[0], np.cumsum([p.rows for p in self.parts], dtype=np.int64)])

    def total_rows(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, first_row: int, end_row: int) -> tuple:
        """(part index, first row, end row) within each part rows ``[first_row, end_row)`` fall in."""
        pieces = []
        k = int(np.searchsorted(self._offsets, first_row, side="right") - 1)
        while first_row < end_row:
            end = min(end_row, int(self._offsets[k + 1]))
            pieces.append((k, first_row - int(self._offsets[k]), end - int(self._offsets[k])))
            first_row, k = end, k + 1
        return tuple(pieces)

    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        tables = [read_listing_rows(self.parts[k].uri, lo, hi) for k, lo, hi in shard.locator]
        files = chain.from_iterable(
            zip(t.column("path").to_pylist(), t.column("uri").to_pylist(), strict=True) for t in tables
        )
        return self._read_files(files, shard.first_row)

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    @property
    def listing_sha256(self) -> str:
        return hashlib.sha256("".join(p.sha256 for p in self.parts).encode()).hexdigest()

    def describe(self) -> dict:
        return {**super().describe(), "listing_parts": len(self.parts), "listing_sha256": self.listing_sha256}

    def input_files(self) -> pa.Table:
        columns = ["uri", "size", "mtime_ns"]
        tables = [storage.read_parquet(p.uri, columns=columns) for p in self.parts]
        return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table().select(columns)

    def with_files(self, uris: list[str]) -> FolderSource:
        raise TypeError("a staged listing is narrowed while it is listed (see gradood.pipeline.plan)")
