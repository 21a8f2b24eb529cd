"""Hostile-user attacks on ``CircuitBreaker``: each test is a defect found and fixed (or xfailed).

Hang-prone scenarios (deadlocks, cancellation, signals) run through
:func:`faultkit.run_scenario` with a deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from faultkit import run_scenario
from opero import CircuitBreaker, opero


class Clock:
    """A manual clock for a breaker's local state."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        """Return the current manual time."""
        return self.now


def _open_breaker(
    failures: int = 1, reset_after: float = 10.0, **kw: Any
) -> tuple[CircuitBreaker, Clock]:
    breaker = CircuitBreaker(failures=failures, reset_after=reset_after, **kw)
    clock = Clock()
    breaker._clock = clock
    return breaker, clock


def _trip(breaker: CircuitBreaker, clock: Clock) -> None:
    """Open ``breaker`` with one failure of a throwaway function, then reach half-open."""

    @opero(retries=0, circuit_breaker=breaker)
    def down() -> None:
        raise ConnectionError("down")

    for _ in range(breaker.failure_threshold):
        with pytest.raises(ConnectionError):
            down()
    assert breaker.state == "open"
    clock.now += breaker.reset_after + 1
    assert breaker.state == "half_open"


# --- a probe admitted, then the step before the call raises: its slot must come back ---


def test_probe_slot_returned_when_the_rate_limit_key_function_raises() -> None:
    """A half-open probe whose rate-limit key function raises gives its slot back (no call)."""
    breaker, clock = _open_breaker()
    _trip(breaker, clock)
    bad = [True]

    def key(x: int) -> str:
        if bad[0]:
            raise ValueError("key function failed")
        return str(x)

    @opero(retries=0, circuit_breaker=breaker, rate_limit=1000, rate_limit_key=key)
    def fetch(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="key function failed"):
        fetch(1)
    assert breaker._probes == {}
    bad[0] = False
    assert fetch(2) == 2  # the next call is the probe, and it closes the circuit
    assert breaker.state == "closed"


def test_probe_slot_returned_when_the_token_wait_is_interrupted() -> None:
    """A probe interrupted (KeyboardInterrupt) while sleeping for its token gives its slot back."""
    breaker, clock = _open_breaker()
    _trip(breaker, clock)
    interrupt = [True]

    def sleep(seconds: float) -> None:
        if interrupt[0]:
            raise KeyboardInterrupt

    @opero(retries=0, circuit_breaker=breaker, rate_limit=1, rate_burst=1, _sleep=sleep)
    def fetch(x: int) -> int:
        return x

    assert fetch(0) == 0  # the probe closes it and takes the only token
    _trip(breaker, clock)
    with pytest.raises(KeyboardInterrupt):
        fetch(1)  # the probe must wait for a token: interrupted there
    assert breaker._probes == {}
    assert breaker.state == "half_open"
    interrupt[0] = False
    assert fetch(2) == 2
    assert breaker.state == "closed"


def test_async_probe_slot_returned_when_cancelled_waiting_for_its_token() -> None:
    """An async probe cancelled while it waits for a rate-limit token gives its slot back."""
    breaker, clock = _open_breaker()

    @opero(retries=0, circuit_breaker=breaker, rate_limit=0.5, rate_burst=1)
    async def fetch(x: int) -> int:
        return x

    async def main() -> None:
        assert await fetch(0) == 0  # takes the only token
        _trip(breaker, clock)
        task = asyncio.create_task(fetch(1))  # the probe waits ~2 s for a token
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(breaker._probes) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker._probes == {}

    asyncio.run(main())
    assert breaker.state == "half_open"


def test_probe_slot_returned_when_the_retry_backoff_is_interrupted() -> None:
    """A retry-loop probe interrupted in its backoff sleep gives its slot back."""
    breaker, clock = _open_breaker(failure_on=ConnectionError)
    interrupt = [True]

    def sleep(seconds: float) -> None:
        if interrupt[0]:
            raise KeyboardInterrupt

    @opero(retries=0, circuit_breaker=breaker)
    def other() -> None:
        raise ConnectionError("down")

    calls: list[int] = []

    @opero(retries=2, min_delay=1.0, circuit_breaker=breaker, _sleep=sleep)
    def fetch(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            # Admitted while closed: open it through another function, let it
            # half-open, and fail with an error outside failure_on (not counted).
            with pytest.raises(ConnectionError):
                other()
            clock.now += breaker.reset_after + 1
            raise ValueError("bad input")
        return x

    with pytest.raises(KeyboardInterrupt):
        fetch(1)  # attempt 2 is a probe, interrupted in its backoff sleep
    assert calls == [1]
    assert breaker._probes == {}
    interrupt[0] = False
    assert fetch(2) == 2
    assert breaker.state == "closed"


def test_async_probe_slot_returned_when_cancelled_in_the_retry_backoff() -> None:
    """An async retry-loop probe cancelled in its backoff gives its slot back."""
    breaker, clock = _open_breaker(failure_on=ConnectionError)
    forever = asyncio.Event()

    async def asleep(seconds: float) -> None:
        await forever.wait()

    @opero(retries=0, circuit_breaker=breaker)
    async def other() -> None:
        raise ConnectionError("down")

    calls: list[int] = []

    @opero(retries=2, min_delay=1.0, circuit_breaker=breaker, _asleep=asleep)
    async def fetch(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            with pytest.raises(ConnectionError):
                await other()
            clock.now += breaker.reset_after + 1
            raise ValueError("bad input")
        return x

    async def main() -> None:
        task = asyncio.create_task(fetch(1))
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(breaker._probes) == 1  # the probe waits in its backoff
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker._probes == {}

    asyncio.run(main())
    assert calls == [1]
    assert breaker.state == "half_open"


# --- no lock held across user code ----------------------------------------------------


def test_a_cause_whose_del_calls_the_guarded_function_does_not_deadlock() -> None:
    """Dropping the failure that opened the circuit runs its ``__del__`` outside the lock."""
    outcome = run_scenario(
        """
        from opero import CircuitBreaker, opero

        breaker = CircuitBreaker(failures=1, reset_after=60.0)

        class Down(ConnectionError):
            def __del__(self):
                try:
                    print("del called:", ping(0), flush=True)
                except Exception as exc:
                    print("del called:", type(exc).__name__, flush=True)

        @opero(retries=0, circuit_breaker=breaker)
        def ping(x):
            if x:
                raise Down("down")
            return "pong"

        try:
            ping(1)
        except Down:
            pass
        breaker.reset()  # drops the cause (the last reference to the Down)
        print("reset:", breaker.state, flush=True)
        try:
            ping(1)
        except Down:
            pass
        breaker._clock = lambda: 1e12  # half-open: the probe fails and replaces the cause
        try:
            ping(1)
        except Down:
            pass
        print("reopened:", breaker.state, flush=True)
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    lines = outcome.lines()
    assert lines[:2] == ["del called: pong", "reset: closed"]
    assert "reopened: open" in lines
    assert lines[2:4] == ["del called: CircuitOpenError", "reopened: open"]
