"""Parquet format helpers behind :class:`gradood.data.sources.ParquetSource`: the image column, footers, rows.

Kept apart from the source classes so that the rules about what a Parquet file may look like (which
column holds the images, what an unreadable file is) live in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARQUET_EXTENSION = ".parquet"


def _is_binary(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype)


def _is_image_field(field: pa.Field) -> bool:
    """A binary column, or a struct with a binary ``bytes`` field (how Hugging Face datasets store images)."""
    dtype = field.type
    if pa.types.is_struct(dtype):
        return dtype.get_field_index("bytes") >= 0 and _is_binary(dtype.field("bytes").type)
    return _is_binary(dtype)


def resolve_image_column(schema: pa.Schema, name: str | None, where: str) -> str:
    """``name`` checked against ``schema``, or the only image-like column when ``name`` is None."""
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


@dataclass(frozen=True)
class Footer:
    """What planning needs from one file: its row count and schema, or why its footer cannot be read."""

    num_rows: int
    schema: pa.Schema | None
    error: str | None = None


def read_footer(fs: pafs.FileSystem, path: str) -> Footer:
    """The file's footer; a truncated, empty or non-Parquet file gives ``Footer(0, None, reason)``.

    pyarrow reports all of these as "magic bytes not found" (ArrowInvalid) or an OSError, without the
    file name; the caller attaches the file to the reason.
    """
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            return Footer(parquet.metadata.num_rows, parquet.schema_arrow)
    except (OSError, pa.ArrowException) as err:
        return Footer(0, None, f"cannot read Parquet footer: {err}")


def _group_payloads(
    parquet: pq.ParquetFile, group: int, leaf: str, is_struct: bool, start: int, length: int
) -> list[tuple[Any, str | None]]:
    """Rows ``[start, start + length)`` of one row group as (payload, None), or all (None, reason)."""
    try:
        values = parquet.read_row_group(group, columns=[leaf]).column(0)
        values = values.slice(start, length).combine_chunks()
        # flatten (unlike .field) keeps the struct's own nulls
        return [(payload, None) for payload in (values.flatten()[0] if is_struct else values).to_pylist()]
    except (OSError, pa.ArrowException) as err:
        return [(None, f"cannot read Parquet row group {group}: {err}")] * length


def read_payloads(
    fs: pafs.FileSystem, path: str, column: str, lo: int, hi: int
) -> Iterator[tuple[Any, str | None]]:
    """(payload, None) per row of [lo, hi) of one file, reading only the image column of the row groups
    needed; (None, reason) for each row of a row group that cannot be decoded.

    One corrupt row group costs only its own rows: the next ones are still read. Raises OSError or
    ArrowException only when the file itself can no longer be opened.
    """
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        is_struct = pa.types.is_struct(parquet.schema_arrow.field(column).type)
        leaf = f"{column}.bytes" if is_struct else column
        group_start = 0
        for group in range(parquet.metadata.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            first, stop = max(lo, group_start), min(hi, group_start + count)
            if first < stop:
                yield from _group_payloads(parquet, group, leaf, is_struct, first - group_start, stop - first)
            group_start += count
