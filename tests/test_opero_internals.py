"""The __opero__ contract used by @opmap, the _limiter hook and user cache backends."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import opero
from opero import opero as op
from opero.cache import MISS, CacheInfo


class DictCache:
    """A FunctionCache over a dict (a user backend), recording the keys it sees."""

    def __init__(self, backend: DictBackend, namespace: str) -> None:
        self.backend = backend
        self.namespace = namespace
        self.data: dict[Any, Any] = {}
        self.hits = self.misses = 0

    def get(self, key: Any) -> Any:
        """Return the value or MISS."""
        self.backend.keys.append(key)
        if key in self.data:
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return MISS

    def set(self, key: Any, value: Any) -> None:
        """Store a value."""
        self.data[key] = value

    def delete(self, key: Any) -> bool:
        """Remove a key."""
        return self.data.pop(key, MISS) is not MISS

    def clear(self) -> None:
        """Remove every entry."""
        self.data.clear()

    def info(self) -> CacheInfo:
        """Return counters."""
        return CacheInfo(self.hits, self.misses, None, len(self.data))

    async def aget(self, key: Any) -> Any:
        """Async get."""
        await asyncio.sleep(0)
        return self.get(key)

    async def aset(self, key: Any, value: Any) -> None:
        """Async set."""
        self.set(key, value)

    async def adelete(self, key: Any) -> bool:
        """Async delete."""
        return self.delete(key)


class DictBackend:
    """A user backend object: anything with open() and stable_keys."""

    def __init__(self, stable_keys: bool) -> None:
        self.stable_keys = stable_keys
        self.keys: list[Any] = []
        self.opened: list[DictCache] = []
        self.cleared: list[str | None] = []

    def open(
        self, *, namespace: str, qualname: str, ttl: Any, max_size: Any, is_async: bool
    ) -> Any:
        """Open one function's cache."""
        cache = DictCache(self, namespace)
        self.opened.append(cache)
        return cache

    def clear_namespace(self, namespace: str | None) -> None:
        """Record the namespace cleared."""
        self.cleared.append(namespace)


def test_internals_of_a_sync_cached_function() -> None:
    """__opero__ exposes policy, call_uncached, cache_lookup and cache_store that work."""
    calls: list[int] = []
    hits: list[int] = []

    @op(cache=True, retries=1, min_delay=0, on_cache_hit=lambda: hits.append(1))
    def f(x: int) -> int:
        calls.append(x)
        return x * 10

    meta = f.__opero__
    assert meta.has_cache
    assert not meta.is_async
    assert meta.policy.options == {
        "cache": True,
        "retries": 1,
        "min_delay": 0.0,
        "on_cache_hit": meta.policy.on_cache_hit,
    }
    assert meta.cache_lookup((1,), {}) is MISS
    assert meta.call_uncached(1) == 10
    assert meta.call_uncached(1) == 10
    assert calls == [1, 1]
    meta.cache_store((1,), {}, 99)
    assert meta.cache_lookup((1,), {}) == 99
    assert hits == [1]
    assert f(1) == 99
    assert f.cache_info().hits == 2
    assert "internals" in repr(meta)


