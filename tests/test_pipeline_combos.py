"""Options built on separate branches, used together: keyed limits, deadlines, breakers, testing."""

from __future__ import annotations

import asyncio

import pytest

import opero
from opero import CircuitBreaker, CircuitOpenError, RateLimitTimeout
from opero import opero as op


def _key(x: int) -> str:
    return f"user-{x % 2}"


@pytest.mark.parametrize("keyed", [False, True])
def test_testing_switch_skips_keyed_and_plain_tokens_sync(keyed: bool) -> None:
    """``set_testing(rate_limit=False)`` lets calls through a refusing bucket, keyed or not."""
    extra = {"rate_limit_key": _key} if keyed else {}

    @op(rate_limit=0.001, rate_burst=1, rate_max_wait=0.01, **extra)
    def f(x: int) -> int:
        return x

    assert f(0) == 0
    with pytest.raises(RateLimitTimeout):
        f(2)  # same key (or the one bucket): its only token is gone
    with opero.set_testing(True, rate_limit=False):
        assert [f(2) for _ in range(5)] == [2] * 5
    with pytest.raises(RateLimitTimeout):
        f(2)  # the switch is off again: the bucket refuses as before


@pytest.mark.parametrize("keyed", [False, True])
def test_testing_switch_skips_keyed_and_plain_tokens_async(keyed: bool) -> None:
    """The same bypass holds for an ``async def`` function, keyed or not."""
    extra = {"rate_limit_key": _key} if keyed else {}

    @op(rate_limit=0.001, rate_burst=1, rate_max_wait=0.01, **extra)
    async def f(x: int) -> int:
        return x

    async def main() -> None:
        assert await f(0) == 0
        with pytest.raises(RateLimitTimeout):
            await f(2)
        with opero.set_testing(True, rate_limit=False):
            assert [await f(2) for _ in range(5)] == [2] * 5
        with pytest.raises(RateLimitTimeout):
            await f(2)

    asyncio.run(main())


def test_keyed_token_wait_past_the_deadline_gives_up_before_the_call() -> None:
    """A keyed token wait ending past ``timeout`` raises ``RateLimitTimeout``; no call is made."""
    now = [0.0]
    calls: list[int] = []

    @op(rate_limit=0.5, rate_burst=1, rate_limit_key=_key, timeout=1.0, _clock=lambda: now[0])
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f(0) == 0
    with pytest.raises(RateLimitTimeout):
        f(2)  # the key's next token is ~2 s away, past the 1 s deadline
    assert calls == [0]
    assert f(1) == 1  # another key has its own full bucket


def test_open_breaker_ends_a_retry_loop_under_a_deadline() -> None:
    """Under ``timeout``, an open breaker stops the retries at once with ``CircuitOpenError``."""
    waits: list[float] = []
    calls = [0]
    breaker = CircuitBreaker(failures=2, reset_after=60.0)

    @op(retries=5, timeout=100.0, circuit_breaker=breaker, _sleep=waits.append)
    def f() -> None:
        calls[0] += 1
        raise ConnectionError("down")

    with pytest.raises(CircuitOpenError):
        f()
    assert calls[0] == 2
    assert breaker.state == "open"


def test_rejected_result_is_retried_and_counts_as_a_breaker_success() -> None:
    """``retry_on_result`` retries a rejected result; the breaker sees the calls as successes."""
    results = iter(["pending", "pending", "done"])
    breaker = CircuitBreaker(failures=1, reset_after=60.0)

    @op(
        retries=3,
        retry_on_result=lambda r: r == "pending",
        circuit_breaker=breaker,
        _sleep=lambda s: None,
    )
    def f() -> str:
        return next(results)

    assert f() == "done"
    assert breaker.state == "closed"
    assert breaker.failures == 0
