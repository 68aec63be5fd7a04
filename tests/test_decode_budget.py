"""memetrace.decode_budget: the pixels decoded at once never exceed the budget, and nothing waits for ever."""

from __future__ import annotations

import io
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from memetrace.decode_budget import DecodeBudget
from memetrace.imageio import DecodeLimits, decode
from memetrace.settings import Settings

JOIN_S = 30.0  # far beyond what the threads need: a thread still alive after it is a deadlock


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread is still waiting for the budget"


def test_concurrent_holders_never_exceed_the_budget() -> None:
    budget = DecodeBudget(1_000)
    rng = random.Random(5)
    sizes = [rng.randint(1, 600) for _ in range(200)]
    seen_over: list[int] = []

    def work(pixels: int) -> None:
        with budget.hold(pixels):
            if budget.in_flight > budget.pixels:
                seen_over.append(budget.in_flight)
            time.sleep(0.001)

    _run([threading.Thread(target=work, args=(p,)) for p in sizes])
    assert not seen_over
    assert budget.pixels // 2 < budget.peak <= budget.pixels  # bounded, and shared by several at once
    assert budget.in_flight == 0


def test_an_image_larger_than_the_budget_is_decoded_alone() -> None:
    budget = DecodeBudget(100)
    inside: list[tuple[int, int]] = []  # (pixels held by this thread, in flight meanwhile)

    def work(pixels: int) -> None:
        with budget.hold(pixels):
            inside.append((pixels, budget.in_flight))
            time.sleep(0.01)

    _run([threading.Thread(target=work, args=(p,)) for p in (40, 500, 40, 40, 500, 40)])
    assert sorted(p for p, _ in inside) == [40, 40, 40, 40, 500, 500]
    assert all(in_flight == 500 for p, in_flight in inside if p == 500)  # nothing else meanwhile
    assert budget.peak == 500 and budget.in_flight == 0


def test_a_large_waiter_is_not_starved_by_small_ones() -> None:
    budget = DecodeBudget(100)
    order: list[str] = []
    small_started = threading.Event()

    def small(i: int) -> None:
        with budget.hold(30):
            small_started.set()
            order.append(f"small{i}")
            time.sleep(0.02)

    def large() -> None:
        with budget.hold(100):
            order.append("large")

    first = [threading.Thread(target=small, args=(i,)) for i in range(3)]
    for t in first:
        t.start()
    small_started.wait(JOIN_S)
    big = threading.Thread(target=large)
    big.start()
    time.sleep(0.005)  # the large one queues before the later small ones
    later = [threading.Thread(target=small, args=(i,)) for i in range(3, 9)]
    _run(later)
    for t in (*first, big):
        t.join(JOIN_S)
    assert not big.is_alive()
    assert order.index("large") < max(order.index(f"small{i}") for i in range(3, 9))


def test_an_interrupted_waiter_leaves_the_queue() -> None:
    budget = DecodeBudget(10)
    holding, release = threading.Event(), threading.Event()

    def hold_all() -> None:
        with budget.hold(10):
            holding.set()
            release.wait(JOIN_S)

    owner = threading.Thread(target=hold_all)
    owner.start()
    holding.wait(JOIN_S)
    with pytest.raises(KeyboardInterrupt):
        real_wait = budget._cond.wait_for

        def interrupted(*args: object, **kwargs: object) -> bool:
            raise KeyboardInterrupt

        budget._cond.wait_for = interrupted  # type: ignore[method-assign]
        try:
            with budget.hold(5):
                pass
        finally:
            budget._cond.wait_for = real_wait  # type: ignore[method-assign]
    release.set()
    owner.join(JOIN_S)
    got = threading.Event()

    def take() -> None:
        with budget.hold(5):
            got.set()

    _run([threading.Thread(target=take)])  # would wait for ever behind the interrupted ticket
    assert got.is_set() and budget.in_flight == 0


def test_concurrent_decodes_stay_within_the_budget() -> None:
    out = io.BytesIO()
    y, x = np.mgrid[0:1500, 0:2000]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(out, format="PNG")
    data = out.getvalue()
    budget = DecodeBudget(2 * 2000 * 1500 + 1)  # room for two at once
    shapes: list[tuple[int, ...]] = []

    def work() -> None:
        shapes.append(decode(data, DecodeLimits(max_side=448), budget).rgb.shape)

    _run([threading.Thread(target=work) for _ in range(8)])
    assert shapes == [(336, 448, 3)] * 8
    assert budget.peak == 2 * 2000 * 1500 and budget.in_flight == 0


def test_one_budget_per_process_and_size() -> None:
    s = Settings(decode_budget_pixels=123_456)
    assert DecodeBudget.from_settings(s) is DecodeBudget.from_settings(Settings(decode_budget_pixels=123_456))
    assert DecodeBudget.from_settings(s).pixels == 123_456
    with pytest.raises(ValueError, match="decode budget"):
        DecodeBudget(0)
