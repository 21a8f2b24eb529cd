"""Per-key and multi-window rate limits in Redis: a key per bucket, one script per decision."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis

from opero import RateLimitTimeout
from opero import opero as op
from opero._ratelimit.redis import RedisRateLimiter

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis


def _window_bound(starts: list[float], windows: Any) -> None:
    """Assert no interval [t, t + seconds) holds more than ``calls`` starts, per window."""
    starts = sorted(starts)
    for calls, seconds in windows:
        for i in range(len(starts)):
            j = i
            while j < len(starts) and starts[j] < starts[i] + seconds - 2e-6:
                j += 1
            assert j - i <= calls, (calls, seconds, starts[i], j - i)


def test_each_returned_key_is_its_own_redis_bucket(redis_url: str) -> None:
    """A callable key: one Redis key per returned name, each with an expiry."""

    @op(
        rate_limit=1.0,
        rate_burst=2,
        rate_limit_key=lambda user: f"user:{user}",
        rate_limit_backend="redis",
        rate_limit_redis_url=redis_url,
        rate_max_wait=0,
        retries=0,
    )
    def f(user: str) -> str:
        return user

    assert [f("ann"), f("ann"), f("bob"), f("bob")] == ["ann", "ann", "bob", "bob"]
    with pytest.raises(RateLimitTimeout):
        f("ann")
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in client.keys("*"))
    assert keys == ["{opero:rl:user:ann}", "{opero:rl:user:bob}"]
    assert all(0 < client.pttl(k) <= 4000 for k in keys)


def test_keyed_async_books_in_redis(redis_url: str) -> None:
    """The async wrapper books per key through redis.asyncio."""

    @op(
        rate_limit=1.0,
        rate_limit_key=lambda host: host,
        rate_limit_backend="redis",
        rate_limit_redis_url=redis_url,
        rate_max_wait=0,
        retries=0,
    )
    async def get(host: str) -> str:
        return host

    async def main() -> list[str]:
        return [await get("a"), await get("b")]

    assert asyncio.run(main()) == ["a", "b"]
    with pytest.raises(RateLimitTimeout):
        asyncio.run(get("a"))
    assert redis.Redis.from_url(redis_url).exists("{opero:rl:a}", "{opero:rl:b}") == 2


def test_windows_in_redis_book_every_window_in_one_script(redis_url: str) -> None:
    """[(2, 1), (3, 60)] in Redis: starts follow both windows, one list per window, expiring."""
    limiter = RedisRateLimiter("w", 1.0, windows=((2, 1.0), (3, 60.0)), url=redis_url)
    starts = []
    for _ in range(5):
        now, wait = limiter.reserve_with_time()
        assert not math.isnan(now)
        starts.append(now + wait)
    base = starts[0]
    offsets = [s - base for s in starts]
    assert offsets[:2] == pytest.approx([0.0, 0.0], abs=0.05)
    assert offsets[2] == pytest.approx(1.0, abs=0.05)
    assert offsets[3] == pytest.approx(60.0, abs=0.05)
    assert offsets[4] == pytest.approx(60.0, abs=0.05)
    _window_bound(starts, ((2, 1.0), (3, 60.0)))
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in client.keys("*"))
    assert keys == ["{opero:rl:w}:w2/1.0", "{opero:rl:w}:w3/60.0"]
    assert client.llen("{opero:rl:w}:w2/1.0") == 2
    assert client.llen("{opero:rl:w}:w3/60.0") == 3
    assert 0 < client.pttl("{opero:rl:w}:w3/60.0") <= 122_000


def test_keyed_windows_through_opero(redis_url: str) -> None:
    """Windows and a callable key together, through @opero with Redis."""

    @op(
        rate_limit=[(1, 1.0), (2, 60.0)],
        rate_limit_key=lambda user: user,
        rate_limit_backend="redis",
        rate_limit_redis_url=redis_url,
        rate_max_wait=0,
        retries=0,
    )
    def f(user: str) -> str:
        return user

    assert [f("a"), f("b")] == ["a", "b"]
    with pytest.raises(RateLimitTimeout):
        f("a")


def test_keyed_falls_back_per_key_when_redis_is_down(restartable_redis: RedisServer) -> None:
    """With Redis down, each key gets its own local bucket; back on Redis when it returns."""
    limiter = RedisRateLimiter(None, 1.0, url=restartable_redis.url, retry_interval=0.0)
    assert limiter.reserve_key("a") == 0.0
    restartable_redis.stop()
    assert limiter.reserve_key("a") == 0.0  # a fresh local bucket for a
    assert limiter.reserve_key("b") == 0.0  # and one for b
    assert limiter.reserve_key("a") == pytest.approx(1.0, abs=0.05)
    restartable_redis.start()
    deadline = time.monotonic() + 20
    while math.isnan(limiter.reserve_with_time(None, "c")[0]):
        assert time.monotonic() < deadline, "the limiter did not go back to Redis"
        time.sleep(0.02)
    assert redis.Redis.from_url(restartable_redis.url).exists("{opero:rl:c}") == 1


def test_a_keyed_limiter_refuses_a_non_str_name(redis_url: str) -> None:
    """reserve_key with a non-str names rate_limit_key in its TypeError."""
    limiter = RedisRateLimiter(None, 1.0, url=redis_url)
    with pytest.raises(TypeError, match="rate_limit_key"):
        limiter.reserve_key(5)
    with pytest.raises(TypeError, match="keyed"):
        limiter.reserve()


def _worker(url: str, user: str, ready: Any, go: Any, results: Any) -> None:
    """Drive user's bucket in Redis flat out until the end time the parent sends."""
    limiter = RedisRateLimiter(None, 20.0, burst=2, url=url)
    clock = redis.Redis.from_url(url)
    ready.put(True)
    begin, end = go.get(timeout=60)
    seconds, micros = clock.time()
    time.sleep(max(0.0, begin - (seconds + micros / 1e6)))
    starts = []
    while True:
        now, wait = limiter.reserve_with_time(None, user)
        start = now + wait
        if start > end:
            break
        time.sleep(wait)
        starts.append(start)
    results.put((user, starts))


