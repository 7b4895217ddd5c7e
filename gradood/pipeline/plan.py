"""Listing a folder corpus in Ray tasks, so the driver holds no per-file state.

Tasks list the corpus tree a level at a time (a folder's own files, and its sub-folders) until enough
folders are in hand, then one task walks each of those folders whole. Each task classifies what it finds
as :func:`gradood.data.listing.scan` does, keeps the image files (on an incremental night: only those no
published run has scored, read from the manifests by uri range) and writes them as one listing part,
which is also that part of the night's manifest. The driver gets back counts and digests and orders the
parts as the files sort (see :func:`~gradood.data.listing.folder_sort_key`), so rows, ids and row
indices are those of :func:`gradood.data.sources.open_source`.

A corpus that turns out to hold Parquet files rather than images (its files are few and large) is left
to :func:`~gradood.data.sources.open_source`, which plans it from its footers.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from gradood.core import storage
from gradood.data.listing import folder_sort_key, resolve, root_file, scan
from gradood.data.parquet import PARQUET_EXTENSION
from gradood.data.sources import FolderSource, file_id
from gradood.data.staged import LISTING_SCHEMA, ListingPart, StagedFolderSource, write_listing_part
from gradood.pipeline.publish import new_or_changed, read_seen

#: listing is mostly waiting on the filesystem: several tasks share a CPU
LISTING_CPUS = 0.25
#: folders are listed a level at a time until this many are in hand, so that a lake under a single
#: year folder still spreads over several tasks ...
SPREAD_FOLDERS = 64
#: ... or this many levels down
SPREAD_LEVELS = 3


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
def _list_level(uri: str, folder: str | None, part_prefix: str, seen: list[str]) -> dict[str, Any]:
    """A folder's own files (the root's for None), as one part per run of files between two of its
    sub-folders, and its sub-folders, left to other tasks."""
    found = scan(uri, start=folder, recursive=False)
    keys = [folder_sort_key(sub) for sub in found.folders]
    gaps: dict[int, list[tuple[str, int, int]]] = {}
    for entry in found.files:
        gaps.setdefault(bisect.bisect(keys, entry[0]), []).append(entry)
    parts = {gap: _part(uri, files, f"{part_prefix}-{gap:06d}.parquet", seen) for gap, files in gaps.items()}
    return {"folders": found.folders, "parts": parts, "skipped": found.skipped}


@ray.remote(num_cpus=LISTING_CPUS)
def _list_folder(uri: str, folder: str, part_uri: str, seen: list[str]) -> dict[str, Any]:
    """Everything under a folder, as one part."""
    found = scan(uri, start=folder)
    return {**_part(uri, found.files, part_uri, seen), "skipped": found.skipped}


@dataclass
class _Folder:
    """A folder of the corpus tree: listed one level (``level``) or walked whole (``walked``)."""

    path: str | None
    level: dict[str, Any] | None = None
    children: list[_Folder] = field(default_factory=list)
    walked: dict[str, Any] | None = None

    def ordered(self) -> list[dict[str, Any]]:
        """Its parts in listing order: each run of its own files before the sub-folder it sorts before."""
        if self.walked is not None:
            return [self.walked]
        out = []
        for gap in range(len(self.children) + 1):
            if gap in self.level["parts"]:
                out.append(self.level["parts"][gap])
            if gap < len(self.children):
                out += self.children[gap].ordered()
        return out

    def skipped(self) -> Counter[str]:
        own = (self.walked or self.level)["skipped"]
        return sum((child.skipped() for child in self.children), Counter(own))


def _list_tree(uri: str, parts_uri: str, seen: list[str]) -> _Folder:
    """Folders are listed a level at a time until SPREAD_FOLDERS are in hand (or SPREAD_LEVELS down), then
    each is walked by one task; the split depends on the tree alone, not on the cluster."""
    names = (storage.join(parts_uri, f"part-{k:06d}") for k in itertools.count())
    root = _Folder(None)
    frontier, walk = [root], []
    for _ in range(SPREAD_LEVELS):
        levels = ray.get([_list_level.remote(uri, f.path, next(names), seen) for f in frontier])
        for folder, level in zip(frontier, levels, strict=True):
            folder.level, folder.children = level, [_Folder(path) for path in level["folders"]]
        children = [child for folder in frontier for child in folder.children]
        # hidden folders hold no inputs (what is in them is only counted): walked, never spread
        walk += [child for child in children if _hidden(child.path)]
        frontier = [child for child in children if not _hidden(child.path)]
        if len(frontier) >= SPREAD_FOLDERS:
            break
    walk += frontier
    walks = ray.get([_list_folder.remote(uri, f.path, f"{next(names)}.parquet", seen) for f in walk])
    for folder, walked in zip(walk, walks, strict=True):
        folder.walked = walked
    return root


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def stage_listing(uri: str, parts_uri: str, seen: list[str], **source_args: Any) -> StagedListing | None:
    """The folder corpus at ``uri`` listed into ``parts_uri`` by Ray tasks; None if it is not a folder of
    images (a single file, or Parquet files). ``seen``: manifests whose files are left out."""
    if root_file(uri) is not None:
        return None
    storage.delete_dir(parts_uri)
    tree = _list_tree(uri, parts_uri, seen)
    ordered = tree.ordered()
    skipped = tree.skipped()
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
    return StagedListing(source, listed, source.total_rows())
