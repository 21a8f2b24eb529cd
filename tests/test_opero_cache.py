"""Memory cache of @opero: keys, helpers, TTL, single flight, namespaces, stacking, methods."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from typing import Any

import pytest

import opero
from opero import opero as op
from opero._opero_core import CachedCall, ManualClock
from opero.cache import CacheInfo, MemoryBackend


def counted(**options: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    """Return a cached identity function and the list of its real calls."""
    calls: list[tuple[Any, ...]] = []

    @op(cache=True, **options)
    def f(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return (args, kwargs)

    return f, calls


def test_sync_memory_wrapper_is_native_and_keeps_metadata() -> None:
    """A sync memory-cached function is a CachedCall with the function's metadata."""

    @op(cache=True)
    def documented(x: int) -> int:
        """Doc."""
        return x

    assert isinstance(documented, CachedCall)
    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Doc."
    assert documented.__wrapped__.__name__ == "documented"
    assert documented.__module__ == __name__


def test_hit_returns_stored_value_without_calling() -> None:
    """A second call with the same arguments is served from the cache."""
    f, calls = counted()
    assert f(1, a=2) == f(1, a=2)
    assert len(calls) == 1
    info = f.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)
    assert isinstance(info, CacheInfo)


def test_keys_are_typed_and_exact() -> None:
    """1, 1.0 and True are different entries; kwargs order does not matter."""
    f, calls = counted()
    f(1)
    f(1.0)
    f(True)
    assert len(calls) == 3
    f(a=1, b=2)
    f(b=2, a=1)
    assert len(calls) == 4


def test_unhashable_builtins_are_keyed_by_structure() -> None:
    """Lists, dicts and sets are keyed by their content, nested too."""
    f, calls = counted()
    f([1, 2], {"a": {1, 2}})
    f([1, 2], {"a": {2, 1}})
    assert len(calls) == 1
    f([2, 1], {"a": {1, 2}})
    assert len(calls) == 2


def test_unkeyable_argument_is_a_type_error_naming_it() -> None:
    """An argument that cannot be keyed raises TypeError naming it and cache_key=."""

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

    f, calls = counted()
    with pytest.raises(TypeError, match="cache_key") as info:
        f(1, Unhashable())
    assert "args[1]" in str(info.value)
    assert calls == []


def test_only_successes_are_cached() -> None:
    """An exception is never stored: the next call runs the function again."""
    state = {"n": 0}

    @op(cache=True, retries=0)
    def f() -> int:
        state["n"] += 1
        if state["n"] == 1:
            raise ValueError
        return state["n"]

    with pytest.raises(ValueError):
        f()
    assert f() == 2
    assert f() == 2


def test_cache_get_delete_clear() -> None:
    """cache_get raises KeyError on a miss; cache_delete and cache_clear remove entries."""
    f, calls = counted()
    with pytest.raises(KeyError):
        f.cache_get(1)
    f(1)
    f(2)
    assert f.cache_get(1) == ((1,), {})
    assert f.cache_delete(1) is True
    assert f.cache_delete(1) is False
    with pytest.raises(KeyError):
        f.cache_get(1)
    f.cache_clear()
    assert f.cache_info().currsize == 0
    f(2)
    assert len(calls) == 3


def test_custom_cache_key_gets_func_and_arguments() -> None:
    """cache_key(func, *args, **kwargs) replaces the key; cache_get uses it too."""
    seen: list[Any] = []

    def key(func: Any, user: dict[str, Any], **kwargs: Any) -> Any:
        seen.append(func.__name__)
        return user["id"]

    @op(cache=True, cache_key=key)
    def load(user: dict[str, Any], verbose: bool = False) -> str:
        return f"user{user['id']}"

    assert load({"id": 1, "x": object()}) == "user1"
    assert load({"id": 1, "x": object()}, verbose=True) == "user1"
    assert load.cache_get({"id": 1}) == "user1"
    assert seen[0] == "load"
    assert load.cache_info().misses == 1


def test_max_size_evicts_least_recently_used() -> None:
    """cache_max_size bounds the entries (LRU) and counts evictions."""
    f, calls = counted(cache_max_size=2)
    f(1)
    f(2)
    f(1)
    f(3)
    info = f.cache_info()
    assert info.currsize == 2
    assert info.evictions == 1
    f(1)
    assert len(calls) == 3
    f(2)
    assert len(calls) == 4


