"""Listing a corpus: every entry at or under a URI is either a candidate file or skipped with a reason.

A corpus listing must account for everything it finds, so that a user can reconcile "files on disk"
with "rows scored + rows rejected + entries skipped" instead of wondering where files went. Entries
that are never inputs (hidden files, broken symlinks, FIFOs ...) are counted per reason rather than
turned into error rows: they are not images the user expects scored. Files whose extension the source
does not read are counted the same way by :meth:`Listing.keep`.

Local folders are walked with ``os.scandir`` rather than pyarrow's recursive ``FileSelector``, which
silently drops broken symlinks and never returns from a directory symlink cycle; on object stores
(no symlinks) the pyarrow listing is used, and both feed the same classification.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs

HIDDEN_FILE = "hidden file"
IN_HIDDEN_FOLDER = "inside a hidden folder"
BROKEN_SYMLINK = "broken symlink"
SYMLINK_LOOP = "symlink loop"
NOT_REGULAR = "not a regular file"
UNREADABLE = "unreadable entry"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path behind ``uri``; bare local paths are made absolute first."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


@dataclass(frozen=True)
class Listing:
    """Candidate files (regular, not hidden; sorted by path) and the entries skipped, reason -> count."""

    files: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def keep(self, extensions: tuple[str, ...], reason: str) -> Listing:
        """The files ending in one of ``extensions`` (any case); the rest are counted under ``reason``."""
        kept = tuple(path for path in self.files if path.lower().endswith(extensions))
        skipped = Counter(self.skipped)
        if len(kept) < len(self.files):
            skipped[reason] += len(self.files) - len(kept)
        return Listing(kept, dict(sorted(skipped.items())))


def _local_entries(root: str) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each regular file under ``root``, (path, reason) for every other non-directory.

    Directory symlinks are followed (as pyarrow does), except into a directory that is already one of
    the entry's ancestors: that link is a cycle and is reported as a symlink loop.
    """
    root_stat = os.stat(root)
    pending = [(root, frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while pending:
        directory, ancestors = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            yield directory, UNREADABLE
            continue
        for entry in entries:
            try:
                info = entry.stat()  # follows symlinks
            except OSError as err:
                if err.errno == errno.ELOOP:
                    yield entry.path, SYMLINK_LOOP
                else:
                    yield entry.path, BROKEN_SYMLINK if entry.is_symlink() else UNREADABLE
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    yield entry.path, SYMLINK_LOOP
                else:
                    pending.append((entry.path, ancestors | {key}))
            else:
                yield entry.path, None if stat.S_ISREG(info.st_mode) else NOT_REGULAR


def _remote_entries(fs: pafs.FileSystem, root: str) -> Iterator[tuple[str, str | None]]:
    """Like :func:`_local_entries` for filesystems without symlinks (object stores, HDFS)."""
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.Directory:
            yield entry.path, None if entry.type == pafs.FileType.File else NOT_REGULAR


def list_files(uri: str) -> Listing:
    """Every entry at or under ``uri``, in one pass.

    Hidden entries (a name starting with "." at or below ``uri``) are skipped: macOS writes
    "._name.png" resource forks and ".DS_Store" files, notebooks ".ipynb_checkpoints" folders, none of
    them corpus images. A path that is itself a file is the whole listing.
    """
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        return Listing((root,))
    entries = _local_entries(root) if isinstance(fs, pafs.LocalFileSystem) else _remote_entries(fs, root)
    files: list[str] = []
    skipped: Counter[str] = Counter()
    for path, problem in entries:
        *folders, name = path[len(root) :].lstrip("/").split("/")
        if any(folder.startswith(".") for folder in folders):
            skipped[IN_HIDDEN_FOLDER] += 1
        elif name.startswith("."):
            skipped[HIDDEN_FILE] += 1
        elif problem is not None:
            skipped[problem] += 1
        else:
            files.append(path)
    return Listing(tuple(sorted(files)), dict(sorted(skipped.items())))
