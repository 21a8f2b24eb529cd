"""Several rate windows: ``rate_limit=[(calls, seconds), ...]``, all of which must admit a call."""

from __future__ import annotations

import asyncio
import random
import sys
import threading
from typing import Any

import pytest

from faultkit import run_scenario
from opero import ConfigurationError, RateLimitTimeout
from opero import opero as op
from opero._opero_core import ManualClock
from opero._ratelimit.windows import MAX_WINDOW_CALLS, Windows, check_windows


def assert_windows_hold(starts: list[float], windows: Any) -> None:
    """Check that no interval [t, t + seconds) holds more than ``calls`` starts, per window."""
    starts = sorted(starts)
    for calls, seconds in windows:
        for i in range(len(starts)):
            j = i
            while j < len(starts) and starts[j] < starts[i] + seconds - 1e-9:
                j += 1
            assert j - i <= calls, (calls, seconds, starts[i], j - i)


def test_a_window_lets_its_calls_go_at_once_then_slides() -> None:
    """(3, 1.0): three calls start at once, the fourth when the first is one second old."""
    clock = ManualClock()
    windows = Windows(((3, 1.0),), clock.now)
    assert [windows.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert windows.reserve() == pytest.approx(1.0)
    clock.advance(0.4)
    assert windows.reserve() == pytest.approx(0.6)  # the second start is due at 1.0 too


def test_all_windows_must_admit_and_are_booked_together() -> None:
    """[(2, 1), (3, 10)]: the third call waits 1 s, the fourth 10 s (the minute-like window)."""
    clock = ManualClock()
    waits: list[float] = []

    @op(rate_limit=[(2, 1.0), (3, 10.0)], retries=0, _rate_clock=clock, _sleep=waits.append)
    def f(i: int) -> int:
        return i

    assert [f(i) for i in range(6)] == list(range(6))
    # Starts: 0, 0, 1 (second window's third), 10, 10, 11; the short window never sees
    # a start it did not admit, the long one never more than 3 in 10 s.
    assert waits == [pytest.approx(w) for w in (1.0, 10.0, 10.0, 11.0)]


def test_random_arrivals_never_break_any_window() -> None:
    """Random arrivals on a manual clock: every window holds over every interval."""
    rng = random.Random(7)
    clock = ManualClock()
    spec = ((5, 1.0), (20, 10.0), (50, 60.0))
    windows = Windows(spec, clock.now)
    starts = []
    for _ in range(400):
        clock.advance(rng.expovariate(8.0))
        starts.append(clock.now() + windows.reserve())
    assert_windows_hold(starts, spec)
    # Work-conserving: the 400th start is no later than the 50-per-minute pace allows.
    assert max(starts) <= 60.0 * (400 / 50) + 60.0


def test_threads_racing_share_the_windows() -> None:
    """8 threads on one window set: the starts they were given hold every window."""
    clock = ManualClock()
    spec = ((4, 1.0), (10, 5.0))
    starts: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            starts.append(clock.now() + seconds)

    @op(rate_limit=list(spec), retries=0, _rate_clock=clock, _sleep=sleep)
    def f(i: int) -> int:
        return i

    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        for i in range(25):
            f(i)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    all_starts = starts + [0.0] * (200 - len(starts))  # calls that did not wait started at 0
    assert len(starts) == 200 - 4
    assert_windows_hold(all_starts, spec)


def test_rate_max_wait_refuses_and_keeps_the_booking() -> None:
    """A wait past rate_max_wait raises RateLimitTimeout; the booked start still counts."""
    clock = ManualClock()

    @op(rate_limit=[(1, 1.0), (2, 60.0)], rate_max_wait=1.5, retries=0, _rate_clock=clock)
    def f() -> str:
        return "ok"

    assert f() == "ok"
    clock.advance(1.0)
    assert f() == "ok"
    with pytest.raises(RateLimitTimeout, match=r"rate_max_wait=1\.5"):
        f()  # the 60 s window is full until t = 60


def test_async_waits_are_awaited() -> None:
    """An async function with windows awaits its wait."""
    clock = ManualClock()
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    @op(rate_limit=[(1, 0.5)], retries=0, _rate_clock=clock, _asleep=asleep)
    async def f(i: int) -> int:
        return i

    async def main() -> list[int]:
        return [await f(i) for i in range(3)]

    assert asyncio.run(main()) == [0, 1, 2]
    assert waits == [pytest.approx(0.5), pytest.approx(1.0)]


def test_windows_per_key() -> None:
    """Windows with a callable key: each key has its own windows."""
    clock = ManualClock()

    @op(
        rate_limit=[(2, 1.0), (3, 60.0)],
        rate_limit_key=lambda user: user,
        rate_max_wait=0,
        retries=0,
        _rate_clock=clock,
    )
    def f(user: str) -> str:
        return user

    assert [f("a"), f("a"), f("b"), f("b")] == ["a", "a", "b", "b"]
    with pytest.raises(RateLimitTimeout):
        f("a")  # refused, but booked at t = 1: a's third call of the minute
    clock.advance(1.0)
    assert f("b") == "b"  # b's third call of the minute
    with pytest.raises(RateLimitTimeout):
        f("a")  # a's minute window is full until t = 60


def test_a_named_window_set_is_shared_by_functions() -> None:
    """A string rate_limit_key with windows: functions share one window set."""

    @op(rate_limit=[(2, 3600.0)], rate_limit_key="windows-shared", rate_max_wait=0, retries=0)
    def f() -> str:
        return "f"

    @op(rate_limit=[(2, 3600.0)], rate_limit_key="windows-shared", rate_max_wait=0, retries=0)
    def g() -> str:
        return "g"

    assert (f(), g()) == ("f", "g")
    with pytest.raises(RateLimitTimeout):
        f()


def test_a_callable_rate_returning_windows_is_refused() -> None:
    """A callable rate_limit returns one rate; windows from it fail that call clearly."""

    @op(rate_limit=lambda: [(1, 1.0)], retries=0)
    def f() -> str:
        return "f"

    with pytest.raises(ConfigurationError, match="rate_limit callable returned"):
        f()


def test_windows_are_normalized_and_sorted() -> None:
    """Windows come back as (int, float) pairs sorted by period."""
    assert check_windows([(500, 60), (10, 1.0)]) == ((10, 1.0), (500, 60.0))


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([], "at least one"),
        ([(0, 1.0)], "calls must be an int"),
        ([(-1, 1.0)], "calls must be an int"),
        ([(1.5, 1.0)], "calls must be an int"),
        ([(True, 1.0)], "calls must be an int"),
        ([(MAX_WINDOW_CALLS + 1, 1.0)], "calls must be an int"),
        ([(1, 0)], "seconds must be finite"),
        ([(1, 1e-7)], "seconds must be finite"),
        ([(1, -1.0)], "seconds must be finite"),
        ([(1, float("nan"))], "seconds must be finite"),
        ([(1, float("inf"))], "seconds must be finite"),
        ([(1, 10**400)], "seconds must be finite"),
        ([(1, 2e9)], "seconds must be finite"),
        ([(1, "1")], "seconds must be a number"),
        ([(1, 1.0, 2)], "pair"),
        ([10, 1.0], "one window is written"),
        ((10, 1.0), "one window is written"),
        (["ab"], "pair"),
        ([(1, 1.0), (2, 1.0)], "two windows of 1 s"),
        ([(1, 1.0), (1, 1.0)], "two windows of 1 s"),
        ([(10, 1.0), (5, 60.0)], "never refuses"),
        ([(10, 1.0), (10, 60.0)], "never refuses"),
    ],
)
def test_bad_windows_name_rate_limit(value: Any, fragment: str) -> None:
    """Malformed windows fail at decoration with ConfigurationError naming rate_limit."""
    with pytest.raises(ConfigurationError, match=r"rate_limit=") as info:
        op(rate_limit=value)
    assert fragment in str(info.value)


def test_windows_with_rate_burst_are_refused() -> None:
    """rate_burst has no meaning for windows (a window's calls are its burst)."""
    with pytest.raises(ConfigurationError, match="drop rate_burst"):
        op(rate_limit=[(10, 1.0)], rate_burst=5)


def test_idle_windows_report_full() -> None:
    """A window set is full again once its last start has left every window."""
    clock = ManualClock()
    windows = Windows(((2, 1.0), (5, 10.0)), clock.now)
    assert windows.is_full()
    windows.reserve()
    clock.advance(9.9)
    assert not windows.is_full()
    clock.advance(0.1)
    assert windows.is_full()


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_fork_while_a_thread_books_does_not_hang_the_child() -> None:
    """A child forked while threads book in a window set can book at once."""
    outcome = run_scenario(
        """
        import os, threading
        from opero import opero

        @opero(rate_limit=[(10**6, 1.0)], retries=0)
        def f():
            return 1

        stop = False
        def spin():
            while not stop:
                f()
        threads = [threading.Thread(target=spin) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                f()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert status == 0, status
        stop = True
        for t in threads:
            t.join()
        print("ok")
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["ok"]
