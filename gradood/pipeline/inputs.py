"""A night's inputs as files: what the manifest records and what an incremental run selects."""

from __future__ import annotations

import copy

import pyarrow as pa

from gradood.data.sources import CorpusSource, _FileSource


def source_inputs(source: CorpusSource) -> pa.Table | None:
    """(uri, size, mtime_ns) of every input file of a folder or Parquet source; None for other sources."""
    if not isinstance(source, _FileSource):
        return None
    paths = source._listing()
    infos = source._fs.get_file_info(paths) if paths else []
    return pa.table(
        {
            "uri": pa.array([source._id_of(p) for p in paths], pa.string()),
            "size": pa.array([int(i.size or 0) for i in infos], pa.int64()),
            "mtime_ns": pa.array([int(i.mtime_ns or 0) for i in infos], pa.int64()),
        }
    )


def with_files(source: CorpusSource, uris: list[str]) -> CorpusSource:
    """The same source restricted to the input files ``uris`` (ids and decoding unchanged)."""
    if not isinstance(source, _FileSource):
        raise TypeError(f"{type(source).__name__} has no input files to select")
    keep = set(uris)
    restricted = copy.copy(source)
    restricted._cache = {"listing": [p for p in source._listing() if source._id_of(p) in keep]}
    return restricted


def skipped(source: CorpusSource) -> dict[str, int]:
    """Files the source found but does not treat as inputs, by reason (none for most sources)."""
    counts = getattr(source, "skipped", None)
    return dict(counts()) if callable(counts) else {}