def test_ttl_expires_entries_with_a_manual_clock() -> None:
    """cache_ttl drops entries once the (manual) clock passes their lifetime."""
    clock = ManualClock()
    f, calls = counted(cache_ttl=10, cache_backend=MemoryBackend(clock=clock))
    f(1)
    clock.advance(9.5)
    f(1)
    assert len(calls) == 1
    clock.advance(1.0)
    f(1)
    assert len(calls) == 2
    assert f.cache_info().expirations == 1


def test_single_flight_in_threads() -> None:
    """Concurrent misses on one key from 8 threads call the function once."""
    calls = []
    barrier = threading.Barrier(8)

    @op(cache=True)
    def slow(x: int) -> int:
        calls.append(x)
        time.sleep(0.2)
        return x * 2

    results: list[int] = []

    def worker() -> None:
        barrier.wait()
        results.append(slow(21))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [42] * 8
    assert calls == [21]


def test_single_flight_in_threads_shares_exceptions() -> None:
    """Waiting threads get the same exception as the computing one; nothing is cached."""
    calls = []
    barrier = threading.Barrier(4)

    @op(cache=True, retries=0)
    def slow() -> int:
        calls.append(1)
        time.sleep(0.2)
        raise ValueError("shared")

    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            slow()
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4
    assert len(calls) < 4
    assert slow.cache_info().currsize == 0


def test_reentrant_call_in_same_thread_does_not_deadlock() -> None:
    """A function that re-enters its own key computes directly instead of waiting."""
    depth = {"n": 0}

    @op(cache=True)
    def rec(x: int) -> int:
        depth["n"] += 1
        if depth["n"] < 3:
            return rec(x)
        return 7

    assert rec(1) == 7
    assert depth["n"] == 3


def test_async_cache_and_single_flight_in_tasks() -> None:
    """Concurrent tasks missing one key compute once and all get the result."""
    calls: list[int] = []

    @op(cache=True)
    async def f(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.01)
        return x + 1

    async def main() -> list[int]:
        first = await asyncio.gather(*(f(1) for _ in range(10)))
        return [*first, await f(1)]

    assert asyncio.run(main()) == [2] * 11
    assert calls == [1]
    assert f.cache_get(1) == 2


