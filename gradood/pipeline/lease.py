"""Leases: one run at a time per run id, and one writer at a time of ``runs.json``.

A lease is a small JSON object (owner, host, pid, a random token, the last heartbeat) next to what it
guards. A holder renews its heartbeat every ``timeout_s / 4`` seconds on a thread; a lease whose
heartbeat is older than ``timeout_s``, or whose holder was a process of this host that is gone, belongs
to a dead holder and is taken over. Taking a lease is a
write followed by a read-back after ``settle_s``: whoever's token is there then holds it. On local disk
the first write is an exclusive create (two processes cannot both create the file); on an object store,
which has no such write here, the read-back after the settle delay decides between writers that raced
within it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import pyarrow.fs as pafs

from gradood.core import storage

#: the folder of the runs' leases under output.uri (one listing finds the runs in progress)
LEASES = "leases"
#: the lease that serialises updates of runs.json
INDEX_LEASE = "_runs.json.lease"


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message names them."""


def _now() -> float:
    return time.time()


def read_lease(uri: str) -> dict[str, Any] | None:
    """The lease record at ``uri``, or None (none there, released meanwhile, or being created)."""
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, OSError, ValueError):
        return None


def holder_alive(record: dict[str, Any], timeout_s: float) -> bool:
    """A heartbeat younger than ``timeout_s``, unless the holder was a process of this host that no
    longer exists (a killed driver's lease is taken over at once, not after the timeout)."""
    if _now() - float(record.get("heartbeat", 0)) >= timeout_s:
        return False
    if record.get("host") != socket.gethostname() or record.get("pid") == os.getpid():
        return True
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):  # someone else's process, or no pid recorded
        return True
    return True


def runs_in_progress(out: str) -> list[str]:
    """Ids of the runs under ``out`` whose lease is alive (a heartbeat younger than its timeout)."""
    running = []
    for uri in storage.list_files(storage.join(out, LEASES), ".json"):
        record = read_lease(uri)
        if record is not None and holder_alive(record, float(record.get("timeout_s", 0))):
            running.append(uri.rsplit("/", 1)[1].removesuffix(".json"))
    return running


class Lease:
    """``with Lease(uri, what):`` holds the lease at ``uri`` for the block (``what`` names it in errors).

    ``wait_s``: how long to keep trying while another holder is alive (0: refuse at once).
    """

    def __init__(self, uri: str, what: str, timeout_s: float, wait_s: float = 0.0, settle_s: float = 0.2):
        if timeout_s <= 0:
            raise ValueError(f"a lease timeout must be positive, got {timeout_s}")
        self.uri, self.what = uri, what
        self.timeout_s, self.wait_s, self.settle_s = timeout_s, wait_s, settle_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "owner": getpass.getuser(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "heartbeat": _now(),
            "timeout_s": self.timeout_s,
        }

    def holder(self) -> dict[str, Any] | None:
        """The lease record there now, or None."""
        return read_lease(self.uri)

    def _describe(self, record: dict[str, Any]) -> str:
        beat = float(record.get("heartbeat", 0))
        at = dt.datetime.fromtimestamp(beat, dt.UTC).isoformat(timespec="seconds")
        return (
            f"{self.what} is held by {record.get('owner')}@{record.get('host')} pid {record.get('pid')} "
            f"(last heartbeat {_now() - beat:.0f} s ago, at {at}; it is taken over after "
            f"{self.timeout_s:g} s without one): {self.uri}"
        )

    def _try_take(self) -> dict[str, Any] | None:
        """None when taken; else the live holder's record."""
        current = self.holder()
        if current is not None and holder_alive(current, self.timeout_s):
            return current
        fs, path = storage.filesystem(self.uri)
        if current is None and isinstance(fs, pafs.LocalFileSystem):
            try:  # exclusive create: of two processes only one gets the file
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return self.holder() or {}
            os.close(fd)
        storage.write_json(self.uri, self._record())
        time.sleep(self.settle_s)
        now_there = self.holder()
        return None if now_there is not None and now_there.get("token") == self.token else now_there or {}

    def acquire(self) -> Lease:
        deadline = _now() + self.wait_s
        while True:
            held_by = self._try_take()
            if held_by is None:
                break
            if _now() >= deadline:
                raise LeaseHeld(
                    self._describe(held_by) if held_by else f"{self.what}: another run took {self.uri}"
                )
            time.sleep(min(1.0, max(self.settle_s, 0.05)))
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.what}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            current = self.holder()
            if current is None or current.get("token") != self.token:
                self.lost = True  # taken over: this holder was presumed dead
                return
            storage.write_json(self.uri, self._record())

    def check(self) -> None:
        """Raise if another holder took the lease over (this one missed its heartbeats)."""
        if self.lost:
            raise LeaseHeld(f"{self.what}: the lease {self.uri} was taken over by another run")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.holder()
        if current is not None and current.get("token") == self.token:
            storage.delete_file(self.uri)

    @classmethod
    def for_run(cls, out: str, run_id: str, timeout_s: float) -> Lease:
        """The lease of run ``run_id`` under ``out``."""
        return cls(storage.join(out, LEASES, f"{run_id}.json"), f"run {run_id}", timeout_s)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
