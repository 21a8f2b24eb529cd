"""timeout= (a deadline for the whole call) and attempt_timeout= (per async attempt)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import opero
from opero import ConfigurationError, RateLimitTimeout
from opero import opero as op
from opero.errors import attempt_errors


class Clock:
    """A manual monotonic clock: sleeping advances it, and a call may take time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []
        self.reads = 0

    def __call__(self) -> float:
        """Return the current time (and count the read)."""
        self.reads += 1
        return self.now

    def sleep(self, seconds: float) -> None:
        """Record the wait and advance the clock by it."""
        self.waits.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        """Async :meth:`sleep`."""
        self.sleep(seconds)


def options(clock: Clock, **more: Any) -> dict[str, Any]:
    """Return the options of a decoration on ``clock`` with a fixed 1 s schedule."""
    return {
        "_clock": clock,
        "_sleep": clock.sleep,
        "_asleep": clock.asleep,
        "min_delay": 1.0,
        "backoff_factor": 1.0,
        "jitter": False,
        **more,
    }


def test_no_wait_begins_that_would_end_past_the_deadline() -> None:
    """With 1 s waits and calls taking 0.5 s, timeout=4 allows three calls, then the last error."""
    clock = Clock()
    calls: list[float] = []

    @op(retries=10, timeout=4.0, **options(clock))
    def down() -> None:
        calls.append(clock.now)
        clock.now += 0.5
        raise ConnectionError(len(calls))

    with pytest.raises(ConnectionError) as info:
        down()
    # starts at 100, 101.5, 103; after the third call (ends 103.5) a 1 s wait would end at 104.5
    assert calls == [100.0, 101.5, 103.0]
    assert clock.waits == [1.0, 1.0]
    assert (
        "gave up: the next retry (after a wait of 1 s) would end past timeout=4 s"
        in (info.value.__notes__[-1])
    )
    assert len(attempt_errors(info.value)) == 3


def test_the_first_attempt_counts_toward_the_deadline() -> None:
    """A first call that used the whole timeout is not retried."""
    clock = Clock()

    @op(retries=3, timeout=2.0, **options(clock))
    def slow() -> None:
        clock.now += 2.5
        raise ConnectionError("slow and failed")

    with pytest.raises(ConnectionError) as info:
        slow()
    assert clock.waits == []
    assert "past timeout=2 s" in info.value.__notes__[-1]


def test_success_reads_the_clock_once() -> None:
    """A call that succeeds reads the clock once (at its start) and never again."""
    clock = Clock()
    f = op(retries=3, timeout=5.0, **options(clock))(lambda x: x + 1)

    def plain(x: int) -> int:
        return x + 1

    g = op(retries=3, timeout=5.0, **options(clock))(plain)
    assert f(1) == 2
    assert g(1) == 2
    assert clock.reads == 2


def test_server_wait_past_the_deadline_gives_up_at_once() -> None:
    """A Retry-After that would end past the deadline gives up without waiting."""
    clock = Clock()
    busy = ConnectionError("busy")
    busy.retry_after = 5  # type: ignore[attr-defined]

    @op(retries=3, timeout=3.0, **options(clock))
    def call() -> None:
        raise busy

    with pytest.raises(ConnectionError) as info:
        call()
    assert clock.waits == []
    assert "(after a wait of 5 s) would end past timeout=3 s" in info.value.__notes__[-1]


def test_fallback_candidates_stop_at_the_deadline() -> None:
    """No fallback candidate starts after the deadline; the chain ends with AllFailedError."""
    clock = Clock()
    tried: list[str] = []

    @op(retries=2, timeout=1.0, arg_fallback="hosts", **options(clock))
    def fetch(hosts: tuple[str, ...] = ("a", "b", "c")) -> None:
        tried.append(hosts[0])
        clock.now += 0.6
        raise ConnectionError(hosts[0])

    with pytest.raises(opero.AllFailedError, match="past timeout=1 s") as info:
        fetch()
    assert tried == ["a", "b"]
    assert len(info.value.errors) == 2


def test_token_wait_past_the_deadline_before_any_call_is_rate_limit_timeout() -> None:
    """A first token wait that would end past the deadline raises RateLimitTimeout, no call."""
    clock = Clock()
    calls: list[int] = []

    @op(rate_limit=0.1, timeout=2.0, **options(clock))  # a token every 10 s
    def limited(x: int) -> int:
        calls.append(x)
        return x

    assert limited(1) == 1  # the burst token
    with pytest.raises(RateLimitTimeout, match="past timeout=2 s"):
        limited(2)
    assert calls == [1]


