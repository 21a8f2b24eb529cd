"""TokenBucket (GCRA) under a manual clock: burst, spacing, the window bound, bad input."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from opero._opero_core import ManualClock, TokenBucket


def test_burst_is_free_then_spaced_by_the_interval() -> None:
    """The first `burst` reservations are free, the next ones wait k/rate."""
    b = TokenBucket(4.0, 2, clock=ManualClock())
    delays = [b.reserve() for _ in range(5)]
    assert delays[:2] == [0.0, 0.0]
    assert delays[2:] == pytest.approx([0.25, 0.5, 0.75])


def test_try_acquire_only_takes_free_tokens() -> None:
    """try_acquire takes a token only when one is free now and never reserves ahead."""
    clock = ManualClock()
    b = TokenBucket(1.0, 1, clock=clock)
    assert b.try_acquire() is True
    assert b.try_acquire() is False
    clock.advance(0.999)
    assert b.try_acquire() is False
    clock.advance(0.001)
    assert b.try_acquire() is True


def test_idle_time_refills_up_to_burst_only() -> None:
    """After a long idle period at most `burst` calls are free."""
    clock = ManualClock()
    b = TokenBucket(10.0, 3, clock=clock)
    clock.advance(1000.0)
    free = sum(b.try_acquire() for _ in range(10))
    assert free == 3


def test_set_rate_changes_spacing_and_keeps_the_debt() -> None:
    """A lower rate rescales the tokens owed; new reservations are spaced at the new rate."""
    clock = ManualClock()
    b = TokenBucket(10.0, 1, clock=clock)
    assert b.reserve() == 0.0
    assert b.reserve() == pytest.approx(0.1)
    b.set_rate(1.0)
    assert b.rate == 1.0
    assert b.reserve() == pytest.approx(2.0)
    assert b.reserve() == pytest.approx(3.0)


def test_raised_rate_never_schedules_before_booked_reservations() -> None:
    """A higher rate spaces new reservations after the last booked one, not between them (d12)."""
    clock = ManualClock()
    b = TokenBucket(50.0, 1, clock=clock)
    assert b.reserve() == 0.0
    booked = [b.reserve() for _ in range(20)]
    assert booked[-1] == pytest.approx(0.4)
    b.set_rate(100.0)
    later = [b.reserve() for _ in range(30)]
    assert later[0] == pytest.approx(0.41)
    assert later[-1] == pytest.approx(0.70)
    starts = [0.0, *booked, *later]
    assert window_counts_ok(starts, 100.0, 1, 0.2)


def test_properties_and_repr() -> None:
    """The rate and burst read back; the repr names them."""
    b = TokenBucket(2.5, 4)
    assert (b.rate, b.burst) == (2.5, 4)
    assert repr(b) == "TokenBucket(rate=2.5, burst=4)"


def test_default_clock_is_unthrottled_at_huge_rates() -> None:
    """With the real clock and a huge rate every reservation is free."""
    b = TokenBucket(1e12, 1000)
    assert all(b.reserve() == 0.0 for _ in range(1000))


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((0,), {}, ValueError, "rate must be a finite number of calls per second > 0"),
        ((-1.0,), {}, ValueError, "rate"),
        ((math.nan,), {}, ValueError, "rate"),
        ((math.inf,), {}, ValueError, "rate"),
        ((1e-320,), {}, ValueError, "rate"),
        (("fast",), {}, TypeError, "rate"),
        ((1.0, 0), {}, ValueError, "burst must be an int between 1"),
        ((1.0, -3), {}, ValueError, "burst"),
        ((1.0, 2**40), {}, ValueError, "burst"),
        ((1e-300,), {}, ValueError, "rate must be at least 1e-9 calls per second"),
        ((1.0, 1.5), {}, TypeError, "burst"),
        ((1.0,), {"clock": object()}, TypeError, "clock"),
    ],
)
def test_bad_constructor_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    """Each bad argument raises ValueError/TypeError naming it and the accepted range."""
    with pytest.raises(exc, match=match):
        TokenBucket(*args, **kwargs)


def test_bad_set_rate_keeps_the_old_rate() -> None:
    """A rejected set_rate leaves the bucket unchanged."""
    b = TokenBucket(3.0)
    for bad in (0.0, -2.0, math.nan, math.inf, 1e-300):
        with pytest.raises(ValueError, match="rate"):
            b.set_rate(bad)
    assert b.rate == 3.0


def test_manual_clock_rejects_bad_moves() -> None:
    """ManualClock refuses negative, NaN and infinite steps and non-finite starts."""
    c = ManualClock(5.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="seconds"):
            c.advance(bad)
    assert c.now() == 5.0
    with pytest.raises(ValueError, match="start"):
        ManualClock(math.nan)
    assert "5.0" in repr(c)


def window_counts_ok(times: list[float], rate: float, burst: int, window: float) -> bool:
    """Return whether every window [t, t + window] holds at most burst + rate*window times."""
    times = sorted(times)
    limit = burst + rate * window + 1e-9
    j = 0
    for i, start in enumerate(times):
        j = max(j, i)
        # 1 us of slack for float rounding of the clock readings.
        while j < len(times) and times[j] <= start + window - 1e-6:
            j += 1
        if j - i > limit:
            return False
    return True


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 6),
    steps=st.lists(
        st.tuples(st.floats(0.0, 0.5), st.sampled_from(["reserve", "try"])),
        min_size=1,
        max_size=120,
    ),
    window=st.floats(0.05, 3.0),
)
def test_never_more_than_burst_plus_rate_times_t(
    rate: float, burst: int, steps: list[tuple[float, str]], window: float
) -> None:
    """In any window T, at most burst + rate*T calls start (free grants and delayed starts)."""
    clock = ManualClock()
    b = TokenBucket(rate, burst, clock=clock)
    starts: list[float] = []
    for dt, op in steps:
        clock.advance(dt)
        now = clock.now()
        if op == "reserve":
            delay = b.reserve()
            assert delay >= 0.0
            starts.append(now + delay)
        elif b.try_acquire():
            starts.append(now)
    assert window_counts_ok(starts, rate, burst, window)


def window_counts_ok_varying(
    starts: list[tuple[float, float]],
    burst: int,
    window: float,
    rates: list[tuple[float, float]] | None = None,
) -> bool:
    """Whether each window holds at most burst + r*window starts.

    r is the highest rate that could have paid for a start inside the window: the
    rate each start was booked at, and every rate in force during the window
    (``rates``: the (time, rate) settings, in order), since tokens accrue at the
    rate in force even while nobody calls.
    """
    starts = sorted(starts)
    rates = rates or []
    for i, (start, _) in enumerate(starts):
        end = start + window - 1e-6
        inside = [r for t, r in starts[i:] if t <= end]
        before = [r for t, r in rates if t <= start]
        during = [r for t, r in rates if start < t <= end]
        highest = max(inside + (before[-1:] if before else []) + during)
        if len(inside) > burst + highest * window + 1e-9:
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 6),
    steps=st.lists(
        st.tuples(
            st.floats(0.0, 0.5),
            st.sampled_from(["reserve", "reserve", "try", "rate"]),
            st.floats(0.5, 100.0),
        ),
        min_size=1,
        max_size=120,
    ),
    window=st.floats(0.05, 3.0),
)
@example(  # a token earned at rate 4 while nobody called, spent after a drop to 1
    rate=1.0,
    burst=6,
    steps=[(0.0, "reserve", 1.0)] * 6
    + [(0.0, "rate", 4.0), (0.25, "rate", 1.0)]
    + [(0.0, "reserve", 1.0)],
    window=0.3,
)
def test_never_more_than_burst_plus_rate_times_t_when_the_rate_changes(
    rate: float, burst: int, steps: list[tuple[float, str, float]], window: float
) -> None:
    """With set_rate mixed in, any window T holds at most burst + r*T starts (r: highest rate).

    The highest rate is the one any start inside was booked at, or any rate in force
    during the window (the bucket earns tokens at the rate in force).
    """
    clock = ManualClock()
    b = TokenBucket(rate, burst, clock=clock)
    starts: list[tuple[float, float]] = []
    rates: list[tuple[float, float]] = [(clock.now(), rate)]
    for dt, op, new_rate in steps:
        clock.advance(dt)
        now = clock.now()
        if op == "rate":
            b.set_rate(new_rate)
            rates.append((now, new_rate))
        elif op == "reserve":
            delay = b.reserve()
            assert delay >= 0.0
            starts.append((now + delay, b.rate))
        elif b.try_acquire():
            starts.append((now, b.rate))
    assert window_counts_ok_varying(starts, burst, window, rates)


@settings(max_examples=50, deadline=None)
@given(rate=st.floats(0.5, 100.0), burst=st.integers(1, 5), n=st.integers(1, 60))
def test_delayed_reservations_are_spaced_one_interval_apart(
    rate: float, burst: int, n: int
) -> None:
    """Back-to-back reservations: free up to burst, then each one 1/rate after the last."""
    b = TokenBucket(rate, burst, clock=ManualClock())
    delays = [b.reserve() for _ in range(n)]
    assert delays[: min(n, burst)] == [0.0] * min(n, burst)
    for prev, cur in zip(delays[burst:], delays[burst + 1 :], strict=False):
        assert cur - prev == pytest.approx(1.0 / rate)


def test_threads_share_the_bucket_exactly() -> None:
    """Reservations from many threads under one frozen clock are all distinct slots."""
    b = TokenBucket(100.0, 5, clock=ManualClock())
    delays: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(200):
            d = b.reserve()
            with lock:
                delays.append(d)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    delays.sort()
    assert delays[:5] == [0.0] * 5
    expected = [(i + 1) / 100.0 for i in range(795)]
    assert delays[5:] == pytest.approx(expected)
