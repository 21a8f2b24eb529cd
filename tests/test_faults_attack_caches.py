"""Faults found by the hostile pass on caches, keys, single flight, exit, fork and shared backends.

Each test reproduces one attack that broke the fixed build; scenarios that can hang
run in a subprocess with a deadline (``faultkit.run_scenario``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import logging
import shutil
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis

from faultkit import run_scenario
from opero import opero
from opero.cache import MISS
from opero.cache import _disk as disk_module
from opero.cache._disk import DiskBackend
from opero.errors import CacheBackendError, ConfigurationError


def _open_disk(backend: DiskBackend) -> Any:
    return backend.open(
        namespace="opero", qualname="tests.f", ttl=None, max_size=None, is_async=False
    )


class _HeldLock:
    """Holds the SQLite write lock of the ``opero`` namespace's store from another connection."""

    def __init__(self, directory: Path) -> None:
        self.con = sqlite3.connect(
            str(directory / "ns-opero" / "cache.db"), isolation_level=None, timeout=0
        )
        self.con.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.con.execute("COMMIT")
        self.con.close()


# --------------------------------------------------------------------------------------
# disk: a busy SQLite lock is back-pressure from other writers, never an outage


def test_disk_busy_lock_is_a_miss_not_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A set finding the SQLite lock busy is a logged miss; the next set, lock free, is stored."""
    monkeypatch.setattr(disk_module, "_SQLITE_TIMEOUT", 0.3)
    backend = DiskBackend(tmp_path, retry_interval=3600)
    cache = _open_disk(backend)
    cache.set("a", 1)  # opens the store
    lock = _HeldLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="opero"):
        cache.set("b", 2)  # another process writes: the lock stays busy
        lock.release()
        cache.set("c", 3)
    assert not backend.outage.down
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, MISS, 3)
    messages = [record.getMessage() for record in caplog.records]
    assert any("lock stayed busy" in message and "set" in message for message in messages)
    assert not any("unavailable" in message for message in messages)


def test_disk_busy_lock_in_strict_mode_raises_naming_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In strict mode a lock that stays busy raises CacheBackendError saying so."""
    monkeypatch.setattr(disk_module, "_SQLITE_TIMEOUT", 0.3)
    backend = DiskBackend(tmp_path, strict=True)
    cache = _open_disk(backend)
    cache.set("a", 1)
    lock = _HeldLock(tmp_path)
    try:
        with pytest.raises(CacheBackendError, match="SQLite lock busy"):
            cache.set("b", 2)
    finally:
        lock.release()
    assert not backend.outage.down


def test_disk_operation_retries_an_immediate_database_is_locked(tmp_path: Path) -> None:
    """A "database is locked" raised at once (no busy timeout, as when a store opens) is retried."""
    backend = DiskBackend(tmp_path)
    calls: list[int] = []

    def operation() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert backend.run(operation) == "done"
    assert len(calls) == 3

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        backend.run(broken)


# --------------------------------------------------------------------------------------
# single flight of user backends: a key's __eq__ that calls the function again


