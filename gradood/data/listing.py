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

from gradood.core.storage import from_uri

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
    return from_uri(uri)


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


#: an entry that is a folder to walk (only yielded by a walk that does not descend)
FOLDER = "folder"

#: (path, problem or None, size, mtime_ns) of one entry a walk found
Entry = tuple[str, str | None, int, int]


def _local_entries(root: str, start: str | None = None, recursive: bool = True) -> Iterator[Entry]:
    """(path, None, size, mtime_ns) for each regular file at or under ``start`` (default ``root``),
    (path, reason, 0, 0) for every other non-folder; without ``recursive``, sub-folders are yielded as
    (path, FOLDER, 0, 0) instead of walked.

    Folder symlinks are followed (as pyarrow does), except into a folder that is already one of the
    entry's ancestors below ``root``: that link is a cycle and is reported as a symlink loop.
    """
    root_stat = os.stat(root)
    ancestors = frozenset({(root_stat.st_dev, root_stat.st_ino)})
    if start is not None and start != root:
        # every folder from the root down to ``start`` is an ancestor, as in a walk from the root
        path = root
        for name in os.path.relpath(start, root).split(os.sep):
            path = os.path.join(path, name)
            try:
                info = os.stat(path)
            except OSError:
                yield start, UNREADABLE, 0, 0
                return
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                yield start, SYMLINK_LOOP, 0, 0
                return
            ancestors |= {key}
    pending = [(start or root, ancestors)]
    while pending:
        directory, ancestors = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            yield directory, UNREADABLE, 0, 0
            continue
        for entry in entries:
            try:
                info = entry.stat()  # follows symlinks
            except OSError as err:
                if err.errno == errno.ELOOP:
                    yield entry.path, SYMLINK_LOOP, 0, 0
                else:
                    yield entry.path, BROKEN_SYMLINK if entry.is_symlink() else UNREADABLE, 0, 0
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    yield entry.path, SYMLINK_LOOP, 0, 0
                elif recursive:
                    pending.append((entry.path, ancestors | {key}))
                else:
                    yield entry.path, FOLDER, 0, 0
            elif stat.S_ISREG(info.st_mode):
                yield entry.path, None, int(info.st_size), int(info.st_mtime_ns)
            else:
                yield entry.path, NOT_REGULAR, 0, 0


def _remote_entries(
    fs: pafs.FileSystem, root: str, start: str | None = None, recursive: bool = True
) -> Iterator[Entry]:
    """Like :func:`_local_entries` for filesystems without symlinks (object stores, HDFS)."""
    for entry in fs.get_file_info(pafs.FileSelector(start or root, recursive=recursive)):
        if entry.type == pafs.FileType.Directory:
            if not recursive:
                yield entry.path, FOLDER, 0, 0
        elif entry.type == pafs.FileType.File:
            yield entry.path, None, int(entry.size or 0), int(entry.mtime_ns or 0)
        else:
            yield entry.path, NOT_REGULAR, 0, 0


@dataclass
class Scan:
    """What one walk found: candidate files (path, size, mtime_ns; sorted by path), the sub-folders it
    left to walk (sorted in the order their files sort in) and the entries skipped, reason -> count."""

    files: list[tuple[str, int, int]]
    folders: list[str]
    skipped: Counter[str]


def folder_sort_key(path: str) -> str:
    """A sub-folder sorts where its files do: every path under ``a`` starts with ``a/``, and "/" sorts
    after "-" and ".", so folder ``a`` comes after folder ``a-b`` and file ``a.png``."""
    return path + "/"


def scan(uri: str, start: str | None = None, recursive: bool = True) -> Scan:
    """Every entry at or under ``start`` (a folder path under the root of ``uri``; default the root).

    Hidden entries (a name starting with "." at or below the root) are skipped: macOS writes
    "._name.png" resource forks and ".DS_Store" files, notebooks ".ipynb_checkpoints" folders, none of
    them corpus images. Without ``recursive`` the sub-folders of ``start`` are returned, not walked
    (hidden ones too: what they hold is counted when they are walked).
    """
    fs, root = resolve(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    entries = _local_entries(root, start, recursive) if local else _remote_entries(fs, root, start, recursive)
    files: list[tuple[str, int, int]] = []
    folders: list[str] = []
    skipped: Counter[str] = Counter()
    for path, problem, size, mtime_ns in entries:
        *parents, name = path[len(root) :].lstrip("/").split("/")
        if problem == FOLDER:
            folders.append(path)
        elif any(folder.startswith(".") for folder in parents):
            skipped[IN_HIDDEN_FOLDER] += 1
        elif name.startswith("."):
            skipped[HIDDEN_FILE] += 1
        elif problem is not None:
            skipped[problem] += 1
        else:
            files.append((path, size, mtime_ns))
    files.sort()
    folders.sort(key=folder_sort_key)
    return Scan(files, folders, skipped)


def root_file(uri: str) -> str | None:
    """The path of ``uri`` when it names a single file (the whole listing); None for a folder."""
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    return root if info.type == pafs.FileType.File else None


def list_files(uri: str) -> Listing:
    """Every entry at or under ``uri``, in one pass (see :func:`scan`); a file is the whole listing."""
    single = root_file(uri)
    if single is not None:
        return Listing((single,))
    found = scan(uri)
    return Listing(tuple(path for path, _, _ in found.files), dict(sorted(found.skipped.items())))
