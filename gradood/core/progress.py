"""Progress lines for the operator: plain, timestamped and flushed, so that they reach `ray job logs`
and CI logs, where progress bars do not."""

from __future__ import annotations

import time


def progress(message: str) -> None:
    """Print one progress line, ``[gradood HH:MM:SS] message``."""
    print(f"[gradood {time.strftime('%H:%M:%S')}] {message}", flush=True)