def test_token_wait_past_the_deadline_after_a_failure_raises_the_last_error() -> None:
    """A retry's token wait ending past the deadline gives up with the function's last error."""
    clock = Clock()
    calls: list[int] = []

    class Limiter:
        def reserve(self, rate: float | None = None) -> float:
            return 0.0 if not calls else 30.0

    @op(retries=3, timeout=10.0, _limiter=Limiter(), **options(clock))
    def call() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError) as info:
        call()
    assert calls == [1]
    assert "rate-limit token is 30.000 s away" in info.value.__notes__[-1]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "10"])
def test_bad_timeouts_are_refused_at_decoration(bad: Any) -> None:
    """Timeout and attempt_timeout must be positive seconds, refused at decoration."""
    with pytest.raises(ConfigurationError, match="timeout"):
        op(timeout=bad)
    with pytest.raises(ConfigurationError, match="attempt_timeout"):
        op(attempt_timeout=bad)


def test_attempt_timeout_on_a_sync_function_says_why() -> None:
    """attempt_timeout on a def function is refused at decoration, suggesting timeout=."""
    with pytest.raises(ConfigurationError, match=r"a thread cannot be cancelled.*timeout="):

        @op(attempt_timeout=1.0)
        def sync() -> None: ...


def test_async_deadline_with_manual_clock() -> None:
    """The async driver gives up at the deadline exactly like the sync one."""
    clock = Clock()
    calls: list[float] = []

    @op(retries=10, timeout=4.0, **options(clock))
    async def down() -> None:
        calls.append(clock.now)
        clock.now += 0.5
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        asyncio.run(down())
    assert calls == [100.0, 101.5, 103.0]


def test_attempt_timeout_cancels_and_retries() -> None:
    """A hung async attempt is cancelled after attempt_timeout and retried as TimeoutError."""
    calls: list[int] = []
    retried: list[BaseException] = []

    @op(
        retries=2,
        attempt_timeout=0.05,
        retry_on=ConnectionError,  # TimeoutError is retried anyway: it is opero's own
        on_retry=retried.append,
        _asleep=lambda s: asyncio.sleep(0),
    )
    async def hangs_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(30)
        return "ok"

    assert asyncio.run(asyncio.wait_for(hangs_once(), 20)) == "ok"
    assert len(calls) == 2
    assert type(retried[0]) is TimeoutError
    assert "attempt_timeout=0.05 s" in str(retried[0])


def test_attempt_timeout_exhausted_raises_timeout_error() -> None:
    """When every attempt times out, the last TimeoutError propagates with every error kept."""

    @op(retries=1, attempt_timeout=0.02, _asleep=lambda s: asyncio.sleep(0))
    async def hangs() -> None:
        await asyncio.sleep(30)

    with pytest.raises(TimeoutError) as info:
        asyncio.run(asyncio.wait_for(hangs(), 20))
    assert len(attempt_errors(info.value)) == 2


def test_functions_own_timeout_error_follows_retry_on() -> None:
    """A TimeoutError the function raises itself is not opero's: retry_on decides."""
    calls: list[int] = []

    @op(retries=3, attempt_timeout=5.0, retry_on=ConnectionError)
    async def own() -> None:
        calls.append(1)
        raise TimeoutError("the function's own")

    with pytest.raises(TimeoutError, match="own"):
        asyncio.run(own())
    assert calls == [1]


def test_cancelled_caller_is_never_retried() -> None:
    """Cancelling the caller during an attempt cancels the call: no retry, no TimeoutError."""
    calls: list[int] = []

    @op(retries=5, attempt_timeout=10.0, timeout=60.0)
    async def slow() -> None:
        calls.append(1)
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 20))
    assert calls == [1]


def test_cache_hit_never_consults_the_deadline() -> None:
    """With a cache, a hit returns without reading the deadline clock."""
    clock = Clock()

    @op(cache=True, retries=2, timeout=1.0, **options(clock))
    def square(x: int) -> int:
        return x * x

    assert square(3) == 9
    reads = clock.reads
    clock.now += 1000.0  # far past any deadline
    assert square(3) == 9
    assert clock.reads == reads


