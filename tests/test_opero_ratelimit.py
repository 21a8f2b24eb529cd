"""Rate limit of @opero: a token per real call, exact burst + rate*T, callable rates, sharing."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import tracemalloc
import weakref

import pytest

from faultkit import run_scenario
from opero import ConfigurationError, RateLimitTimeout
from opero import opero as op
from opero._opero_core import ManualClock, TokenBucket
from opero._ratelimit import local as _ratelimit
from opero.errors import attempt_errors


class CountingLimiter:
    """A _limiter that grants every token at once and records the rates it was given."""

    def __init__(self) -> None:
        self.rates: list[float | None] = []
        self.lock = threading.Lock()

    def reserve(self, rate: float | None = None) -> float:
        """Record the rate and grant the token now."""
        with self.lock:
            self.rates.append(rate)
        return 0.0

    @property
    def count(self) -> int:
        """Return how many tokens were booked."""
        return len(self.rates)


def assert_window_bound(starts: list[float], rate: float, burst: int) -> None:
    """Check that over every window [s_i, s_j] at most burst + rate*T calls start."""
    starts = sorted(starts)
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            window = starts[j] - starts[i]
            assert j - i + 1 <= burst + rate * window + 1e-9, (i, j, window)


def test_every_real_call_takes_a_token_and_hits_take_none() -> None:
    """Each retry and each fallback candidate takes a token; a cache hit takes none."""
    limiter = CountingLimiter()
    calls: list[str] = []

    @op(cache=True, retries=1, min_delay=0, arg_fallback="ep", _limiter=limiter)
    def f(x: int, ep: list[str] = ["a", "b", "c"]) -> str:  # noqa: B006
        calls.append(ep[0])
        if len(calls) < 5:
            raise ConnectionError
        return ep[0]

    assert f(1) == "b"
    assert calls == ["a", "b", "c", "a", "b"]
    assert limiter.count == 5
    assert f(1) == "b"
    assert limiter.count == 5


def test_single_thread_starts_respect_burst_plus_rate_t() -> None:
    """Call start times from one thread (manual clock) never exceed burst + rate*T."""
    clock = ManualClock()
    bucket = TokenBucket(5.0, 3, clock=clock)
    starts: list[float] = []

    def sleep(seconds: float) -> None:
        clock.advance(seconds)

    @op(retries=0, _limiter=bucket, _sleep=sleep)
    def f() -> None:
        starts.append(clock.now())

    for _ in range(40):
        f()
    assert starts[:3] == [0.0, 0.0, 0.0]
    assert starts[3] == pytest.approx(0.2)
    assert starts[-1] == pytest.approx((40 - 3) / 5.0)
    assert_window_bound(starts, 5.0, 3)


def test_eight_threads_share_one_bucket_exactly() -> None:
    """From 8 threads the granted start times are exactly burst at 0, then one per 1/rate."""
    clock = ManualClock()
    bucket = TokenBucket(10.0, 4, clock=clock)
    starts: list[float] = []
    lock = threading.Lock()
    local = threading.local()

    def sleep(seconds: float) -> None:
        local.delay = seconds

    @op(retries=0, _limiter=bucket, _sleep=sleep)
    def f() -> None:
        with lock:
            starts.append(clock.now() + getattr(local, "delay", 0.0))
        local.delay = 0.0

    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(25):
            f()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert len(starts) == 200
    assert starts[:4] == [0.0] * 4
    expected = [0.0] * 4 + [(k + 1) / 10.0 for k in range(196)]
    assert starts == pytest.approx(expected)
    assert_window_bound(starts, 10.0, 4)


def test_rate_limit_option_spaces_calls_after_the_burst() -> None:
    """rate_limit=1 with rate_burst=3: three calls free, the fourth waits about a second."""
    waits: list[float] = []

    @op(rate_limit=1.0, rate_burst=3, retries=0, _sleep=waits.append)
    def f() -> int:
        return 1

    for _ in range(4):
        f()
    assert len(waits) == 1
    assert 0.5 < waits[0] <= 1.0


def test_zero_wait_never_sleeps() -> None:
    """A call that gets its token at once does not call sleep."""
    waits: list[float] = []
    f = op(rate_limit=1e9, _sleep=waits.append)(lambda: 1)
    for _ in range(100):
        f()
    assert waits == []


def test_callable_rate_is_read_on_every_call() -> None:
    """A zero-argument rate_limit callable is read on each call and changes the spacing."""
    reads: list[float] = []
    current = [1e9]
    waits: list[float] = []

    def rate() -> float:
        reads.append(current[0])
        return current[0]

    f = op(rate_limit=rate, retries=0, _sleep=waits.append)(lambda: 1)
    for _ in range(5):
        f()
    assert len(reads) == 5
    assert waits == []
    current[0] = 0.5
    f()
    f()
    assert len(reads) == 7
    assert waits
    assert waits[-1] > 1.0


def test_callable_rate_with_limiter_gets_the_rate() -> None:
    """With a _limiter, a callable rate is passed to reserve(rate) on every call."""
    limiter = CountingLimiter()
    f = op(rate_limit=lambda: 4.0, _limiter=limiter)(lambda: 1)
    f()
    g = op(rate_limit=4.0, _limiter=limiter)(lambda: 1)
    g()
    assert limiter.rates == [4.0, None]


def test_callable_rate_bad_value_is_reported() -> None:
    """A rate callable returning a bad value raises ConfigurationError naming rate_limit."""
    f = op(rate_limit=lambda: -1, retries=0)(lambda: 1)
    with pytest.raises(ConfigurationError, match="rate_limit callable returned -1"):
        f()


@pytest.mark.parametrize("bad", [10**400, 1e-300, float("nan"), float("inf"), True, None, "5"])
def test_callable_rate_out_of_range_is_a_configuration_error(bad: object) -> None:
    """A bad value from a rate callable is a ConfigurationError naming rate_limit on that call."""
    quota: dict[str, object] = {"rate": 100.0}
    f = op(rate_limit=lambda: quota["rate"], retries=0)(lambda: 1)
    assert f() == 1
    quota["rate"] = bad
    with pytest.raises(ConfigurationError, match="rate_limit callable returned") as info:
        f()
    assert len(str(info.value)) < 300
    quota["rate"] = 100.0
    assert f() == 1


def test_async_callable_rate_out_of_range_is_a_configuration_error() -> None:
    """The async driver reports a bad callable rate the same way."""

    async def g() -> int:
        return 1

    f = op(rate_limit=lambda: 1e-300, retries=0)(g)
    with pytest.raises(ConfigurationError, match="rate_limit callable returned 1e-300"):
        asyncio.run(f())


def test_rate_limit_key_shares_one_bucket_across_functions() -> None:
    """Functions with the same rate_limit_key draw from one bucket."""
    waits: list[float] = []
    a = op(rate_limit=0.001, rate_limit_key="test-shared-key", _sleep=waits.append)(lambda: 1)
    b = op(rate_limit=0.001, rate_limit_key="test-shared-key", _sleep=waits.append)(lambda: 2)
    c = op(rate_limit=0.001, rate_limit_key="test-other-key", _sleep=waits.append)(lambda: 3)
    a()
    assert waits == []
    c()
    assert waits == []
    b()
    assert len(waits) == 1
    assert waits[0] > 100


def test_rate_limit_key_conflict_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A second decoration asking for another rate under a key still in use is logged."""
    first = op(rate_limit=1.0, rate_limit_key="test-conflict-key")(lambda: 1)
    with caplog.at_level(logging.WARNING, logger="opero"):
        op(rate_limit=2.0, rate_limit_key="test-conflict-key")(lambda: 1)
    assert "test-conflict-key" in caplog.text
    assert first() == 1


