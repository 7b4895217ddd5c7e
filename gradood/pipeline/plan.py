"""Listing a folder corpus in Ray tasks, so the driver holds no per-file state.

One task scans the corpus root without descending; one task per sub-folder of the root walks it. Each
task classifies what it finds as :func:`gradood.data.listing.scan` does, keeps the image files (on an
incremental night: only those no published run has scored, read from the manifests by uri range) and
writes them as one listing part, which is also that part of the night's manifest. The driver gets back
counts and digests and orders the parts as the files sort (see :func:`~gradood.data.listing.
folder_sort_key`), so rows, ids and row indices are those of :func:`gradood.data.sources.open_source`.

A corpus that turns out to hold Parquet files rather than images (its files are few and large) is left
to :func:`~gradood.data.sources.open_source`, which plans it from its footers.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from gradood.data.listing import folder_sort_key, resolve, root_file, scan
from gradood.data.parquet import PARQUET_EXTENSION
from gradood.data.sources import FolderSource, file_id
from gradood.data.staged import LISTING_SCHEMA, ListingPart, StagedFolderSource, write_listing_part
from gradood.pipeline import storage
from gradood.pipeline.publish import new_or_changed, read_seen

#: listing is mostly waiting on the filesystem: several tasks share a CPU
LISTING_CPUS = 0.25


@dataclass
class StagedListing:
    source: StagedFolderSource
    #: image files found, and those kept (all of them unless the night is incremental)
    listed: int
    kept: int


def _part(uri: str, files: list[tuple[str, int, int]], part_uri: str, seen: list[str]) -> dict[str, Any]:
    """Write the image files of one task's scan as a listing part; counts of what else it found."""
    fs, _ = resolve(uri)
    images = [f for f in files if f[0].lower().endswith(FolderSource.extensions)]
    parquet = sum(1 for f in files if f[0].lower().endswith(PARQUET_EXTENSION))
    table = pa.table(
        {
            "uri": [file_id(uri, fs, path) for path, _, _ in images],
            "path": [path for path, _, _ in images],
            "size": pa.array([size for _, size, _ in images], pa.int64()),
            "mtime_ns": pa.array([mtime for _, _, mtime in images], pa.int64()),
        },
        schema=LISTING_SCHEMA,
    )
    if seen and table.num_rows:
        ids = table.column("uri")
        table = new_or_changed(table, read_seen(seen, (ids[0].as_py(), ids[-1].as_py())))
    part = write_listing_part(table, part_uri) if table.num_rows else ListingPart(part_uri, 0, "")
    return {"part": part, "listed": len(images), "parquet": parquet, "other": len(files) - len(images)}


@ray.remote(num_cpus=LISTING_CPUS)
def _list_root(uri: str, parts_uri: str, seen: list[str]) -> dict[str, Any]:
    """The root's own files, as one part per run of files between two sub-folders, and its sub-folders."""
    found = scan(uri, recursive=False)
    keys = [folder_sort_key(folder) for folder in found.folders]
    gaps: dict[int, list[tuple[str, int, int]]] = {}
    for entry in found.files:
        gaps.setdefault(bisect.bisect(keys, entry[0]), []).append(entry)
    parts = {
        gap: _part(uri, files, storage.join(parts_uri, f"part-{gap:06d}-a.parquet"), seen)
        for gap, files in gaps.items()
    }
    return {"folders": found.folders, "parts": parts, "skipped": found.skipped}


@ray.remote(num_cpus=LISTING_CPUS)
def _list_folder(uri: str, folder: str, part_uri: str, seen: list[str]) -> dict[str, Any]:
    found = scan(uri, start=folder)
    return {**_part(uri, found.files, part_uri, seen), "skipped": found.skipped}


def stage_listing(uri: str, parts_uri: str, seen: list[str], **source_args: Any) -> StagedListing | None:
    """The folder corpus at ``uri`` listed into ``parts_uri`` by Ray tasks; None if it is not a folder of
    images (a single file, or Parquet files). ``seen``: manifests whose files are left out."""
    if root_file(uri) is not None:
        return None
    storage.delete_dir(parts_uri)
    storage.makedirs(parts_uri)
    root = ray.get(_list_root.remote(uri, parts_uri, seen))
    folders = root["folders"]
    results = ray.get(
        [
            _list_folder.remote(uri, folder, storage.join(parts_uri, f"part-{g:06d}-b.parquet"), seen)
            for g, folder in enumerate(folders)
        ]
    )
    ordered = []
    for gap in range(len(folders) + 1):
        if gap in root["parts"]:
            ordered.append(root["parts"][gap])
        if gap < len(folders):
            ordered.append(results[gap])
    skipped = Counter(root["skipped"])
    for result in results:
        skipped.update(result["skipped"])
    listed = sum(r["listed"] for r in ordered)
    parquet = sum(r["parquet"] for r in ordered)
    if parquet:
        storage.delete_dir(parts_uri)
        if listed:
            raise ValueError(f"{uri} holds both Parquet files and image files; point at one or the other")
        return None
    if not listed:
        raise ValueError(
            f"no {FolderSource.what} under {uri} (looked for {', '.join(FolderSource.extensions)})"
        )
    other = sum(r["other"] for r in ordered)
    if other:
        skipped[FolderSource.skip_reason] += other
    source = StagedFolderSource(uri, [r["part"] for r in ordered], skipped, **source_args)
    return StagedListing(source, listed, source._total_rows())
