"""The Redis cache backend against a real redis-server: keys, TTL, clear, serializers, signing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from opero._connections import redis as _redis_module
from opero._opero_core import stable_digest_call
from opero.cache import MISS, CacheBackend, FunctionCache
from opero.cache._redis import RedisBackend
from opero.errors import ConfigurationError

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]


def _open(backend: RedisBackend, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "namespace": "opero",
        "qualname": "tests.f",
        "ttl": None,
        "max_size": None,
        "is_async": False,
    }
    options.update(overrides)
    return backend.open(**options)


def test_backend_satisfies_the_protocols(redis_url: str) -> None:
    """RedisBackend and its function cache implement the documented protocols."""
    backend = RedisBackend(redis_url)
    assert isinstance(backend, CacheBackend)
    assert backend.stable_keys is True
    assert isinstance(_open(backend), FunctionCache)


def test_open_does_not_connect() -> None:
    """Constructing and opening a backend for an unreachable server touches no network."""
    url = "redis://open-does-not-connect@127.0.0.1:1/0"
    backend = RedisBackend(url)
    cache = _open(backend)
    assert cache.info().hits == 0
    assert backend.connector._sync is None
    assert not any(key[0] == url for key in _redis_module._SYNC_CLIENTS)
    assert backend.outage.down is False


def test_miss_then_hit_with_key_format(redis_url: str) -> None:
    """A stored value is read back, under the key {namespace}:{qualname}:{digest}."""
    cache = _open(RedisBackend(redis_url), namespace="ns", qualname="pkg.mod.func")
    digest = stable_digest_call((1, "a"), {"k": 2.5})
    assert cache.get(digest) is MISS
    cache.set(digest, {"answer": [1, 2, 3]})
    assert cache.get(digest) == {"answer": [1, 2, 3]}
    raw = redis.Redis.from_url(redis_url)
    assert raw.keys("*") == [f"ns:pkg.mod.func:{digest}".encode()]
    assert pickle.loads(raw.get(f"ns:pkg.mod.func:{digest}")) == {"answer": [1, 2, 3]}
    info = cache.info()
    assert (info.hits, info.misses) == (1, 1)


def test_none_and_falsy_values_are_hits(redis_url: str) -> None:
    """None, 0 and empty values are cached like any other result."""
    cache = _open(RedisBackend(redis_url))
    for i, value in enumerate([None, 0, "", [], False]):
        cache.set(f"k{i}", value)
        assert cache.get(f"k{i}") == value
        assert cache.get(f"k{i}") is not MISS


def test_ttl_is_enforced_by_redis(redis_url: str) -> None:
    """The TTL is set on the key in Redis (PTTL), in milliseconds, float seconds allowed."""
    cache = _open(RedisBackend(redis_url), ttl=2.5)
    cache.set("d", 1)
    pttl = redis.Redis.from_url(redis_url).pttl("opero:tests.f:d")
    assert 1500 < pttl <= 2500
    persistent = _open(RedisBackend(redis_url), qualname="tests.g")
    persistent.set("d", 1)
    assert redis.Redis.from_url(redis_url).pttl("opero:tests.g:d") == -1


def test_expired_entry_is_a_miss(redis_url: str) -> None:
    """An entry whose Redis TTL has passed is a miss (expiry forced with PEXPIRE)."""
    cache = _open(RedisBackend(redis_url), ttl=60)
    cache.set("d", 1)
    redis.Redis.from_url(redis_url).pexpire("opero:tests.f:d", 1)
    raw = redis.Redis.from_url(redis_url)
    while raw.exists("opero:tests.f:d"):
        raw.pexpire("opero:tests.f:d", 1)
    assert cache.get("d") is MISS


def test_delete_reports_presence(redis_url: str) -> None:
    """delete() removes one entry and says whether it was there."""
    cache = _open(RedisBackend(redis_url))
    cache.set("a", 1)
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert cache.get("a") is MISS


def test_clear_removes_only_this_functions_keys(redis_url: str) -> None:
    """clear() deletes the function's keys (more than one SCAN batch) and nothing else."""
    backend = RedisBackend(redis_url)
    f = _open(backend, qualname="m.f")
    f_prefix_twin = _open(backend, qualname="m.f2")
    g = _open(backend, qualname="m.g")
    for i in range(1200):
        f.set(str(i), i)
    f_prefix_twin.set("x", 1)
    g.set("x", 2)
    raw = redis.Redis.from_url(redis_url)
    raw.set("unrelated", b"keep")
    f.clear()
    assert f.get("5") is MISS
    assert f_prefix_twin.get("x") == 1
    assert g.get("x") == 2
    assert raw.get("unrelated") == b"keep"
    assert raw.dbsize() == 3


