"""Several rate windows at once: ``rate_limit=[(10, 1.0), (500, 60.0)]``.

A window ``(calls, seconds)`` admits at most ``calls`` starts in any interval of
``seconds`` (a sliding window, as pyrate-limiter's ``Rate(10, Duration.SECOND)``
or a provider's "10 per second and 500 per minute" quota): ``calls`` may start
at once, and the next one when the oldest of the last ``calls`` starts is
``seconds`` old. Each window keeps the starts of its last ``calls`` bookings in
a ring of doubles (8 bytes each), so its memory is ``8 * calls`` bytes at most.

One decision books a call in every window at once: it computes the earliest
start every window admits, and records that start in all of them, under one
lock, so a call is never booked in one window and refused by another. Starts
are booked in non-decreasing order, so each ring stays sorted.

Nothing here sleeps: :meth:`Windows.reserve` returns the seconds to wait.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from opero._pipeline.checks import MAX_SECONDS, show
from opero.errors import ConfigurationError

__all__ = ["MAX_WINDOW_CALLS", "Windows", "check_windows"]

#: The most calls one window may count: it keeps that many start times (8 bytes
#: each), per bucket, so a window of a million calls already holds 8 MB.
MAX_WINDOW_CALLS = 1_000_000

#: The shortest window: one microsecond (Redis counts in microseconds).
MIN_WINDOW_SECONDS = 1e-6

Window = tuple[int, float]

#: Every live :class:`Windows`, so a forked child can replace their locks.
_live: weakref.WeakSet[Windows] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Give each window set a fresh lock in a forked child (a parent thread may hold one)."""
    for windows in list(_live):
        windows._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _bad(value: Any, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"@opero(rate_limit={show(value)}) is invalid: {why}; for example "
        "rate_limit=[(10, 1.0), (500, 60.0)] (at most 10 calls in any second and 500 in "
        "any minute)."
    )


def check_windows(value: Any) -> tuple[Window, ...]:
    """Return ``value`` as windows ``((calls, seconds), ...)``, sorted by ``seconds``.

    Raises:
        ConfigurationError: Naming ``rate_limit``: no window, a window that is not
            a pair, ``calls`` not an int from 1 to :data:`MAX_WINDOW_CALLS`,
            ``seconds`` not finite, > 0 and <= 1e9, the same period twice, or a
            window that can never refuse a call another one admits.

    """
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(value, "a list of windows needs at least one (calls, seconds) pair")
    windows: list[Window] = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            if isinstance(item, (int, float)):
                raise _bad(value, "each window is a pair; one window is written [(calls, seconds)]")
            raise _bad(value, f"each window must be a (calls, seconds) pair, got {show(item)}")
        calls, seconds = item
        if (
            isinstance(calls, bool)
            or not isinstance(calls, int)
            or not 1 <= calls <= MAX_WINDOW_CALLS
        ):
            raise _bad(
                value,
                f"calls must be an int from 1 to {MAX_WINDOW_CALLS:,} (each window keeps its "
                f"last calls' start times), got {show(calls)}",
            )
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise _bad(value, f"seconds must be a number, got {show(seconds)}")
        try:
            period = float(seconds)
        except OverflowError:
            period = math.inf
        if not (math.isfinite(period) and MIN_WINDOW_SECONDS <= period <= MAX_SECONDS):
            raise _bad(
                value,
                f"seconds must be finite, >= {MIN_WINDOW_SECONDS:g} and <= {MAX_SECONDS:g}, "
                f"got {show(seconds)}",
            )
        windows.append((calls, period))
    windows.sort(key=lambda w: (w[1], w[0]))
    for (calls_a, period_a), (calls_b, period_b) in itertools.pairwise(windows):
        if period_a == period_b:
            raise _bad(
                value,
                f"two windows of {period_a:g} s ({calls_a} and {calls_b} calls): keep the "
                "one you mean",
            )
    for calls_a, period_a in windows:
        for calls_b, period_b in windows:
            if period_b > period_a and calls_b <= calls_a:
                raise _bad(
                    value,
                    f"({calls_a}, {period_a:g}) never refuses a call that ({calls_b}, "
                    f"{period_b:g}) admits (fewer calls in a longer period); drop it, or check "
                    "the order (calls, seconds)",
                )
    return tuple(windows)


class _Ring:
    """The start times of the last ``calls`` bookings of one window (sorted, oldest first)."""

    __slots__ = ("calls", "pos", "seconds", "starts")

    def __init__(self, calls: int, seconds: float) -> None:
        self.calls = calls
        self.seconds = seconds
        self.starts = array("d")  # grows to ``calls``, then wraps around at ``pos``
        self.pos = 0


class Windows:
    """A bucket of several sliding windows that must all admit a call.

    Satisfies the token-source contract of ``@opero``: :meth:`reserve` books one
    call and returns the seconds to wait before it may start.

    Args:
        windows: ``((calls, seconds), ...)`` as :func:`check_windows` returns.
        clock: Seconds from a monotonic clock (tests inject a manual one).

    """

    __slots__ = ("__weakref__", "_clock", "_lock", "_rings", "windows")

    def __init__(
        self, windows: Sequence[Window], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.windows = tuple(windows)
        self._rings = tuple(_Ring(calls, seconds) for calls, seconds in self.windows)
        self._clock = clock
        self._lock = threading.Lock()
        _live.add(self)

    def reserve(self, rate: float | None = None) -> float:
        """Book one call in every window; return the seconds to wait before it starts.

        Args:
            rate: Ignored (the windows are fixed); part of the token-source contract.

        """
        with self._lock:
            now = self._clock()
            start = now
            for ring in self._rings:
                starts = ring.starts
                if len(starts) == ring.calls:
                    # The oldest of the last ``calls`` starts must be ``seconds`` old.
                    due = starts[ring.pos] + ring.seconds
                    if due > start:
                        start = due
            for ring in self._rings:
                starts = ring.starts
                if len(starts) < ring.calls:
                    starts.append(start)
                else:
                    starts[ring.pos] = start
                    ring.pos = (ring.pos + 1) % ring.calls
        return start - now

    def is_full(self) -> bool:
        """Whether no booked start counts any more: dropping this bucket loosens nothing."""
        now = self._clock()
        with self._lock:
            for ring in self._rings:
                starts = ring.starts
                if starts and starts[ring.pos - 1] + ring.seconds > now:
                    return False
        return True

    def __repr__(self) -> str:
        """Show the windows."""
        return f"Windows({list(self.windows)!r})"