def test_async_single_flight_shares_exceptions() -> None:
    """Waiting tasks get the same exception object; nothing is cached."""
    calls: list[int] = []

    @op(cache=True, retries=0)
    async def f() -> int:
        calls.append(1)
        await asyncio.sleep(0.01)
        raise ValueError("x")

    async def main() -> list[BaseException | int]:
        return await asyncio.gather(*(f() for _ in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert len(calls) == 1
    assert all(isinstance(r, ValueError) for r in results)
    assert len({id(r) for r in results}) == 1
    assert f.cache_info().currsize == 0


def test_async_reentrant_task_computes_directly() -> None:
    """A task re-entering the key it is computing does not wait on itself."""
    depth = {"n": 0}

    @op(cache=True)
    async def rec(x: int) -> int:
        depth["n"] += 1
        if depth["n"] < 3:
            return await rec(x)
        return 5

    assert asyncio.run(rec(1)) == 5


def test_async_owner_cancelled_lets_a_waiter_compute() -> None:
    """If the computing task is cancelled, a waiting task computes instead of failing."""
    calls: list[int] = []
    gate = asyncio.Event

    @op(cache=True, retries=0)
    async def f() -> int:
        calls.append(1)
        await asyncio.sleep(0.05 if len(calls) == 1 else 0)
        return len(calls)

    async def main() -> int:
        owner = asyncio.create_task(f())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(f())
        await asyncio.sleep(0)
        owner.cancel()
        return await waiter

    assert asyncio.run(main()) == 2
    assert gate is asyncio.Event


def test_async_custom_key_and_hit_callback() -> None:
    """Async functions honour cache_key and on_cache_hit."""
    hits: list[int] = []

    @op(cache=True, cache_key=lambda func, x, y: x, on_cache_hit=lambda: hits.append(1))
    async def f(x: int, y: int) -> int:
        return x + y

    async def main() -> tuple[int, int]:
        return await f(1, 2), await f(1, 99)

    assert asyncio.run(main()) == (3, 3)
    assert hits == [1]


def test_clear_cache_all_and_by_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """opero.clear_cache() clears every store; clear_cache(ns) only that namespace."""
    from opero.cache import _registry

    # A global clear reaches every backend in the process (Redis ones of other test
    # modules too); an empty registry keeps this test to its own functions.
    for name in ("_caches", "_strong", "_backends"):
        monkeypatch.setattr(_registry, name, {})
    a, a_calls = counted(cache_namespace="ns-a")
    b, b_calls = counted(cache_namespace="ns-b")
    a(1)
    b(1)
    opero.clear_cache("ns-a")
    a(1)
    b(1)
    assert (len(a_calls), len(b_calls)) == (2, 1)
    opero.clear_cache()
    a(1)
    b(1)
    assert (len(a_calls), len(b_calls)) == (3, 2)
    with pytest.raises(TypeError, match="namespace"):
        opero.clear_cache(3)  # type: ignore[arg-type]


def test_stacked_decorators_keep_separate_stores() -> None:
    """Two stacked @opero layers each keep their own store and counters."""
    calls: list[int] = []

    @op(cache=True, cache_max_size=1)
    @op(cache=True, cache_max_size=10)
    def f(x: int) -> int:
        calls.append(x)
        return x

    f(1)
    f(2)
    f(1)
    assert calls == [1, 2]
    outer = f.cache_info()
    inner = f.__wrapped__.cache_info()
    assert outer.currsize == 1
    assert inner.currsize == 2
    assert inner.hits == 1


def test_methods_include_self_in_the_key() -> None:
    """A cached method keys on self: two instances never share entries."""

    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name
            self.calls = 0

        @op(cache=True)
        def get(self, key: int) -> str:
            self.calls += 1
            return f"{self.name}:{key}"

    r1, r2 = Repo("a"), Repo("b")
    assert r1.get(1) == "a:1"
    assert r2.get(1) == "b:1"
    assert r1.get(1) == "a:1"
    assert (r1.calls, r2.calls) == (1, 1)
    assert Repo.get.cache_get(r1, 1) == "a:1"


def test_store_bound_limits_instances_kept_alive() -> None:
    """Instances used as keys are released once evicted beyond cache_max_size."""

    class Obj:
        @op(cache=True, cache_max_size=2)
        def value(self) -> int:
            return 1

    refs = []
    for _ in range(10):
        o = Obj()
        o.value()
        refs.append(weakref.ref(o))
        del o
    gc.collect()
    alive = sum(1 for r in refs if r() is not None)
    assert alive <= 2


def test_uncached_function_has_inert_cache_helpers() -> None:
    """Without cache=True the helpers exist: get misses, delete is False, info is empty."""
    f = op(retries=0)(lambda x: x)
    with pytest.raises(KeyError, match="cache=True"):
        f.cache_get(1)
    assert f.cache_delete(1) is False
    f.cache_clear()
    assert f.cache_info().currsize == 0


def test_cached_function_pickles_by_reference() -> None:
    """A module-level cached function pickles by reference to itself."""
    import pickle

    assert pickle.loads(pickle.dumps(module_level)) is module_level
    assert pickle.loads(pickle.dumps(module_level_plain)) is module_level_plain


@op(cache=True)
def module_level(x: int) -> int:
    """Return x (cached at module level, for the pickling test)."""
    return x


@op(retries=1)
def module_level_plain(x: int) -> int:
    """Return x (retried at module level, for the pickling test)."""
    return x


def test_unbounded_store_when_max_size_is_none() -> None:
    """cache_max_size=None keeps every entry (no evictions)."""
    f, _ = counted(cache_max_size=None)
    for i in range(3000):
        f(i)
    info = f.cache_info()
    assert info.maxsize is None
    assert info.currsize == 3000
    assert info.evictions == 0


def test_async_helpers_delete_and_clear() -> None:
    """cache_delete and cache_clear work on an async function's store."""
    calls: list[int] = []

    @op(cache=True)
    async def f(x: int) -> int:
        calls.append(x)
        return x

    asyncio.run(f(1))
    asyncio.run(f(2))
    assert f.cache_delete(1) is True
    asyncio.run(f(1))
    assert calls == [1, 2, 1]
    f.cache_clear()
    assert f.cache_info().currsize == 0


def test_function_and_options_in_one_call() -> None:
    """opero(func, cache=True) decorates directly, like the decorator form."""

    def g(x: int) -> int:
        return x + 1

    decorated = op(g, cache=True)  # type: ignore[call-overload]
    assert decorated(1) == 2
    assert decorated(1) == 2
    assert decorated.cache_info().hits == 1