def test_internals_of_an_async_function() -> None:
    """Async functions expose acall_uncached, and call_uncached runs them to completion."""

    @op(cache=True, retries=0)
    async def f(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    meta = f.__opero__
    assert meta.is_async
    assert meta.call_uncached(1) == 2
    assert asyncio.run(meta.acall_uncached(2)) == 3
    assert asyncio.run(meta.acache_lookup((5,), {})) is MISS
    asyncio.run(meta.acache_store((5,), {}, 50))
    assert asyncio.run(f(5)) == 50


def test_internals_without_cache() -> None:
    """Without a cache, lookups always miss and stores do nothing."""

    @op(retries=0)
    def f(x: int) -> int:
        return x

    meta = f.__opero__
    assert not meta.has_cache
    assert meta.cache is None
    assert meta.cache_lookup((1,), {}) is MISS
    meta.cache_store((1,), {}, 3)
    assert meta.cache_lookup((1,), {}) is MISS
    assert asyncio.run(meta.acall_uncached(4)) == 4


def test_shared_limiter_across_functions() -> None:
    """One _limiter object passed to several decorations is used by all of them."""

    class Limiter:
        def __init__(self) -> None:
            self.count = 0
            self.lock = threading.Lock()

        def reserve(self, rate: float | None = None) -> float:
            with self.lock:
                self.count += 1
            return 0.0

    limiter = Limiter()
    fns = [op(retries=0, rate_limit=5.0, _limiter=limiter)(lambda x: x) for _ in range(3)]
    threads = [threading.Thread(target=lambda f=f: [f(i) for i in range(10)]) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limiter.count == 30


def test_bad_private_limiter_is_rejected() -> None:
    """A _limiter without reserve() is a ConfigurationError."""
    with pytest.raises(opero.ConfigurationError, match="_limiter"):
        op(_limiter=object())


@pytest.mark.parametrize("stable", [True, False])
def test_user_backend_keys_and_helpers(stable: bool) -> None:
    """A user backend gets stable digests (or in-process keys) and serves hits and helpers."""
    backend = DictBackend(stable)
    calls: list[Any] = []

    @op(cache=True, cache_backend=backend, cache_namespace="user-ns")
    def f(x: Any, y: int = 0) -> Any:
        calls.append(x)
        return [x, y]

    assert f({"a": 1}, y=2) == [{"a": 1}, 2]
    assert f({"a": 1}, y=2) == [{"a": 1}, 2]
    assert len(calls) == 1
    key = backend.keys[0]
    if stable:
        assert isinstance(key, str)
        assert len(key) == 64
    else:
        assert not isinstance(key, str)
    assert f.cache_get({"a": 1}, y=2) == [{"a": 1}, 2]
    assert f.cache_delete({"a": 1}, y=2) is True
    with pytest.raises(KeyError):
        f.cache_get({"a": 1}, y=2)
    f(1)
    opero.clear_cache("user-ns")
    assert backend.opened[0].data == {}
    assert backend.cleared == ["user-ns"]
    assert f.cache_info().hits == 2  # the second call and cache_get


def test_stable_backend_rejects_unkeyable_argument_with_hint() -> None:
    """A stable-key backend names cache_key= when an argument has no stable digest."""
    backend = DictBackend(True)
    f = op(cache=True, cache_backend=backend)(lambda x: x)
    with pytest.raises(TypeError, match="cache_key"):
        f(object())


def test_stable_backend_custom_key_is_digested() -> None:
    """With a stable backend, the cache_key result is turned into a stable digest."""
    backend = DictBackend(True)
    f = op(cache=True, cache_backend=backend, cache_key=lambda fn, x: ("k", x % 2))(lambda x: x)
    assert f(1) == 1
    assert f(3) == 1
    assert isinstance(backend.keys[0], str)


def test_user_backend_single_flight_in_threads() -> None:
    """Concurrent misses on a user backend compute once across threads."""
    backend = DictBackend(True)
    calls: list[int] = []
    barrier = threading.Barrier(6)

    @op(cache=True, cache_backend=backend)
    def slow(x: int) -> int:
        calls.append(x)
        time.sleep(0.2)
        return x

    def worker() -> None:
        barrier.wait()
        slow(1)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_user_backend_async_path() -> None:
    """Async functions on a user backend use aget/aset and share one computation."""
    backend = DictBackend(True)
    calls: list[int] = []

    @op(cache=True, cache_backend=backend)
    async def f(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.01)
        return x * 3

    async def main() -> list[int]:
        return await asyncio.gather(*(f(2) for _ in range(5)))

    assert asyncio.run(main()) == [6] * 5
    assert asyncio.run(f(2)) == 6
    assert len(calls) <= 2


_DISK_CALLS: list[int] = []


def _disk_compute(x: int) -> int:
    """Double ``x``, logging the call (a module-level function: a stable identity)."""
    _DISK_CALLS.append(x)
    return x * 2


def test_disk_backend_through_opero(tmp_path: Path) -> None:
    """cache_backend='disk' persists results across decorations of the same function."""
    pytest.importorskip("diskcache")
    _DISK_CALLS.clear()
    first = op(cache=True, cache_backend="disk", cache_dir=str(tmp_path))(_disk_compute)
    assert first(4) == 8
    second = op(cache=True, cache_backend="disk", cache_dir=str(tmp_path))(_disk_compute)
    assert second(4) == 8
    assert _DISK_CALLS == [4]


def _single_lookups(meta: Any, items: list[Any]) -> tuple[list[Any], int]:
    """Run cache_lookup once per item: the reference for cache_lookup_many."""
    values = [meta.cache_lookup((x,), {}) for x in items]
    return values, sum(1 for v in values if v is not MISS)


@pytest.mark.parametrize("custom_key", [False, True])
def test_batch_lookup_and_store_match_single_calls(custom_key: bool) -> None:
    """Batch lookups and stores give the values, counters and on_cache_hit of single calls."""
    fired: dict[str, list[int]] = {"single": [], "batch": []}

    def build(name: str) -> Any:
        extra: dict[str, Any] = {"cache_key": lambda fn, x: ("k", x)} if custom_key else {}

        @op(cache=True, cache_max_size=None, on_cache_hit=lambda: fired[name].append(1), **extra)
        def f(x: Any) -> Any:
            return x

        return f

    single, batch = build("single"), build("batch")
    stored = [1, "a", (2, 3), [4], 5.0]
    for x in stored:
        single.__opero__.cache_store((x,), {}, f"v{x}")
    batch.__opero__.cache_store_many(stored, [f"v{x}" for x in stored])
    probes = [1, 2, "a", [4], 5, 5.0, (2, 3), 1]
    assert batch.__opero__.cache_lookup_many(probes) == _single_lookups(single.__opero__, probes)
    assert len(fired["batch"]) == len(fired["single"]) == 6
    assert batch.cache_info() == single.cache_info()
    assert batch.cache_get([4]) == "v[4]"  # shared with the single-call helpers
    with pytest.raises(ValueError, match="differ in length"):
        batch.__opero__.cache_store_many([1, 2], ["x"])


def test_batch_ops_on_a_user_backend_and_without_cache() -> None:
    """The generic batch loop goes through a user backend's get/set; no cache means all MISS."""
    backend = DictBackend(stable_keys=False)

    @op(cache=True, cache_backend=backend)
    def f(x: int) -> int:
        return x

    meta = f.__opero__
    meta.cache_store_many([1, 2], [10, 20])
    assert meta.cache_lookup_many([1, 3, 2]) == ([10, MISS, 20], 2)
    assert f.cache_info().hits == 2
    assert f.cache_info().misses == 1

    @op
    def g(x: int) -> int:
        return x

    g.__opero__.cache_store_many([1], [1])
    assert g.__opero__.cache_lookup_many([1, 2]) == ([MISS, MISS], 0)


def test_batch_lookup_on_the_disk_backend(tmp_path: Path) -> None:
    """The disk backend serves batch lookups and stores with stable keys shared with calls."""

    @op(cache=True, cache_backend="disk", cache_dir=str(tmp_path))
    def f(x: int) -> int:
        return x * 2

    assert f(3) == 6
    meta = f.__opero__
    meta.cache_store_many([4], [99])
    assert meta.cache_lookup_many([3, 4, 5]) == ([6, 99, MISS], 2)
    assert f(4) == 99