def test_user_backend_flight_survives_a_key_whose_eq_calls_the_function() -> None:
    """A key compared under the flight table's lock may call the function again: no deadlock."""
    outcome = run_scenario(
        """
        import threading, time
        from opero import opero
        from opero.cache import MISS

        class Entries:
            def __init__(self):
                self.data = {}
            def get(self, key):
                return self.data.get(key, MISS)
            def set(self, key, value):
                self.data[key] = value
            def delete(self, key):
                return self.data.pop(key, MISS) is not MISS
            def clear(self):
                self.data.clear()
            def info(self):
                return None

        class Backend:
            stable_keys = False
            def open(self, **options):
                return Entries()

        started = threading.Event()
        release = threading.Event()

        @opero(cache=True, retries=0, cache_backend=Backend())
        def f(x):
            if getattr(x, "slow", False):
                started.set()
                release.wait(30)
            return repr(x)

        class Key:
            def __init__(self, n, slow=False):
                self.n, self.slow = n, slow
            def __hash__(self):
                return 1  # every Key collides: the table compares them
            def __eq__(self, other):
                f(12345)  # hostile: computes another key of f while compared
                return isinstance(other, Key) and other.n == self.n
            def __repr__(self):
                return f"Key({self.n})"

        first = threading.Thread(target=f, args=(Key(1, slow=True),))
        first.start()
        started.wait(30)
        print("second", f(Key(2)))
        release.set()
        first.join(30)
        print("first done", not first.is_alive())
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["second Key(2)", "first done True"]


# --------------------------------------------------------------------------------------
# disk: a cache directory deleted under a running process


def test_disk_store_deleted_under_a_running_process_is_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After rm -rf of cache_dir the process stops serving the deleted store and writes anew."""
    monkeypatch.setattr(disk_module, "_CHECK_EVERY", 0.0)
    directory = tmp_path / "cache"
    calls: list[int] = []

    @opero(cache=True, retries=0, cache_backend="disk", cache_dir=directory)
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    assert (double(1), double(1), calls) == (2, 2, [1])
    shutil.rmtree(directory)  # a clean-up job invalidates the cache
    assert (double(1), double(1), calls) == (2, 2, [1, 1])
    raw = diskcache.Cache(str(directory / "ns-opero"))
    try:
        assert len(raw) == 1  # written where every other process looks
    finally:
        raw.close()


# --------------------------------------------------------------------------------------
# shared caches: results of a class made per call, which no serializer can encode


def test_unserializable_class_made_per_call_is_not_kept_alive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Results of a class made per call that cannot be pickled leak no class and warn once."""
    classes: list[weakref.ref[type]] = []

    @opero(cache=True, retries=0, cache_backend="disk", cache_dir=tmp_path)
    def row(x: int) -> Any:
        made = collections.namedtuple("made", "x")  # not importable by name: pickle refuses it
        classes.append(weakref.ref(made))
        return made(x)

    with caplog.at_level(logging.WARNING, logger="opero"):
        assert [row(i).x for i in range(50)] == list(range(50))
    gc.collect()
    assert sum(ref() is not None for ref in classes) == 0
    assert sum("is not cached" in record.getMessage() for record in caplog.records) == 1


def test_shared_cache_get_miss_raises_key_error_for_any_argument(tmp_path: Path) -> None:
    """cache_get on a miss raises KeyError even when an argument's repr fails or is huge."""

    @opero(cache=True, retries=0, cache_backend="disk", cache_dir=tmp_path)
    def last_digits(x: Any) -> int:
        return len(str(x)) if isinstance(x, str) else 0

    for argument in (10**5000, "x" * 1_000_000, list(range(100_000))):
        with pytest.raises(KeyError) as caught:
            last_digits.cache_get(argument)
        assert len(str(caught.value)) < 300


# --------------------------------------------------------------------------------------
# disk: fork while another thread is inside a SQLite write transaction


def test_disk_fork_during_another_threads_write_leaves_the_child_able_to_write(
    tmp_path: Path,
) -> None:
    """A child forked while another thread writes the disk cache can write (no inherited lock)."""
    outcome = run_scenario(
        f"""
        import os, threading, time
        import opero.cache._disk as disk
        disk._SQLITE_TIMEOUT = 3.0
        from opero.cache import MISS
        backend = disk.DiskBackend({str(tmp_path)!r})
        cache = backend.open(
            namespace="opero", qualname="m.f", ttl=None, max_size=None, is_async=False
        )
        cache.set("before", 1)
        store = backend.store("opero")
        inside, release = threading.Event(), threading.Event()

        def slow_write():  # an operation of the cache, caught inside its transaction
            with store.transact():
                store.set("slow", b"x")
                inside.set()
                release.wait(30)

        writer = threading.Thread(target=backend.run, args=(slow_write,))
        writer.start()
        inside.wait(30)
        threading.Timer(0.3, release.set).start()
        pid = os.fork()
        if pid == 0:
            cache.set("child", 2)
            os.write(1, f"child {{cache.get('child')}}\\n".encode())
            os._exit(0)
        writer.join(30)
        os.waitpid(pid, 0)
        print("parent", cache.get("child"), cache.get("before"))
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["child 2", "parent 2 1"], outcome.stderr


# --------------------------------------------------------------------------------------
# shared caches: identity of partials, callable objects and bound built-in methods


class _Scale:
    """A callable object: its name is its class, the same for every instance."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return x * self.factor


def _power(x: int, exp: int) -> int:
    return int(x**exp)


def test_callable_objects_on_a_shared_cache_never_read_each_others_entries(
    tmp_path: Path,
) -> None:
    """Callable objects decorated one after another (ids reused) never get another's result."""
    results = []
    for factor in range(1, 20):
        scaled = opero(cache=True, retries=0, cache_backend="disk", cache_dir=tmp_path)(
            _Scale(factor)
        )
        results.append(scaled(3))
        del scaled
        gc.collect()  # frees the object: the next one may get its address
    assert results == [3 * factor for factor in range(1, 20)]


def test_partials_on_a_shared_cache_are_told_apart_by_their_bound_arguments(
    tmp_path: Path,
) -> None:
    """Partials of one function differ by bound arguments; a huge or unprintable one decorates."""

    def shared(func: Any) -> Any:
        return opero(cache=True, retries=0, cache_backend="disk", cache_dir=tmp_path)(func)

    square = shared(functools.partial(_power, exp=2))
    cube = shared(functools.partial(_power, exp=3))
    assert (square(3), cube(3), shared(functools.partial(_power, exp=2))(3)) == (9, 27, 9)
    huge = shared(functools.partial(_power, exp=10**5000))  # its repr raises ValueError
    assert huge.cache_get.__name__ == "cache_get"
    big = shared(functools.partial(_power, exp=2, **{"unused": list(range(10**5))}))
    assert len(big.__opero__.cache.prefix) < 200  # keys do not carry the bound values


def test_partial_identity_is_the_same_in_every_process() -> None:
    """A partial of a module-level function over frozen values has one identity across runs."""
    source = """
        import functools, os
        from opero.cache._identity import function_identity
        func = functools.partial(os.path.join, "a", sep=frozenset({"x", "y", "z"}))
        print(function_identity(func, "functools.partial(posixpath.join)", has_cache_key=False))
    """
    identities = {
        run_scenario(source, env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in "123"
    }
    assert len(identities) == 1
    assert next(iter(identities)).startswith("functools.partial(posixpath.join)#")


def test_bound_builtin_methods_on_a_shared_cache_are_told_apart(tmp_path: Path) -> None:
    """Built-in methods bound to different strings are different functions for a shared cache."""
    shared = opero(cache=True, retries=0, cache_backend="disk", cache_dir=tmp_path)
    assert (shared("abc".upper)(), shared("xyz".upper)()) == ("ABC", "XYZ")
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    get_first, get_second = shared(first.get), shared(second.get)  # equal (empty) when decorated
    first["k"], second["k"] = 1, 2
    assert (get_first("k"), get_second("k")) == (1, 2)


# --------------------------------------------------------------------------------------
# memory, async: a cache_key that returns a list (keyed by structure, as in sync code)


def test_async_cache_key_returning_a_list_works_and_computes_once() -> None:
    """An async function whose cache_key returns a list is cached and single-flighted."""
    calls: list[str] = []

    @opero(cache=True, retries=0, cache_key=lambda func, name: ["user", name])
    async def lookup(name: str) -> str:
        calls.append(name)
        await asyncio.sleep(0.05)
        return name.upper()

    async def main() -> list[str]:
        return list(await asyncio.gather(*(lookup("ann") for _ in range(5))))

    assert asyncio.run(main()) == ["ANN"] * 5
    assert asyncio.run(lookup("ann")) == "ANN"
    assert calls == ["ann"]


# --------------------------------------------------------------------------------------
# redis: an error answer on every call (OOM at maxmemory) is not a log flood


def test_redis_error_answer_on_every_call_is_logged_once_not_per_call(
    restartable_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis answering OOM to every SET gives misses and one warning, not one per call."""
    admin = redis.Redis.from_url(restartable_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # every write is refused: OutOfMemoryError
    try:

        @opero(cache=True, retries=0, cache_backend="redis", cache_redis_url=restartable_redis.url)
        def label(x: int) -> str:
            return f"item-{x}"

        with caplog.at_level(logging.WARNING, logger="opero"):
            assert [label(i) for i in range(30)] == [f"item-{i}" for i in range(30)]
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
    refused = [r.getMessage() for r in caplog.records if "OutOfMemoryError" in r.getMessage()]
    assert len(refused) == 1, refused
    assert not label.__opero__.cache.backend.outage.down


def test_empty_cache_dir_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cache_dir="" (an unset variable) is refused at decoration, not the current directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="cache_dir='' is empty"):
        opero(cache=True, cache_backend="disk", cache_dir="")(len)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# redis: entries of private identities outlive their decorations


def test_redis_entries_of_dead_private_decorations_do_not_accumulate(redis_url: str) -> None:
    """Decorating a local function per request leaves no unbounded trail of Redis keys."""
    admin = redis.Redis.from_url(redis_url)

    def handle(x: int) -> int:
        lock = threading.Lock()  # no stable encoding: a private identity per decoration

        def fetch(y: int) -> int:
            with lock:
                return y * 2

        cached = opero(
            cache=True,
            retries=0,
            cache_backend="redis",
            cache_redis_url=redis_url,
            cache_namespace="per-request",
        )(fetch)
        return cached(x)

    try:
        assert [handle(1) for _ in range(50)] == [2] * 50
        gc.collect()
        # A dropped private decoration's entries are deleted off the caller's thread.
        deadline = time.monotonic() + 20
        while admin.keys("per-request:*") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admin.keys("per-request:*") == []
    finally:
        admin.close()


def test_a_live_private_decoration_keeps_its_redis_entries(redis_url: str) -> None:
    """Entries of a private decoration stay while it lives; others' namesakes are untouched."""
    admin = redis.Redis.from_url(redis_url)
    lock = threading.Lock()

    def fetch(y: int) -> int:
        with lock:
            return y * 2

    options = {"cache": True, "retries": 0, "cache_backend": "redis"}
    keep = opero(**options, cache_redis_url=redis_url, cache_namespace="live")(fetch)
    try:
        assert keep(1) == 2
        dropped = opero(**options, cache_redis_url=redis_url, cache_namespace="live")(fetch)
        assert dropped(2) == 4
        del dropped
        gc.collect()
        deadline = time.monotonic() + 20
        while len(admin.keys("live:*")) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(admin.keys("live:*")) == 1
        assert keep(1) == 2
        assert keep.cache_info().hits == 1  # its own entry is still there
    finally:
        admin.close()


# --------------------------------------------------------------------------------------
# user backends: a cache_key result that is a list


class _ListKeyEntries:
    """A user backend's entries that accept any key, hashable or not (keyed by repr)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: Any) -> Any:
        return self.data.get(repr(key), MISS)

    def set(self, key: Any, value: Any) -> None:
        self.data[repr(key)] = value

    def delete(self, key: Any) -> bool:
        return self.data.pop(repr(key), MISS) is not MISS

    def clear(self) -> None:
        self.data.clear()

    def info(self) -> None:
        return None

    async def aget(self, key: Any) -> Any:
        return self.get(key)

    async def aset(self, key: Any, value: Any) -> None:
        self.set(key, value)


class _ListKeyBackend:
    stable_keys = False

    def open(self, **options: Any) -> _ListKeyEntries:
        return _ListKeyEntries()


def test_user_backend_cache_key_returning_a_list_single_flights() -> None:
    """A user backend gets a list cache_key as it is; concurrent misses still compute once."""
    calls: list[int] = []
    release = threading.Event()

    @opero(
        cache=True,
        retries=0,
        cache_backend=_ListKeyBackend(),
        cache_key=lambda func, x: ["item", x],
    )
    def slow(x: int) -> int:
        calls.append(x)
        release.wait(10)
        return x * 2

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(slow(4))) for _ in range(4)]
    for thread in threads:
        thread.start()
    threading.Timer(0.3, release.set).start()
    for thread in threads:
        thread.join(30)
    assert results == [8, 8, 8, 8]
    assert calls == [4]
    assert slow.__opero__.cache.data == {"['item', 4]": 8}


# --------------------------------------------------------------------------------------
# identity: local functions over a mutable container filled after decoration


def test_closures_over_containers_filled_later_keep_separate_entries(tmp_path: Path) -> None:
    """Two closures over their own table, equal when decorated, never get each other's result."""

    def make_lookup() -> tuple[Any, dict[str, str]]:
        table: dict[str, str] = {}

        @opero(cache=True, retries=0, cache_backend="disk", cache_dir=tmp_path)
        def lookup(key: str) -> str | None:
            return table.get(key)

        return lookup, table

    first, first_table = make_lookup()
    second, second_table = make_lookup()
    first_table["k"], second_table["k"] = "one", "two"
    assert (first("k"), second("k")) == ("one", "two")
