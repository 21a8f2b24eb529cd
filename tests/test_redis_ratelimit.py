"""The Redis rate limiter: GCRA on the server clock, one round trip, shared, with a fallback."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import pickle
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis

from opero._ratelimit.redis import RedisRateLimiter
from opero.errors import ConfigurationError

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis

EPS = 2e-6  # the script rounds the arrival time up to whole microseconds


def _starts(limiter: RedisRateLimiter, n: int, rate: float | None = None) -> list[float]:
    """Reserve ``n`` calls at once; return their scheduled starts on the Redis clock."""
    out = []
    for _ in range(n):
        now, wait = limiter.reserve_with_time(rate)
        out.append(now + wait)
    return out


def _check_window_bound(starts: list[float], rate: float, burst: int) -> None:
    """Assert that every window [s_i, s_j] holds at most burst + rate * (s_j - s_i) starts."""
    starts = sorted(starts)
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            allowed = burst + rate * (starts[j] - starts[i]) + EPS * rate * (j - i + 1)
            assert j - i + 1 <= allowed, (i, j, starts[i], starts[j])


def test_burst_then_even_spacing(redis_url: str) -> None:
    """The first `burst` calls start at once, then one per 1/rate s of the server's clock."""
    limiter = RedisRateLimiter("spacing", rate=10, burst=3, url=redis_url)
    decisions = [limiter.reserve_with_time() for _ in range(8)]
    assert [wait for _, wait in decisions[:3]] == [0.0, 0.0, 0.0], "the burst is granted at once"
    starts = [now + wait for now, wait in decisions]
    for k in range(3, 8):
        assert starts[k] - starts[0] == pytest.approx((k - 2) * 0.1, abs=EPS * k)
    _check_window_bound(starts, 10, 3)


def test_state_key_uses_a_cluster_hash_tag_and_expires(redis_url: str) -> None:
    """The bucket lives under {opero:rl:<key>} (one Cluster slot) and expires when idle."""
    limiter = RedisRateLimiter("api.example", rate=5, burst=2, url=redis_url)
    limiter.reserve()
    raw = redis.Redis.from_url(redis_url)
    assert raw.keys("*") == [b"{opero:rl:api.example}"]
    assert 0 < raw.pttl("{opero:rl:api.example}") <= 1000 + 200


def test_reserve_returns_the_wait(redis_url: str) -> None:
    """reserve() returns seconds to wait: 0 for the burst, then growing by 1/rate."""
    limiter = RedisRateLimiter("waits", rate=4, burst=1, url=redis_url)
    waits = [limiter.reserve() for _ in range(3)]
    assert waits[0] == 0.0
    assert 0.0 < waits[1] <= 0.25
    assert waits[1] < waits[2] <= 0.5


def test_rate_override_per_decision(redis_url: str) -> None:
    """reserve(rate) spaces this decision at the given rate (callable rate_limit)."""
    limiter = RedisRateLimiter("override", rate=1, burst=1, url=redis_url)
    starts = _starts(limiter, 4, rate=100.0)
    for k in range(1, 4):
        assert starts[k] - starts[0] == pytest.approx(k * 0.01, abs=EPS * 4)
    with pytest.raises(ConfigurationError, match="rate_limit"):
        limiter.reserve(-1.0)


def test_limiters_with_one_key_share_a_bucket(redis_url: str) -> None:
    """Two limiter objects (two clients) with one key draw from one bucket; other keys do not."""
    a = RedisRateLimiter("shared", rate=20, burst=1, url=redis_url)
    b = RedisRateLimiter("shared", rate=20, burst=1, client=redis.Redis.from_url(redis_url))
    other = RedisRateLimiter("other", rate=20, burst=1, url=redis_url)
    starts = [a.reserve_with_time(), b.reserve_with_time(), a.reserve_with_time()]
    scheduled = [now + wait for now, wait in starts]
    assert scheduled[1] - scheduled[0] == pytest.approx(0.05, abs=1e-5)
    assert scheduled[2] - scheduled[1] == pytest.approx(0.05, abs=1e-5)
    assert other.reserve() == 0.0


def test_async_reserve_shares_the_bucket(redis_url: str) -> None:
    """areserve() uses redis.asyncio and the same bucket as reserve()."""
    limiter = RedisRateLimiter("async", rate=10, burst=1, url=redis_url)
    assert limiter.reserve() == 0.0

    async def scenario() -> list[float]:
        return [await limiter.areserve() for _ in range(2)]

    first, second = asyncio.run(scenario())
    assert 0.0 < first <= 0.1
    assert first < second <= 0.2


def test_one_round_trip_per_decision(redis_url: str) -> None:
    """After the script is loaded, each decision is exactly one EVALSHA command."""
    limiter = RedisRateLimiter("roundtrips", rate=1000, burst=1000, url=redis_url)
    limiter.reserve()  # loads the script once (NOSCRIPT, SCRIPT LOAD)
    raw = redis.Redis.from_url(redis_url)
    raw.config_resetstat()
    for _ in range(100):
        limiter.reserve()
    stats = raw.info("commandstats")
    calls = {name: value["calls"] for name, value in stats.items()}
    calls = {k: v for k, v in calls.items() if not k.startswith(("cmdstat_config", "cmdstat_info"))}
    # GET, SET and TIME run inside the script (Redis counts them too): one of each per decision.
    assert calls == {
        "cmdstat_evalsha": 100,
        "cmdstat_get": 100,
        "cmdstat_set": 100,
        "cmdstat_time": 100,
    }