def test_clear_escapes_glob_characters(redis_url: str) -> None:
    """A namespace with glob metacharacters only clears itself."""
    backend = RedisBackend(redis_url)
    star = _open(backend, namespace="a*")
    other = _open(backend, namespace="ab")
    star.set("k", 1)
    other.set("k", 2)
    star.clear()
    assert star.get("k") is MISS
    assert other.get("k") == 2
    backend.clear_namespace("a*")
    assert other.get("k") == 2


def test_clear_namespace(redis_url: str) -> None:
    """clear_namespace(ns) deletes one namespace; None deletes every namespace it opened."""
    backend = RedisBackend(redis_url)
    l1 = _open(backend, namespace="l1")
    l2 = _open(backend, namespace="l2")
    l1.set("k", 1)
    l2.set("k", 2)
    redis.Redis.from_url(redis_url).set("l1x:keep", b"1")
    backend.clear_namespace("l1")
    assert l1.get("k") is MISS
    assert l2.get("k") == 2
    backend.clear_namespace(None)
    assert l2.get("k") is MISS
    assert redis.Redis.from_url(redis_url).get("l1x:keep") == b"1"


def test_async_methods_share_entries_with_sync(redis_url: str) -> None:
    """aget/aset/adelete use redis.asyncio and see what the sync client wrote."""
    cache = _open(RedisBackend(redis_url), is_async=True, ttl=30)

    async def scenario() -> None:
        assert await cache.aget("k") is MISS
        await cache.aset("k", ("tuple", 1))
        assert await cache.aget("k") == ("tuple", 1)
        cache.set("s", "from sync")
        assert await cache.aget("s") == "from sync"
        assert await cache.adelete("k") is True
        assert await cache.adelete("k") is False

    asyncio.run(scenario())
    assert cache.get("k") is MISS
    assert redis.Redis.from_url(redis_url).pttl("opero:tests.f:s") > 0


def test_async_client_per_event_loop(redis_url: str) -> None:
    """Successive event loops each get a working client (connections are loop-bound)."""
    cache = _open(RedisBackend(redis_url), is_async=True)
    cache.set("k", 7)
    for _ in range(3):
        assert asyncio.run(cache.aget("k")) == 7


def test_sync_pool_is_shared_per_url(redis_url: str) -> None:
    """Two backends on one URL reuse one client and connection pool."""
    a = RedisBackend(redis_url)
    b = RedisBackend(redis_url)
    assert a.sync_client() is b.sync_client()


def test_client_objects_sync_and_async(redis_url: str) -> None:
    """A sync client serves async functions too, and an asyncio client serves sync ones."""
    sync_client = redis.Redis.from_url(redis_url)
    cache = _open(RedisBackend(client=sync_client), is_async=True)
    cache.set("k", 1)
    assert asyncio.run(cache.aget("k")) == 1

    async def make_async_backend() -> Any:
        client = redis.asyncio.Redis.from_url(redis_url)
        acache = _open(RedisBackend(client=client), is_async=True)
        await acache.aset("j", 2)
        await client.aclose()
        return acache

    acache = asyncio.run(make_async_backend())
    assert acache.get("j") == 2