@pytest.mark.slow
def test_four_processes_share_per_key_buckets(redis_url: str) -> None:
    """4 processes, 2 per user, flat out for 2 s: each user's bucket holds across processes."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    users = ["u1", "u1", "u2", "u2"]
    procs = [
        ctx.Process(target=_worker, args=(redis_url, user, ready, go, results)) for user in users
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        seconds, micros = redis.Redis.from_url(redis_url).time()
        begin = seconds + micros / 1e6 + 0.3
        for _ in procs:
            go.put((begin, begin + 2.0))
        got = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    per_user: dict[str, list[float]] = {}
    for user, starts in got:
        per_user.setdefault(user, []).extend(starts)
    allowed = 2 + 20 * 2.0
    for user, starts in per_user.items():
        starts.sort()
        for i in range(len(starts)):
            for j in range(i, len(starts)):
                assert j - i + 1 <= 2 + 20 * (starts[j] - starts[i]) + 1e-3, (user, i, j)
        assert 0.9 * allowed <= len(starts) <= allowed + 1, (user, len(starts))


def test_windows_script_survives_a_server_restart(restartable_redis: RedisServer) -> None:
    """A restarted Redis (empty script cache) reloads the windows script; it decides again."""
    limiter = RedisRateLimiter(
        "wr", 1.0, windows=((5, 1.0),), url=restartable_redis.url, retry_interval=0.0
    )
    assert limiter.reserve() == 0.0
    restartable_redis.restart()
    deadline = time.monotonic() + 20
    while math.isnan(limiter.reserve_with_time()[0]):
        assert time.monotonic() < deadline, "the limiter did not go back to Redis"
        time.sleep(0.02)
    client = redis.Redis.from_url(restartable_redis.url)
    assert client.llen("{opero:rl:wr}:w5/1.0") >= 1