def test_rate_limit_key_bucket_is_freed_with_its_last_function() -> None:
    """Once every function using a rate_limit_key is gone, its bucket is freed (d17 b)."""
    waits: list[float] = []
    a = op(rate_limit=0.001, rate_limit_key="test-freed-key", _sleep=waits.append)(lambda: 1)
    b = op(rate_limit=0.001, rate_limit_key="test-freed-key", _sleep=waits.append)(lambda: 2)
    ref = weakref.ref(_ratelimit._buckets["test-freed-key"])
    assert a() == 1
    del a
    gc.collect()
    assert ref() is not None  # b still uses it, and its token was taken by a
    assert b() == 2
    assert len(waits) == 1
    del b
    gc.collect()
    assert ref() is None
    assert "test-freed-key" not in _ratelimit._buckets
    c = op(rate_limit=0.001, rate_limit_key="test-freed-key", _sleep=waits.append)(lambda: 3)
    assert c() == 3
    assert len(waits) == 1  # a new, full bucket: no wait


def test_dropped_rate_limit_keys_keep_no_memory() -> None:
    """Decorating, calling and dropping many functions with unique keys keeps < 64 B each."""

    def one(i: int) -> None:
        func = op(retries=0, rate_limit=1000, rate_limit_key=f"test-tenant-{i}")(lambda x: x)
        func(1)

    for i in range(200):
        one(-1 - i)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            one(i)
        gc.collect()
        kept = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
    assert kept < 64
    assert not any(k.startswith("test-tenant-") for k in list(_ratelimit._buckets))


