"""A stage that stops making progress fails, naming itself, instead of hanging the run.

A Ray stage that cannot be scheduled (every CPU held by actors that wait for tasks that need one) or
whose workers wedge waits forever without a word. The driver consumes such a stage's results through
:func:`progress_or_fail`, which raises :class:`StallError` when no result has arrived for the
configured time. What the stage finished before is on storage, so the rerun resumes from it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class StallError(RuntimeError):
    """A stage delivered nothing for longer than ``run.stall_timeout_s``."""


def progress_or_fail(items: Iterable[T], timeout_s: float | None, stage: str) -> Iterator[T]:
    """The items of ``items``, in order; StallError if ``timeout_s`` seconds pass without the next one.

    ``items`` is iterated on a helper thread, one item ahead of the consumer at most. ``timeout_s`` None or
    0 means no limit (the items are iterated directly). An exception of ``items`` is re-raised here.
    """
    if not timeout_s:
        yield from items
        return
    handoff: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=1)

    def pump() -> None:
        try:
            for item in items:
                handoff.put(("item", item))
            handoff.put(("end", None))
        except BaseException as error:  # re-raised on the consumer's thread
            handoff.put(("error", error))

    threading.Thread(target=pump, name=f"gradood-{stage}", daemon=True).start()
    while True:
        try:
            kind, value = handoff.get(timeout=timeout_s)
        except queue.Empty:
            raise StallError(
                f"{stage}: no progress for {timeout_s:g} s (run.stall_timeout_s); the finished part is "
                "kept and a rerun resumes from it. A stage that never starts usually lacks a resource: "
                "check the cluster's CPUs and GPUs against extract.num_workers, extract.cpus_per_worker, "
                "extract.gpus_per_worker and extract.decode_cpus"
            ) from None
        if kind == "end":
            return
        if kind == "error":
            raise value  # type: ignore[misc]
        yield value  # type: ignore[misc]