def test_script_survives_a_server_restart(restartable_redis: RedisServer) -> None:
    """A restarted Redis (empty script cache) is handled by reloading the script."""
    limiter = RedisRateLimiter("restart", rate=10, burst=1, url=restartable_redis.url)
    assert limiter.reserve() == 0.0
    restartable_redis.restart()
    now, _ = limiter.reserve_with_time()
    assert not math.isnan(now), "decided by Redis, not by the local fallback"


def test_falls_back_to_a_local_bucket_and_recovers(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down the local bucket decides (one warning); when it returns Redis decides."""
    limiter = RedisRateLimiter(
        "fallback", rate=10, burst=2, url=restartable_redis.url, retry_interval=0.0
    )
    assert limiter.reserve() == 0.0
    restartable_redis.stop()
    with caplog.at_level(logging.WARNING, logger="opero"):
        decisions = [limiter.reserve_with_time() for _ in range(5)]
        assert asyncio.run(limiter.areserve()) > 0.0
    assert all(math.isnan(now) for now, _ in decisions)
    waits = [wait for _, wait in decisions]
    assert waits[0] == 0.0
    assert waits[1] == 0.0
    assert 0.0 < waits[2] <= 0.1
    assert waits[3] > waits[2]
    warnings = [r for r in caplog.records if "rate limiter" in r.getMessage()]
    assert len(warnings) == 1
    assert "local" in warnings[0].getMessage()

    restartable_redis.start()
    deadline = time.monotonic() + 20
    while math.isnan(limiter.reserve_with_time()[0]):
        assert time.monotonic() < deadline, "the limiter did not go back to Redis"
        time.sleep(0.02)
    assert redis.Redis.from_url(restartable_redis.url).exists("{opero:rl:fallback}") == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("", 1.0), {}, "rate_limit_key"),
        (("k", 0), {}, "rate_limit"),
        (("k", float("nan")), {}, "rate_limit"),
        (("k", 1.0, 0), {}, "rate_burst"),
        (("k", 1.0, 1.5), {}, "rate_burst"),
        (("k", 1.0), {"url": "http://x"}, "rate_limit_redis_url"),
        (("k", 1.0), {"retry_interval": -1}, "retry_interval"),
    ],
)
def test_bad_configuration(args: tuple[Any, ...], kwargs: dict[str, Any], fragment: str) -> None:
    """Bad keys, rates, bursts and URLs raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=fragment):
        RedisRateLimiter(*args, **kwargs)


def test_construction_does_not_connect() -> None:
    """A limiter for an unreachable server can be built (decoration needs no live Redis)."""
    limiter = RedisRateLimiter("k", 1.0, url="redis://127.0.0.1:1/0")
    assert "127.0.0.1:1" in repr(limiter)


def test_pickles_by_configuration(redis_url: str) -> None:
    """A URL-based limiter pickles (for process pools) and the copy shares the bucket."""
    limiter = RedisRateLimiter("pickled", rate=10, burst=1, url=redis_url)
    copy = pickle.loads(pickle.dumps(limiter))
    assert (copy.key, copy.rate, copy.burst) == ("pickled", 10.0, 1)
    assert limiter.reserve() == 0.0
    assert copy.reserve() > 0.0


def _worker(url: str, key: str, ready: Any, go: Any, results: Any) -> None:
    """Drive the shared bucket flat out until the end time the parent sends."""
    limiter = RedisRateLimiter(key, rate=50, burst=5, url=url)
    clock = redis.Redis.from_url(url)
    ready.put(True)
    begin, end = go.get(timeout=60)
    seconds, micros = clock.time()
    time.sleep(max(0.0, begin - (seconds + micros / 1e6)))
    starts = []
    while True:
        now, wait = limiter.reserve_with_time()
        start = now + wait
        if start > end:
            break
        time.sleep(wait)
        starts.append(start)
    results.put(starts)


@pytest.mark.slow
def test_four_processes_share_one_bucket(redis_url: str) -> None:
    """4 processes flat out on one 50/s bucket for 3 s: the window bound holds, >= 95% used."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(redis_url, "four", ready, go, results)) for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        seconds, micros = redis.Redis.from_url(redis_url).time()
        begin = seconds + micros / 1e6 + 0.3
        for _ in procs:
            go.put((begin, begin + 3.0))
        per_process = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(per_process), "every process got calls through"
    starts = sorted(s for chunk in per_process for s in chunk)
    assert starts[0] >= begin - 0.05
    _check_window_bound(starts, rate=50, burst=5)
    allowed = 5 + 50 * 3.0
    assert len(starts) >= 0.95 * allowed, (len(starts), allowed)
    assert len(starts) <= allowed + 1
