"""@opmap in thread mode: order, failures, cache, concurrency, progress, event loops."""

from __future__ import annotations

import asyncio
import sys
import threading
import warnings
from builtins import ExceptionGroup

import pytest

from opero import MapError, OpmapFailureWarning, opmap


def test_results_in_input_order():
    """A thread map returns one result per item, in input order, as a list."""

    @opmap(mode="thread", workers=4, progress=False)
    def double(x):
        return 2 * x

    assert double(range(1000)) == [2 * x for x in range(1000)]


def test_generator_input_is_consumed():
    """A generator is accepted and mapped once."""

    @opmap(mode="thread", workers=3, progress=False)
    def inc(x):
        return x + 1

    assert inc(x for x in range(10)) == list(range(1, 11))


def test_empty_input_gives_empty_list():
    """An empty iterable gives an empty list without touching a pool."""

    @opmap(mode="thread", progress=False)
    def inc(x):
        return x + 1

    assert inc([]) == []


def test_unordered_returns_every_result():
    """ordered=False returns every result once, in completion order."""
    release_first = threading.Event()

    @opmap(mode="thread", workers=2, ordered=False, chunksize=1, progress=False)
    def slow_first(x):
        if x == 0:
            assert release_first.wait(10)
        else:
            release_first.set()
        return x

    results = slow_first([0, 1])
    assert results == [1, 0]


def test_failures_stay_in_place_and_warn():
    """A failed item leaves its exception in its place and one warning counts the failures."""

    @opmap(mode="thread", workers=3, retries=0, progress=False)
    def fail_odd(x):
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    with pytest.warns(OpmapFailureWarning, match="5 of 10 items failed"):
        results = fail_odd(range(10))
    for i, value in enumerate(results):
        if i % 2:
            assert isinstance(value, ValueError)
            assert str(value) == f"odd {i}"
        else:
            assert value == i


def test_strict_raises_group_with_partial_results():
    """strict=True raises an ExceptionGroup after all items, with the partial results."""
    seen = []

    @opmap(mode="thread", workers=2, retries=0, strict=True, progress=False)
    def fail_three(x):
        seen.append(x)
        if x == 3:
            raise KeyError(x)
        return x

    with pytest.raises(MapError, match="1 of 6 items failed") as info:
        fail_three(range(6))
    assert isinstance(info.value, ExceptionGroup)
    assert sorted(seen) == list(range(6))
    assert info.value.indices == [3]
    assert info.value.results[:3] == [0, 1, 2]
    assert isinstance(info.value.results[3], KeyError)
    assert [type(e) for e in info.value.exceptions] == [KeyError]


def test_retries_apply_per_item():
    """Every @opero option applies per item: a flaky item succeeds on its retry."""
    calls: dict[int, int] = {}
    lock = threading.Lock()

    @opmap(mode="thread", workers=4, retries=2, min_delay=0, jitter=False, progress=False)
    def flaky(x):
        with lock:
            calls[x] = calls.get(x, 0) + 1
            first = calls[x] == 1
        if first:
            raise ConnectionError(x)
        return x

    assert flaky(range(20)) == list(range(20))
    assert set(calls.values()) == {2}


def test_cache_serves_repeated_items():
    """With cache=True an item seen before is not computed again."""
    calls = []

    @opmap(mode="thread", workers=2, cache=True, retries=0, progress=False)
    def square(x):
        calls.append(x)
        return x * x

    assert square([1, 2, 3]) == [1, 4, 9]
    assert square([3, 2, 1, 4]) == [9, 4, 1, 16]
    assert sorted(calls) == [1, 2, 3, 4]


def test_workers_bound_concurrency():
    """At most `workers` items run at once, and that many do run together."""
    workers = 3
    barrier = threading.Barrier(workers, timeout=10)
    active = 0
    peak = 0
    lock = threading.Lock()

    @opmap(mode="thread", workers=workers, chunksize=1, retries=0, progress=False)
    def meet(x):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        barrier.wait()
        with lock:
            active -= 1
        return x

    assert meet(range(9)) == list(range(9))
    assert peak == workers


def test_rate_limit_shared_by_threads():
    """The rate limit is one bucket for every thread: exactly `burst` tokens are free."""

    @opmap(
        mode="thread",
        workers=4,
        retries=0,
        rate_limit=0.001,
        rate_burst=3,
        rate_max_wait=0.0,
        progress=False,
    )
    def limited(x):
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        results = limited(range(12))
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3


def test_nested_map_does_not_deadlock():
    """A map called from inside an item of a map on the same pool finishes."""

    @opmap(mode="thread", workers=2, chunksize=1, progress=False)
    def inner(x):
        return x + 1

    @opmap(mode="thread", workers=2, chunksize=1, progress=False)
    def outer(x):
        return sum(inner(range(x)))

    assert outer(range(6)) == [sum(range(1, x + 1)) for x in range(6)]


def test_amap_and_sync_call_inside_running_loop():
    """Amap awaits without blocking the loop, and the plain call works inside a loop too."""

    @opmap(mode="thread", workers=2, progress=False)
    def double(x):
        return 2 * x

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        awaited = await double.amap(range(5))
        direct = double(range(3))
        task.cancel()
        return awaited, direct, ticks

    awaited, direct, ticks = asyncio.run(main())
    assert awaited == [0, 2, 4, 6, 8]
    assert direct == [0, 2, 4]
    assert ticks >= 1


def test_progress_forced_draws_tqdm(capsys):
    """progress='force' draws a tqdm bar on stderr counting every item."""
    pytest.importorskip("tqdm")

    @opmap(mode="thread", workers=2, progress="force")
    def inc(x):
        return x + 1

    inc(range(7))
    assert "7/7" in capsys.readouterr().err


def test_progress_silently_off_without_tqdm(monkeypatch, capsys):
    """Without tqdm installed the bar is off and nothing fails."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)

    @opmap(mode="thread", workers=2, progress="force")
    def inc(x):
        return x + 1

    assert inc(range(4)) == [1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_progress_true_is_off_when_stderr_is_not_a_terminal(capsys):
    """progress=True draws nothing when stderr is not a terminal (captured here)."""

    @opmap(mode="thread", workers=2)
    def inc(x):
        return x + 1

    inc(range(4))
    assert capsys.readouterr().err == ""


def test_executor_is_accepted():
    """A user's ThreadPoolExecutor runs the batches, with failures in place."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:

        @opmap(executor=pool, retries=0, progress=False)
        def fail_two(x):
            if x == 2:
                raise ValueError(x)
            return x

        with pytest.warns(OpmapFailureWarning):
            results = fail_two(range(5))
    assert results[:2] == [0, 1]
    assert results[3:] == [3, 4]
    assert isinstance(results[2], ValueError)
    assert fail_two.mode == "executor"
