"""Hostile use of retry_after, timeout, attempt_timeout, retry_on_result and set_testing.

Each test is an attack that once worked (or a documented limit, as a strict xfail).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from opero import ConfigurationError, RetryResultError, _testing, set_testing
from opero import opero as op
from opero._testing import State


def test_timed_first_call_chains_retry_errors_like_the_python_wrapper() -> None:
    """With timeout=, later attempts' errors chain to the first one, as without timeout=."""
    calls: list[int] = []

    @op(retries=1, timeout=10.0, min_delay=0.0)
    def timed() -> None:
        calls.append(1)
        raise ValueError(f"boom {len(calls)}")

    with pytest.raises(ValueError, match="boom 2") as info:
        timed()
    assert repr(info.value.__context__) == "ValueError('boom 1')"

    @op(retries=1, timeout=10.0, backoff_function=lambda attempt: -1)
    def bad_schedule() -> None:
        raise ValueError("first")

    with pytest.raises(ValueError, match="backoff_function") as bad:
        bad_schedule()
    assert repr(bad.value.__context__) == "ValueError('first')"


def test_timed_first_call_restores_the_handled_exception_without_leaks() -> None:
    """The native first call puts back the caller's handled exception and keeps no reference."""
    shared = ValueError("shared")
    count = [0]

    @op(retries=1, timeout=10.0, min_delay=0.0)
    def flaky() -> BaseException | None:
        count[0] += 1
        if count[0] % 2:
            raise shared
        return sys.exception()

    outer = KeyError("outer")
    gc.disable()
    try:
        before = sys.getrefcount(shared), sys.getrefcount(outer)
        for _ in range(2000):
            try:
                raise outer
            except KeyError:
                seen = flaky()
                assert sys.exception() is outer
            assert seen is shared
        assert sys.exception() is None
        seen = None
        shared.__traceback__ = shared.__context__ = outer.__traceback__ = None
        assert (sys.getrefcount(shared), sys.getrefcount(outer)) == before
    finally:
        gc.enable()


def test_timed_first_call_in_a_generator_leaves_its_exception_state_alone() -> None:
    """A timed retry inside a generator, run while the caller handles X, leaves X out of it."""
    count = [0]

    @op(retries=1, timeout=10.0, min_delay=0.0)
    def flaky() -> str:
        count[0] += 1
        if count[0] == 1:
            raise ValueError("first")
        return "ok"

    def steps() -> Iterator[object]:
        yield flaky()
        yield sys.exception()

    try:
        raise KeyError("X")
    except KeyError:
        gen = steps()
        assert next(gen) == "ok"
    assert next(gen) is None


def test_attempt_timeout_error_is_retried_only_by_the_layer_that_cut_it() -> None:
    """An attempt_timeout TimeoutError leaving its layer follows the next layer's retry_on."""
    inner_calls: list[int] = []
    other_calls: list[int] = []

    @op(retries=1, attempt_timeout=0.01, min_delay=0.0)
    async def inner() -> None:
        inner_calls.append(1)
        await asyncio.Event().wait()

    @op(retries=2, retry_on=(ConnectionError,), min_delay=0.0)
    async def outer() -> None:
        await inner()

    with pytest.raises(TimeoutError, match="attempt_timeout") as info:
        asyncio.run(asyncio.wait_for(outer(), 60))
    assert len(inner_calls) == 2  # the inner layer's own retry; the outer one made none
    assert "__opero_attempt_timeout__" not in info.value.__dict__

    @op(retries=3, retry_on=(ValueError,), min_delay=0.0)
    async def reraises() -> None:
        other_calls.append(1)
        raise info.value

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(reraises(), 60))
    assert other_calls == [1]


@pytest.fixture
def switch_off() -> Iterator[None]:
    """Start and end each switch test with the testing switch off."""
    _testing.restore((False, None, True, True))
    yield
    _testing.restore((False, None, True, True))


OFF = (False, None, True, True)


@pytest.mark.usefixtures("switch_off")
def test_set_testing_blocks_left_out_of_order_end_in_the_first_state() -> None:
    """Two set_testing blocks left out of order leave the switch as it was before both."""
    first = set_testing(attempts=1)
    first.__enter__()
    second = set_testing(cache=False)
    second.__enter__()
    first.__exit__(None, None, None)
    assert _testing.state() == (True, None, False, True)  # the open block still applies
    second.__exit__(None, None, None)
    assert _testing.state() == OFF
    second.__exit__(None, None, None)  # a second exit changes nothing
    assert _testing.state() == OFF


