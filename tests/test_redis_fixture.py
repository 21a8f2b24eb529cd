"""The shared redis-server fixtures start real servers and restart them on the same port."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import redis

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis


def test_redis_url_answers_and_starts_empty(redis_url: str) -> None:
    """The function fixture yields a live, empty database."""
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.dbsize() == 0
    client.set("x", b"1")
    client.close()


def test_redis_url_is_flushed_between_tests(redis_url: str) -> None:
    """Keys written by an earlier test are gone."""
    client = redis.Redis.from_url(redis_url)
    assert client.get("x") is None
    client.close()


def test_restartable_server_keeps_its_port(restartable_redis: RedisServer) -> None:
    """Stopping refuses connections; starting again serves on the same port."""
    port = restartable_redis.port
    client = redis.Redis.from_url(restartable_redis.url, socket_connect_timeout=0.5)
    assert client.ping()
    restartable_redis.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    restartable_redis.start()
    assert restartable_redis.port == port
    assert client.ping()
    client.close()