def test_timeout_under_testing_counts_only_the_calls() -> None:
    """Under set_testing waits are zero, so a timeout counts only the calls' own time."""
    clock = Clock()
    calls: list[int] = []

    @op(retries=4, timeout=1.0, **options(clock))
    def down() -> None:
        calls.append(1)
        clock.now += 0.3
        raise ConnectionError("down")

    with opero.set_testing(), pytest.raises(ConnectionError):
        down()
    assert clock.waits == []
    assert len(calls) == 4  # ends at 100.3, .6, .9, 1.2: the 4th call ended past the deadline


# --- the native first call (default clock) -----------------------------------------------


def test_first_attempt_duration_counts_on_the_real_clock() -> None:
    """With the default clock, a first call that outlasts the timeout is not retried."""
    calls: list[int] = []

    @op(retries=5, timeout=0.2, min_delay=0.0)
    def slow() -> None:
        calls.append(1)
        time.sleep(0.3)
        raise ConnectionError("slow")

    with pytest.raises(ConnectionError) as info:
        slow()
    assert calls == [1]
    assert "past timeout=0.2 s" in info.value.__notes__[-1]


def test_real_clock_deadline_bounds_the_retries() -> None:
    """With the default clock and 50 ms waits, timeout=0.3 stops long before 100 retries."""
    calls: list[int] = []

    @op(retries=100, timeout=0.3, min_delay=0.05, backoff_factor=1.0, jitter=False)
    def down(x: int, *, scale: int = 1) -> None:
        calls.append(x * scale)
        raise ConnectionError("down")

    started = time.monotonic()
    with pytest.raises(ConnectionError):
        down(2, scale=3)
    assert 2 <= len(calls) <= 7
    assert set(calls) == {6}  # every retry got the same arguments
    assert time.monotonic() - started < 5.0  # generous: a loaded 2-core box


def test_native_first_call_success_and_base_exceptions() -> None:
    """A success returns the value; a BaseException that is not an Exception is never retried."""
    calls: list[int] = []

    class Stop(BaseException):
        """Not an Exception: never retried."""

    @op(retries=3, timeout=10.0)
    def f(x: int) -> int:
        calls.append(x)
        if x < 0:
            raise Stop
        return x * 2

    assert f(4) == 8
    with pytest.raises(Stop):
        f(-1)
    assert calls == [4, -1]
    assert f.__name__ == "f"
    assert f.__wrapped__(5) == 10


def test_native_first_call_binds_as_a_method() -> None:
    """A method decorated with timeout= receives its instance, on success and on retry."""
    seen: list[Any] = []

    class Client:
        def __init__(self) -> None:
            self.fails = 1

        @op(retries=2, timeout=10.0, min_delay=0.0)
        def get(self, path: str) -> str:
            seen.append(self)
            if self.fails:
                self.fails -= 1
                raise ConnectionError(path)
            return f"got {path}"

    client = Client()
    assert client.get("/x") == "got /x"
    assert seen == [client, client]


def test_callbacks_at_the_deadline() -> None:
    """on_retry fires only for retries that happen; on_failure fires once at the give-up."""
    clock = Clock()
    retried: list[int] = []
    failed: list[BaseException] = []

    @op(
        retries=10,
        timeout=2.5,
        on_retry=lambda exc, attempt: retried.append(attempt),
        on_failure=failed.append,
        **options(clock),
    )
    def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError) as info:
        down()
    assert retried == [0, 1]  # waits end at 101 and 102; a third would end at 103 > 102.5
    assert failed == [info.value]


@pytest.mark.redis
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_redis_token_wait_past_the_deadline(redis_url: str, is_async: bool) -> None:
    """A shared Redis bucket's token wait past the deadline raises RateLimitTimeout, no call."""
    calls: list[int] = []
    options: dict[str, Any] = {
        "rate_limit": 0.01,  # a token every 100 s
        "rate_limit_backend": "redis",
        "rate_limit_key": f"deadline-{is_async}",
        "rate_limit_redis_url": redis_url,
        "timeout": 5.0,
    }
    if is_async:

        @op(**options)
        async def alimited(x: int) -> int:
            calls.append(x)
            return x

        def limited(x: int) -> int:
            return asyncio.run(alimited(x))  # type: ignore[no-any-return]

    else:

        @op(**options)
        def limited(x: int) -> int:
            calls.append(x)
            return x

    assert limited(1) == 1  # the burst token
    with pytest.raises(RateLimitTimeout, match="past timeout=5 s"):
        limited(2)
    assert calls == [1]
