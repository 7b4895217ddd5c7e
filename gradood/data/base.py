"""The abstractions every corpus source shares: raw rows, shards and :class:`CorpusSource`.

A source is a fixed order of rows; shards are contiguous ranges of it that travel to Ray workers. The
per-row size limits live here because every source applies them the same way: an oversized row is an
error row, never an exception.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from gradood.data.images import DEFAULT_MAX_PIXELS

#: default limit on the encoded bytes of one image file or Parquet cell: 64 MiB
DEFAULT_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RawRow:
    """One undecoded row; ``row_index`` is its position in the source's full deterministic order."""

    id: str
    row_index: int
    payload: bytes | np.ndarray | Image.Image | None
    error: str | None = None


@dataclass(frozen=True)
class Shard:
    """Rows ``[first_row, first_row + num_rows)`` (numbered like :attr:`RawRow.row_index`).

    ``locator`` is whatever the source needs to read them without re-listing (file paths, Parquet
    pieces, an index range); it stays small so shards travel cheaply to workers.
    """

    number: int
    first_row: int
    num_rows: int
    locator: tuple


class CorpusSource(ABC):
    """A corpus in a fixed order; ``start``/``limit`` select a contiguous range of that order."""

    kind: str = ""
    #: reading one row alone costs no more than reading it within a range (a file per row)
    reads_rows_alone: bool = False

    def __init__(
        self,
        uri: str,
        start: int = 0,
        limit: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        """``max_pixels`` (width * height) and ``max_bytes`` (encoded bytes of a file or Parquet cell;
        sources that hand over decoded images ignore it) turn oversized rows into error rows; None: no
        limit."""
        if start < 0 or (limit is not None and limit < 0):
            raise ValueError(f"start and limit must be non-negative, got start={start}, limit={limit}")
        for name, value in (("max_pixels", max_pixels), ("max_bytes", max_bytes)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}")
        self.uri = uri
        self.start = start
        self.limit = limit
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._cache: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        # filesystem handles (with their credentials), listings and datasets are rebuilt where needed
        return {**self.__dict__, "_cache": {}}

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @abstractmethod
    def total_rows(self) -> int:
        """Rows in the whole source, before start/limit."""

    @abstractmethod
    def _locate(self, first_row: int, end_row: int) -> tuple:
        """The :attr:`Shard.locator` of rows ``[first_row, end_row)`` of the full order."""

    @abstractmethod
    def read_shard(self, shard: Shard) -> Iterator[RawRow]:
        """Exactly ``shard.num_rows`` rows, in order; unreadable ones carry ``error`` instead of raising."""

    def row_ids(self, first_row: int, end_row: int) -> list[str]:
        """The ids of rows ``[first_row, end_row)`` of the full order (the held-out split hashes them before
        any row is read). Sources override it to list ids without reading payloads; this reads the rows."""
        shard = Shard(-1, first_row, end_row - first_row, self._locate(first_row, end_row))
        return [row.id for row in self.read_shard(shard)]

    def read_row(self, row_index: int) -> RawRow:
        """Row ``row_index`` of the full order (as :attr:`RawRow.row_index` counts), read on its own."""
        return next(iter(self.read_shard(Shard(-1, row_index, 1, self._locate(row_index, row_index + 1)))))

    def with_range(self, start: int, limit: int | None = None) -> CorpusSource:
        """The same source over ``limit`` rows of its order from ``start`` (None: to the end), sharing
        what it has listed or loaded (which does not depend on the range)."""
        if start < 0 or (limit is not None and limit < 0):
            raise ValueError(f"start and limit must be non-negative, got start={start}, limit={limit}")
        narrowed = copy.copy(self)
        narrowed.start, narrowed.limit = start, limit
        return narrowed

    def num_rows(self) -> int:
        total = self.total_rows()
        if self.start > total:
            raise ValueError(f"{self.uri}: start={self.start} is past the end of its {total} rows")
        stop = total if self.limit is None else min(total, self.start + self.limit)
        return stop - self.start

    def shards(self, shard_size: int, align: int = 1) -> list[Shard]:
        """Consecutive shards of at most ``shard_size`` rows whose boundaries are multiples of ``align``.

        Boundaries count in the full order (like :attr:`RawRow.row_index`), so the groups consumers form as
        ``row_index // align`` never straddle two shards. With ``start`` a multiple of ``align`` (the usual
        case) every shard but the last holds a multiple of ``align`` rows; otherwise the first shard
        ends at the first boundary. ``shard_size`` is rounded down to a multiple of ``align``.
        """
        if shard_size < 1 or align < 1:
            raise ValueError(f"shard_size and align must be positive, got {shard_size} and {align}")
        size = max(align, shard_size // align * align)
        stop = self.start + self.num_rows()
        shards: list[Shard] = []
        first_row = self.start
        while first_row < stop:
            end_row = min(stop, (first_row + size) // align * align)
            shards.append(
                Shard(len(shards), first_row, end_row - first_row, self._locate(first_row, end_row))
            )
            first_row = end_row
        return shards

    def skipped(self) -> dict[str, int]:
        """Entries found under the URI that are not inputs, reason -> count; empty if none were left out."""
        return {}

    def input_files(self) -> pa.Table | None:
        """(uri, size, mtime_ns) of every input file, for a night's manifest; None: not a file source."""
        return None

    def with_files(self, uris: list[str]) -> CorpusSource:
        """The same source narrowed to the input files ``uris`` (ids and decoding unchanged)."""
        raise TypeError(f"{type(self).__name__} has no input files to select")

    def _oversize(self, size: int, what: str) -> str | None:
        """The error for a payload of ``size`` encoded bytes over ``max_bytes``, else None."""
        if self.max_bytes is not None and size > self.max_bytes:
            return f"{what} is {size} bytes, over max_bytes={self.max_bytes}"
        return None

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "uri": self.uri,
            "start": self.start,
            "limit": self.limit,
            "num_rows": self.num_rows(),
            "max_pixels": self.max_pixels,
            "max_bytes": self.max_bytes,
            "skipped_files": self.skipped(),
        }