def test_url_from_environment_at_first_use(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no URL, OPERO_REDIS_URL is read at first use, not at construction."""
    monkeypatch.delenv("OPERO_REDIS_URL", raising=False)
    backend = RedisBackend()
    cache = _open(backend)
    monkeypatch.setenv("OPERO_REDIS_URL", redis_url)
    cache.set("k", 1)
    assert redis.Redis.from_url(redis_url).exists("opero:tests.f:k") == 1
    assert backend.url == redis_url


def test_stable_keys_across_processes(redis_url: str) -> None:
    """A subprocess computes the same digest for the same call and reads the value."""
    cache = _open(RedisBackend(redis_url), qualname="shared.func")
    digest = stable_digest_call(("user", 42), {"flag": True, "ratio": 0.5})
    cache.set(digest, "stored by parent")
    script = (
        "from opero._opero_core import stable_digest_call\n"
        "from opero.cache._redis import RedisBackend\n"
        f"b = RedisBackend({redis_url!r})\n"
        "c = b.open(namespace='opero', qualname='shared.func', ttl=None, max_size=None,"
        " is_async=False)\n"
        "d = stable_digest_call(('user', 42), {'ratio': 0.5, 'flag': True})\n"
        "print(d)\n"
        "print(c.get(d))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.split("\n")
    assert out[0] == digest
    assert out[1] == "stored by parent"


def test_json_serializer(redis_url: str) -> None:
    """serializer='json' stores readable JSON."""
    cache = _open(RedisBackend(redis_url, serializer="json"))
    cache.set("k", {"a": [1, 2.5, None, "x"]})
    assert cache.get("k") == {"a": [1, 2.5, None, "x"]}
    assert json.loads(redis.Redis.from_url(redis_url).get("opero:tests.f:k")) == {
        "a": [1, 2.5, None, "x"]
    }


def test_custom_serializer_pair(redis_url: str) -> None:
    """A (dumps, loads) pair is used both ways; str output is stored as UTF-8."""
    cache = _open(RedisBackend(redis_url, serializer=(repr, lambda b: eval(b.decode()))))
    cache.set("k", (1, "two"))
    assert redis.Redis.from_url(redis_url).get("opero:tests.f:k") == b"(1, 'two')"
    assert cache.get("k") == (1, "two")


def test_unserializable_value_is_not_cached_and_logged_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A value the serializer rejects is skipped with one log record naming its type."""
    cache = _open(RedisBackend(redis_url, serializer="json"))
    with caplog.at_level(logging.WARNING, logger="opero"):
        cache.set("a", {1, 2})
        cache.set("b", {3})
    assert cache.get("a") is MISS
    records = [r for r in caplog.records if "not cached" in r.getMessage()]
    assert len(records) == 1
    assert "set" in records[0].getMessage()


def test_foreign_and_corrupt_values_are_misses(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage bytes or a non-string Redis type under an opero key are misses, not errors."""
    cache = _open(RedisBackend(redis_url))
    raw = redis.Redis.from_url(redis_url)
    raw.set("opero:tests.f:garbage", b"\x00not a pickle")
    raw.rpush("opero:tests.f:alist", b"x")
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert cache.get("garbage") is MISS
        assert cache.get("alist") is MISS
    assert len(caplog.records) == 2


class _Boom:
    """Unpickling this object records a side effect (stands in for malicious code)."""

    def __reduce__(self) -> Any:
        return (Path.touch, (Path(os.environ["OPERO_TEST_MARKER"]),))


def test_signed_values_roundtrip_and_reject_tampering(
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a secret, a forged pickle under an opero key is a miss + warning and never unpickled."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("OPERO_TEST_MARKER", str(marker))
    payload = pickle.dumps(_Boom())
    pickle.loads(payload)
    assert marker.exists(), "the payload must have a visible side effect when unpickled"
    marker.unlink()

    cache = _open(RedisBackend(redis_url, secret="s3cret"))
    cache.set("good", [1, 2])
    assert cache.get("good") == [1, 2]
    raw = redis.Redis.from_url(redis_url)
    stored = raw.get("opero:tests.f:good")
    assert stored.startswith(b"opero-hmac1:")

    raw.set("opero:tests.f:forged", payload)
    raw.set("opero:tests.f:flipped", stored[:-1] + bytes([stored[-1] ^ 1]))
    raw.set("opero:tests.f:moved", stored)
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert cache.get("forged") is MISS
        assert cache.get("flipped") is MISS
        assert cache.get("moved") is MISS
    assert not marker.exists()
    assert sum("failed verification" in r.getMessage() for r in caplog.records) == 3

    other_secret = _open(RedisBackend(redis_url, secret=b"other"))
    assert other_secret.get("good") is MISS


def test_secret_from_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """OPERO_CACHE_SECRET signs values when no secret is passed (read at first use)."""
    backend = RedisBackend(redis_url)
    monkeypatch.setenv("OPERO_CACHE_SECRET", "from-env")
    cache = _open(backend)
    cache.set("k", 1)
    assert redis.Redis.from_url(redis_url).get("opero:tests.f:k").startswith(b"opero-hmac1:")
    assert _open(RedisBackend(redis_url, secret="from-env")).get("k") == 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"url": "http://localhost:6379"}, "cache_redis_url"),
        ({"url": "redis://localhost:notaport/0"}, "malformed"),
        ({"url": "redis://localhost:6379/zero"}, "database number"),
        ({"url": "redis://:6379/0"}, "no host"),
        ({"url": 6379}, "URL string"),
        ({"serializer": "yaml"}, "cache_serializer"),
        ({"serializer": (json.dumps,)}, "cache_serializer"),
        ({"secret": 123}, "cache_secret"),
        ({"secret": ""}, "cache_secret"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"connect_timeout": float("inf")}, "connect_timeout"),
        ({"client": object()}, "cache_redis_url"),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    """Malformed URLs, unknown serializers and bad options raise ConfigurationError naming them."""
    url = kwargs.pop("url", None)
    with pytest.raises(ConfigurationError, match=fragment):
        RedisBackend(url, **kwargs)


def test_decode_responses_client_is_rejected(redis_url: str) -> None:
    """A client that decodes responses to str cannot hold opero's bytes."""
    with pytest.raises(ConfigurationError, match="decode_responses"):
        RedisBackend(client=redis.Redis.from_url(redis_url, decode_responses=True))


def test_url_and_client_together_are_rejected(redis_url: str) -> None:
    """Passing both a URL and a client is ambiguous."""
    with pytest.raises(ConfigurationError, match="both"):
        RedisBackend(redis_url, client=redis.Redis.from_url(redis_url))


def test_password_is_hidden_in_repr() -> None:
    """The backend's repr (used in logs) never shows the password."""
    text = repr(RedisBackend("redis://user:hunter2@localhost:6379/0"))
    assert "hunter2" not in text
    assert "***" in text