def test_rate_max_wait_raises_rate_limit_timeout() -> None:
    """A token further away than rate_max_wait raises RateLimitTimeout, not retried."""
    waits: list[float] = []
    f = op(rate_limit=0.01, rate_max_wait=1.0, retries=3, _sleep=waits.append)(lambda: 1)
    assert f() == 1
    with pytest.raises(RateLimitTimeout, match=r"rate_max_wait=1\.0"):
        f()
    assert waits == []


def test_rate_limit_wait_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A rate-limit wait is a debug record on the opero logger."""
    f = op(rate_limit=0.01, _sleep=lambda s: None)(lambda: 1)
    with caplog.at_level(logging.DEBUG, logger="opero"):
        f()
        f()
    assert "rate-limit token" in caplog.text


def test_async_rate_limit_awaits_without_blocking() -> None:
    """Async calls take a token each and wait through the async sleep."""
    clock = ManualClock()
    bucket = TokenBucket(2.0, 1, clock=clock)
    starts: list[float] = []

    async def asleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    @op(retries=0, _limiter=bucket, _asleep=asleep)
    async def f() -> None:
        starts.append(clock.now())

    async def main() -> None:
        for _ in range(5):
            await f()

    asyncio.run(main())
    assert starts == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_async_limiter_with_areserve_is_awaited() -> None:
    """A _limiter with areserve() is awaited by async functions (the Redis limiter's shape)."""

    class AsyncLimiter:
        def __init__(self) -> None:
            self.sync = 0
            self.async_ = 0

        def reserve(self, rate: float | None = None) -> float:
            self.sync += 1
            return 0.0

        async def areserve(self, rate: float | None = None) -> float:
            self.async_ += 1
            return 0.0

    limiter = AsyncLimiter()

    @op(_limiter=limiter, retries=1, min_delay=0)
    async def f(fail: list[int]) -> int:
        if fail:
            fail.pop()
            raise ValueError
        return 1

    assert asyncio.run(f([1])) == 1
    assert (limiter.sync, limiter.async_) == (0, 2)


def test_async_tasks_share_the_bucket() -> None:
    """Ten concurrent tasks each book one token from the single shared bucket."""
    clock = ManualClock()
    bucket = TokenBucket(4.0, 2, clock=clock)
    starts: list[float] = []

    async def asleep(seconds: float) -> None:
        await asyncio.sleep(0)

    @op(retries=0, _limiter=bucket, _asleep=asleep)
    async def f() -> None:
        starts.append(clock.now())

    async def main() -> None:
        await asyncio.gather(*(f() for _ in range(10)))

    asyncio.run(main())
    assert len(starts) == 10
    # Ten tokens were booked at clock 0 (two free, eight spaced by 1/4 s), so the
    # eleventh is (11 - 2) / 4 s away.
    assert bucket.reserve() == pytest.approx(9 / 4.0)


def test_all_failed_after_rate_limited_retries() -> None:
    """Retries through a rate limit still end in the last error, with every error kept."""
    limiter = CountingLimiter()
    f = op(retries=2, min_delay=0, _limiter=limiter)(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError) as info:
        f()
    assert len(attempt_errors(info.value)) == 3
    assert limiter.count == 3


#: Scenario helper: fork, run `child()` in the child, and report whether it finished in time.
FORK_HELPER = """
import os, sys, time

def fork_and_check(child, deadline=10.0):
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return False
"""


def test_fork_while_the_key_registry_is_locked_does_not_hang() -> None:
    """A child forked while a parent thread holds the rate_limit_key registry lock can decorate."""
    out = run_scenario(
        FORK_HELPER
        + """
import threading
from opero import opero
from opero._ratelimit import local as _ratelimit

held, release = threading.Event(), threading.Event()

def hold():
    with _ratelimit._buckets_lock:
        held.set()
        release.wait()

t = threading.Thread(target=hold)
t.start()
held.wait()

def child():
    f = opero(rate_limit=5, rate_limit_key="tenant", retries=0)(lambda: 1)
    assert f() == 1

print("child finished" if fork_and_check(child) else "child hung")
release.set()
t.join()
""",
        timeout=60,
    )
    assert out.lines()[-1] == "child finished", out


def test_fork_while_the_shared_limiter_is_busy_does_not_hang() -> None:
    """A child forked while a parent thread waits inside SharedTokenBucket.reserve can reserve."""
    pytest.importorskip("fcntl")
    out = run_scenario(
        FORK_HELPER
        + """
import fcntl, threading
from opero._ratelimit import SharedTokenBucket

bucket = SharedTokenBucket(1000.0, 10)
bucket.reserve()
blocker = os.open(bucket.path, os.O_RDWR)
fcntl.flock(blocker, fcntl.LOCK_EX)  # the parent thread will wait in flock, holding its lock
t = threading.Thread(target=bucket.reserve)
t.start()
while not bucket._lock.locked():
    time.sleep(0.001)

def child():
    os.close(blocker)
    assert bucket.reserve() >= 0.0

def release_soon():
    time.sleep(0.2)
    fcntl.flock(blocker, fcntl.LOCK_UN)
threading.Thread(target=release_soon).start()
print("child finished" if fork_and_check(child) else "child hung")
t.join()
""",
        timeout=60,
    )
    assert out.lines()[-1] == "child finished", out


def test_fork_while_threads_use_rate_limited_functions_does_not_hang() -> None:
    """Children forked while threads call rate-limited functions all finish their own calls."""
    out = run_scenario(
        FORK_HELPER
        + """
import sys, threading
from opero import opero

sys.setswitchinterval(1e-6)
quota = {"rate": 1e6}

@opero(rate_limit=lambda: quota["rate"], retries=0)
def by_callable(x):
    return x

@opero(rate_limit=1e6, rate_burst=100, rate_limit_key="shared", retries=0)
def by_key(x):
    return x

@opero(rate_limit=1e6, retries=0)
def static(x):
    return x

stop = threading.Event()

def spin(n):
    i = 0
    while not stop.is_set():
        quota["rate"] = 1e6 + (i % 5)
        by_callable(i); by_key(i); static(i)
        opero(rate_limit=1e6, rate_limit_key=f"k{n}-{i % 3}", retries=0)(lambda: 1)()
        i += 1

threads = [threading.Thread(target=spin, args=(n,)) for n in range(3)]
for t in threads:
    t.start()

def child():
    quota["rate"] = 2e6
    for i in range(3):
        assert by_callable(i) == i and by_key(i) == i and static(i) == i
    assert opero(rate_limit=5, rate_limit_key="k0-1", retries=0)(lambda: 1)() == 1

results = [fork_and_check(child) for _ in range(30)]
stop.set()
for t in threads:
    t.join()
print(f"{sum(results)} of {len(results)} children finished")
""",
        timeout=120,
    )
    assert out.lines()[-1] == "30 of 30 children finished", out


def test_redis_backend_without_redis_py_is_a_configuration_error() -> None:
    """rate_limit_backend='redis' without redis-py fails at decoration, saying what to install."""
    out = run_scenario(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        from opero import ConfigurationError, opero

        try:
            opero(rate_limit=5, rate_limit_backend="redis", rate_limit_key="k")(lambda: 1)
        except ConfigurationError as exc:
            print("ConfigurationError:", exc)
        """,
        timeout=60,
    )
    assert out.lines() == [
        "ConfigurationError: rate_limit_backend='redis' needs redis-py: pip install 'opero[redis]'"
    ], out
