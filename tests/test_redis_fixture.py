"""The one redis-server launcher (tests and bench): real servers, restarts, takeovers, kills."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from faultkit import run_scenario
from opero._bench._redis import RedisServer, _death_signal_prefix, ping

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


def test_fixtures_and_bench_use_one_launcher(redis_server: RedisServer) -> None:
    """The session fixture's server is the launcher of ``opero._bench._redis`` the bench uses."""
    from opero._bench import _backends, _redis

    assert type(redis_server) is _redis.RedisServer
    assert _backends.private_redis is _redis.private_redis
    assert redis_server.log_path.parent == redis_server.directory


def test_launcher_never_takes_over_a_foreign_server(
    restartable_redis: RedisServer, tmp_path: Path
) -> None:
    """A launch on a port another server holds fails; that server is neither used nor flushed."""
    client = redis.Redis.from_url(restartable_redis.url)
    client.set("keep", b"1")
    intruder = RedisServer(restartable_redis.binary, tmp_path, port=restartable_redis.port)
    with pytest.raises(RuntimeError, match="did not start"):
        intruder.start(timeout=5)
    assert not intruder.running
    assert client.get("keep") == b"1"
    client.close()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without a redis-server binary the launcher says how to install it."""
    from opero._bench import _redis

    monkeypatch.setattr(_redis, "find_redis_server", lambda: None)
    with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
        _redis.start_redis_server(tmp_path)


@pytest.mark.skipif(
    not _death_signal_prefix(),
    reason="the parent-death signal needs Linux and setpriv --pdeathsig (util-linux 2.33+)",
)
def test_server_dies_with_a_killed_parent() -> None:
    """A process killed with SIGKILL while its server runs leaves no redis-server behind."""
    outcome = run_scenario(
        """
        import os, signal
        from opero._bench._redis import private_redis

        with private_redis() as server:
            print(server.process.pid, server.port, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        timeout=60,
    )
    assert outcome.returncode == -signal.SIGKILL, outcome.stderr
    pid, port = (int(x) for x in outcome.lines()[0].split())
    try:
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "redis-server outlived the process that started it"
        assert not ping(port)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Return whether ``pid`` is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_setpriv_without_pdeathsig_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An old or broken ``setpriv`` on PATH is left out, so servers still start."""
    from opero._bench import _redis

    fake = tmp_path / "setpriv"
    fake.write_text("#!/bin/sh\necho 'setpriv: unrecognized option --pdeathsig' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    _redis._death_signal_prefix.cache_clear()
    try:
        assert _redis._death_signal_prefix() == ()
        binary = _redis.find_redis_server() or pytest.skip("redis-server is not installed")
        server = _redis.start_redis_server(tmp_path, binary)
        try:
            assert ping(server.port)
        finally:
            server.stop()
    finally:
        _redis._death_signal_prefix.cache_clear()
