"""memetrace.parallel.concurrently: results in order, the calls really overlapping, failures raised."""

from __future__ import annotations

import threading

import pytest

from memetrace.parallel import concurrently


def test_results_come_in_the_order_of_the_calls() -> None:
    assert concurrently(lambda: 1, lambda: "two", lambda: [3]) == [1, "two", [3]]
    assert concurrently(lambda: None) == [None]


def test_the_calls_run_at_the_same_time() -> None:
    # each call waits for the others at the barrier: run one after the other, it breaks
    meet = threading.Barrier(3, timeout=10)
    assert concurrently(meet.wait, meet.wait, meet.wait) is not None


def test_a_failure_is_raised_once_every_call_is_done() -> None:
    done = threading.Event()

    def slow() -> str:
        threading.Event().wait(0.2)  # still running when boom has failed
        done.set()
        return "done"

    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        concurrently(boom, slow)
    assert done.is_set()
    done.clear()
    with pytest.raises(KeyError, match="boom"):
        concurrently(slow, boom)
    assert done.is_set()
