"""A stage that stops delivering fails after ``run.stall_timeout_s``, naming itself; others pass through."""

from __future__ import annotations

import threading
import time

import pytest

from gradood.pipeline.watchdog import StallError, progress_or_fail


def test_items_pass_through_in_order():
    assert list(progress_or_fail(iter(range(50)), 5.0, "stage")) == list(range(50))
    assert list(progress_or_fail(iter(range(3)), None, "stage")) == [0, 1, 2]


def test_a_stalled_stage_fails_naming_itself():
    release = threading.Event()

    def stalls():
        yield "first"
        release.wait(30)  # a stage that never delivers again (released at the end of the test)
        yield "late"

    started = time.perf_counter()
    seen = []
    with pytest.raises(StallError, match=r"corpus features: no progress for 0.3 s \(run.stall_timeout_s\)"):
        for item in progress_or_fail(stalls(), 0.3, "corpus features"):
            seen.append(item)
    release.set()
    assert seen == ["first"]
    assert time.perf_counter() - started < 10


def test_a_slow_but_moving_stage_does_not_fail():
    def slow():
        for i in range(5):
            time.sleep(0.1)
            yield i

    assert list(progress_or_fail(slow(), 1.0, "stage")) == [0, 1, 2, 3, 4]


def test_the_stage_error_is_raised_on_the_consumer():
    def fails():
        yield 1
        raise ValueError("decode failed")

    with pytest.raises(ValueError, match="decode failed"):
        list(progress_or_fail(fails(), 5.0, "stage"))
