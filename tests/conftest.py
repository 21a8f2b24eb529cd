"""Shared pytest fixtures: a real ``redis-server`` on a free loopback port.

``redis_server`` (session) starts one server for the whole run, with no
persistence; ``redis_url`` gives each test that server's URL after a
``FLUSHDB``; ``restartable_redis`` gives a test its own server that it may
``stop()`` and ``start()`` again on the same port, to prove the failure policy.
``http_server`` gives a test the base URL of the demo HTTP service of
``tests/httpserver.py`` (one per session, its counters reset before each test),
and ``http_service`` the server object itself, to read what it received.

Without a ``redis-server`` binary the Redis tests are skipped, unless
``OPERO_REQUIRE_REDIS=1`` (set by ``.ci/run``), in which case they fail.
The servers come from :mod:`opero._bench._redis`, the launcher the bench's
``redis`` group uses too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from httpserver import DemoServer, serve
from opero._bench._redis import RedisServer, find_redis_server, free_port, start_redis_server

__all__ = ["REDIS_SERVER", "RedisServer", "free_port"]

REDIS_SERVER = find_redis_server()


def _require_redis() -> str:
    """Return the redis-server path, or skip (fail under ``OPERO_REQUIRE_REDIS=1``)."""
    if REDIS_SERVER is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("OPERO_REQUIRE_REDIS") == "1":
            pytest.fail(message + "; OPERO_REQUIRE_REDIS=1 makes this an error")
        pytest.skip(message)
    return REDIS_SERVER


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Yield one redis-server for the whole session, without persistence."""
    binary = _require_redis()
    with tempfile.TemporaryDirectory(prefix="opero-redis-") as directory:
        server = start_redis_server(Path(directory), binary)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """Return the URL of the session server, emptied (FLUSHALL) before the test."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flushdb()
    return redis_server.url


def _forget_opero_backends(url: str) -> None:
    """Drop the caches and backends ``@opero`` registered for a server that is going away.

    ``opero.clear_cache()`` reaches every backend a namespace ever used; one
    left pointing at a stopped test server (strict mode raises) would break a
    later test's ``clear_cache()``.
    """
    try:
        from opero.cache import _registry
    except ImportError:
        return

    def points_here(backend: object) -> bool:
        connector = getattr(backend, "connector", None)
        return getattr(connector, "_url", None) == url

    with _registry._lock:
        for served in _registry._backends.values():
            served[:] = [b for b in served if not points_here(b)]
        for caches in _registry._caches.values():
            for cache in [c for c in caches if points_here(getattr(c, "backend", None))]:
                caches.discard(cache)
        for strong in _registry._strong.values():
            strong[:] = [c for c in strong if not points_here(getattr(c, "backend", None))]
        for config in [c for c, b in _registry._shared.items() if points_here(b)]:
            del _registry._shared[config]


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    """Yield a redis-server of the test's own, which it may stop and restart (same port)."""
    binary = _require_redis()
    with tempfile.TemporaryDirectory(prefix="opero-redis-") as directory:
        server = start_redis_server(Path(directory), binary)
        try:
            yield server
        finally:
            server.stop()
            _forget_opero_backends(server.url)


@pytest.fixture(scope="session")
def http_service() -> Iterator[DemoServer]:
    """Yield the demo HTTP service of ``tests/httpserver.py`` for the whole session."""
    yield from serve()


@pytest.fixture
def http_server(http_service: DemoServer) -> str:
    """Return the demo service's base URL (``http://127.0.0.1:PORT``), its counters reset."""
    http_service.reset()
    return http_service.url
