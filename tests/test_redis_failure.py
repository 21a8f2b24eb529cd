"""The Redis cache failure policy: a dead or stuck Redis is a miss, warned once, then back."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis

from opero.cache import MISS
from opero.cache._redis import RedisBackend
from opero.errors import CacheBackendError

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis


def _open(backend: RedisBackend, qualname: str = "tests.f") -> Any:
    return backend.open(
        namespace="opero", qualname=qualname, ttl=None, max_size=None, is_async=False
    )


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "opero" and r.levelno == logging.WARNING and "unavailable" in r.getMessage()
    ]


def _wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until it is true (a liveness wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_outage_is_a_miss_warned_once_then_recovers(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping Redis turns calls into misses with one warning; restarting it brings hits back."""
    backend = RedisBackend(restartable_redis.url, retry_interval=0.05)
    f = _open(backend, "m.f")
    g = _open(backend, "m.g")
    f.set("k", "before")
    assert f.get("k") == "before"

    restartable_redis.stop()
    with caplog.at_level(logging.INFO, logger="opero"):
        for i in range(50):
            assert f.get("k") is MISS
            f.set(f"n{i}", i)
            assert g.get("k") is MISS
            assert g.delete("k") is False
            g.clear()
        assert len(_outage_warnings(caplog)) == 1
        assert "redis://127.0.0.1" in _outage_warnings(caplog)[0].getMessage()

        restartable_redis.start()
        f.set("k", "after")  # may be skipped between probes; retried below
        assert _wait_for(lambda: (f.set("k", "after"), f.get("k"))[1] == "after")
        assert any("available again" in r.getMessage() for r in caplog.records)

        restartable_redis.stop()
        assert f.get("k") is MISS
        assert len(_outage_warnings(caplog)) == 2, "a new outage is warned again"
    restartable_redis.start()


def test_calls_between_probes_do_not_touch_the_network(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is down, lookups between probes are misses without a connection attempt."""
    backend = RedisBackend(restartable_redis.url, retry_interval=3600)
    cache = _open(backend)
    restartable_redis.stop()
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert cache.get("k") is MISS
    assert backend.outage.down
    restartable_redis.start()
    # Redis is back, but the next probe is an hour away: still a miss, no probe made.
    assert cache.get("k") is MISS
    cache.set("k", 1)
    assert backend.outage.down
    assert redis.Redis.from_url(restartable_redis.url).dbsize() == 0


def test_stuck_redis_times_out_as_a_miss(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that stops answering (CLIENT PAUSE) hits the socket timeout and is a miss."""
    backend = RedisBackend(restartable_redis.url, socket_timeout=0.2, retry_interval=0.0)
    cache = _open(backend)
    cache.set("k", 1)
    admin = redis.Redis.from_url(restartable_redis.url)
    admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert cache.get("k") is MISS
    assert len(_outage_warnings(caplog)) == 1
    assert "Timeout" in _outage_warnings(caplog)[0].getMessage()
    admin.execute_command("CLIENT", "UNPAUSE")
    assert _wait_for(lambda: cache.get("k") == 1)


def test_strict_mode_raises_cache_backend_error(restartable_redis: RedisServer) -> None:
    """strict=True raises CacheBackendError (chained from the Redis error) for every operation."""
    backend = RedisBackend(restartable_redis.url, strict=True)
    cache = _open(backend)
    cache.set("k", 1)
    restartable_redis.stop()
    for operation in (
        lambda: cache.get("k"),
        lambda: cache.set("k", 2),
        lambda: cache.delete("k"),
        cache.clear,
        lambda: asyncio.run(cache.aget("k")),
        lambda: asyncio.run(cache.aset("k", 2)),
    ):
        with pytest.raises(CacheBackendError, match="Redis cache") as caught:
            operation()
        assert isinstance(caught.value.__cause__, redis.RedisError | OSError)
    restartable_redis.start()
    assert cache.get("k") is MISS  # the server restarted empty (no persistence)


def test_async_outage_is_a_miss_and_recovers(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The asyncio path follows the same policy: miss, one warning, recovery."""
    backend = RedisBackend(restartable_redis.url, retry_interval=0.05)
    cache = backend.open(
        namespace="opero", qualname="tests.af", ttl=None, max_size=None, is_async=True
    )

    async def scenario() -> None:
        await cache.aset("k", 1)
        assert await cache.aget("k") == 1
        restartable_redis.stop()
        with caplog.at_level(logging.WARNING, logger="opero"):
            for _ in range(20):
                assert await cache.aget("k") is MISS
                await cache.aset("k", 2)
        assert len(_outage_warnings(caplog)) == 1
        restartable_redis.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await cache.aset("k", 3)
            if await cache.aget("k") == 3:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the async cache did not recover")

    asyncio.run(scenario())