@pytest.mark.usefixtures("switch_off")
def test_set_testing_in_overlapping_asyncio_tasks_is_off_afterwards() -> None:
    """Concurrent tasks each in their own set_testing block leave the switch off when all end."""

    async def in_block(first_out: bool, gate: asyncio.Event, seen: list[State]) -> None:
        with set_testing(attempts=1):
            await asyncio.sleep(0)
            if first_out:
                gate.set()
            else:
                await gate.wait()
            seen.append(_testing.state())

    async def main() -> list[State]:
        gate, seen = asyncio.Event(), []  # type: ignore[var-annotated]
        await asyncio.gather(in_block(True, gate, seen), in_block(False, gate, seen))
        return seen

    seen = asyncio.run(main())
    assert seen == [(True, 1, True, True)] * 2
    assert _testing.state() == OFF


@pytest.mark.usefixtures("switch_off")
def test_set_testing_in_threads_leaving_out_of_order_is_off_afterwards() -> None:
    """Threads entering set_testing in one order and leaving in the other leave it off."""
    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]

    def block(i: int) -> None:
        if i == 1:
            entered[0].wait(30)
        with set_testing(cache=False):
            entered[i].set()
            leave[i].wait(30)

    threads = [threading.Thread(target=block, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    assert entered[1].wait(30)
    leave[0].set()  # the first one in leaves first
    threads[0].join(30)
    assert _testing.state() == (True, None, False, True)
    leave[1].set()
    threads[1].join(30)
    assert _testing.state() == OFF


@pytest.mark.usefixtures("switch_off")
def test_set_testing_as_a_decorator_is_refused_and_undone() -> None:
    """@set_testing() over a test raises a clear TypeError and switches back off."""
    with pytest.raises(TypeError, match="not a decorator"):

        @set_testing(attempts=1)  # type: ignore[operator]
        def test_something() -> None:
            """Never defined."""

    assert _testing.state() == OFF


async def _async_predicate(value: object) -> bool:
    """Return whether a result is None, as an async def (where a plain def is expected)."""
    return value is None


class _AsyncCallable:
    """An object whose ``__call__`` is an async def."""

    async def __call__(self, value: object) -> bool:
        return True


@pytest.mark.parametrize(
    "option", ["retry_on_result", "retry_after", "retry_predicate", "backoff_function"]
)
@pytest.mark.parametrize(
    "value",
    [_async_predicate, functools.partial(_async_predicate), _AsyncCallable()],
    ids=["async_def", "partial", "async_call"],
)
def test_async_def_where_a_sync_callable_is_read_is_refused(option: str, value: Any) -> None:
    """An async def for an option read without await is a ConfigurationError at decoration."""
    with pytest.raises(ConfigurationError, match=f"{option}=.*plain def"):
        op(retries=1, **{option: value})(lambda: None)


def test_async_retry_on_result_never_rejected_every_result_silently() -> None:
    """The async retry_on_result of an async function is refused before any call is made."""
    calls: list[int] = []

    with pytest.raises(ConfigurationError, match="retry_on_result"):

        @op(retries=2, retry_on_result=_async_predicate, min_delay=0.0)
        async def fetch() -> int:
            calls.append(1)
            return 5

    assert calls == []


def test_async_on_retry_either_runs_or_is_refused() -> None:
    """An async def on_retry is either awaited (it runs) or refused at decoration."""
    seen: list[int] = []

    async def on_retry(exc: BaseException, attempt: int) -> None:
        seen.append(attempt)

    try:

        @op(retries=1, min_delay=0.0, on_retry=on_retry)
        async def flaky() -> None:
            raise ValueError("down")

    except ConfigurationError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError):
            asyncio.run(flaky())
        gc.collect()
    assert seen == [0]


class _Busy(Exception):
    """An error whose server asks for a wait far past any timeout below."""

    retry_after = 100


def _garbage_after(call: Callable[[], Any], exc: type[BaseException], times: int = 100) -> int:
    """Call ``call`` ``times`` times with the collector off, dropping ``exc``; return collect()."""
    with pytest.raises(exc):
        call()
    gc.collect()
    gc.disable()
    try:
        for _ in range(times):
            with contextlib.suppress(exc):
                call()
        return gc.collect()
    finally:
        gc.enable()


def test_timed_first_call_error_raised_as_is_leaves_no_cycle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With timeout=, a first error given up at once (deadline, not retryable) leaves no cycle."""
    caplog.set_level(logging.CRITICAL, logger="opero")

    @op(retries=2, timeout=5.0, min_delay=0.0)
    def past_deadline() -> None:
        raise _Busy()

    @op(retries=2, timeout=5.0, retry_on=(KeyError,))
    def not_retryable() -> None:
        raise ValueError("not a KeyError")

    assert _garbage_after(past_deadline, _Busy) == 0
    assert _garbage_after(not_retryable, ValueError) == 0


@pytest.mark.parametrize("retries", [0, 2])
def test_attempt_timeout_error_leaves_no_cycle(
    retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A dropped attempt_timeout TimeoutError is freed by refcounting (gc finds 0)."""
    caplog.set_level(logging.CRITICAL, logger="opero")

    @op(retries=retries, min_delay=0.0, attempt_timeout=0.001)
    async def stuck() -> None:
        await asyncio.Event().wait()

    async def main() -> int:
        with contextlib.suppress(TimeoutError):
            await stuck()
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                with contextlib.suppress(TimeoutError):
                    await stuck()
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 0


def test_timeout_on_a_layer_with_nothing_to_bound_is_refused() -> None:
    """timeout= on a one-call layer (retries=0, or stacked by default) is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match=r"timeout=5\) has no effect.*retries=0"):
        op(retries=0, timeout=5.0)(lambda: None)

    @op(retries=5, min_delay=0.0)
    def inner() -> None:
        """Retry five times."""

    with pytest.raises(ConfigurationError, match="stacked over an opero-decorated function"):
        op(timeout=10.0)(inner)
    # Each of these has something to bound: accepted.
    op(timeout=10.0, retries=1)(inner)
    op(retries=0, timeout=5.0, rate_limit=10.0)(lambda: None)
    op(retries=0, timeout=5.0, arg_fallback="hosts")(lambda hosts=("a", "b"): hosts)
    op(timeout=5.0)(lambda: None)  # the default retries=3


@pytest.mark.usefixtures("switch_off")
def test_max_delay_caps_the_schedule_not_a_backoff_function() -> None:
    """max_delay caps the schedule's waits; a backoff_function's wait is slept as returned."""
    waits: list[float] = []

    def down() -> None:
        raise ConnectionError("down")

    schedule = op(
        retries=2,
        min_delay=2.0,
        backoff_factor=10.0,
        max_delay=5.0,
        jitter=False,
        _sleep=waits.append,
    )(down)
    with pytest.raises(ConnectionError):
        schedule()
    assert waits == [2.0, 5.0]
    waits.clear()
    custom = op(
        retries=2, backoff_function=lambda attempt: 100.0, max_delay=1.0, _sleep=waits.append
    )(down)
    with pytest.raises(ConnectionError):
        custom()
    assert waits == [100.0, 100.0]


class _Item:
    """A list item that counts how often it is shown."""

    shown = 0

    def __repr__(self) -> str:
        _Item.shown += 1
        return "item"


def test_a_huge_rejected_result_is_shown_by_its_first_items() -> None:
    """The RetryResultError of a million-item result shows a few items, not all of them."""
    rows = [_Item() for _ in range(1_000_000)]
    _Item.shown = 0

    @op(retries=2, min_delay=0.0, retry_on_result=lambda result: True)
    def fetch() -> list[_Item]:
        return rows

    with pytest.raises(RetryResultError, match=r"on call 3: \[item, item, .*\.\.\.\]") as info:
        fetch()
    assert info.value.result is rows
    assert _Item.shown < 100


@pytest.mark.usefixtures("switch_off")
def test_set_testing_blocks_in_any_exit_order_keep_the_newest_open_state() -> None:
    """Whatever the exit order, the state is the newest open block's, then the original."""
    states: list[State] = [
        (True, 1, True, True),
        (True, None, False, True),
        (True, 2, True, False),
        (True, None, True, True),
        (True, 3, False, False),
    ]
    rng = random.Random(7)
    for _ in range(50):
        blocks = []
        for enabled, attempts, cache, rate_limit in states:
            switch = set_testing(enabled, attempts=attempts, cache=cache, rate_limit=rate_limit)
            switch.__enter__()
            blocks.append((switch, (enabled, attempts, cache, rate_limit)))
        open_blocks = list(blocks)
        for switch, state in rng.sample(blocks, len(blocks)):
            switch.__exit__(None, None, None)
            open_blocks.remove((switch, state))
            assert _testing.state() == (open_blocks[-1][1] if open_blocks else OFF)
