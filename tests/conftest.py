"""Shared pytest fixtures: a real ``redis-server`` on a free loopback port.

``redis_server`` (session) starts one server for the whole run, with no
persistence; ``redis_url`` gives each test that server's URL after a
``FLUSHDB``; ``restartable_redis`` gives a test its own server that it may
``stop()`` and ``start()`` again on the same port, to prove the failure policy.

Without a ``redis-server`` binary the Redis tests are skipped, unless
``OPERO_REQUIRE_REDIS=1`` (set by ``.ci/run``), in which case they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


def _require_redis() -> str:
    """Return the redis-server path, or skip (fail under ``OPERO_REQUIRE_REDIS=1``)."""
    if REDIS_SERVER is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("OPERO_REQUIRE_REDIS") == "1":
            pytest.fail(message + "; OPERO_REQUIRE_REDIS=1 makes this an error")
        pytest.skip(message)
    return REDIS_SERVER


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    """Return whether a Redis server on ``port`` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` process on 127.0.0.1 that can be stopped and restarted.

    Args:
        binary: Path of the ``redis-server`` executable.
        directory: Working directory of the server (nothing is persisted there).
        port: The port to listen on; a free one by default. Kept across restarts.

    """

    def __init__(self, binary: str, directory: Path, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0 of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: The server did not answer within ``timeout`` seconds.

        """
        if self.running:
            return
        log = open(self.directory / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        tail = (self.directory / f"redis-{self.port}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until the port is closed."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def flushdb(self) -> None:
        """Empty database 0 (test isolation between functions sharing the server)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            if not sock.recv(16).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")


def _start_with_retries(binary: str, directory: Path) -> RedisServer:
    """Start a server on a free port, trying another port if one was taken meanwhile."""
    last: Exception | None = None
    for _ in range(5):
        server = RedisServer(binary, directory)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start redis-server: {last}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Yield one redis-server for the whole session, without persistence."""
    binary = _require_redis()
    with tempfile.TemporaryDirectory(prefix="opero-redis-") as directory:
        server = _start_with_retries(binary, Path(directory))
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
        server = _start_with_retries(binary, Path(directory))
        try:
            yield server
        finally:
            server.stop()
            _forget_opero_backends(server.url)
