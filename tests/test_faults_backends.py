"""Faults of the shared cache backends (d01, d05, d06, d15, d17, fork), against real services.

Redis tests use a real ``redis-server`` (the ``redis_url`` fixture); disk tests a
directory under ``tmp_path``. Scenarios that fork run in a subprocess with a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis

import opero
from faultkit import run_scenario
from opero import ConfigurationError, RateLimitTimeout
from opero import opero as cached_with
from opero._opero_core import stable_digest_call
from opero._ratelimit.redis import RedisRateLimiter
from opero.cache import RedisBackend, _identity, _registry
from opero.cache import _disk as disk_module

# --------------------------------------------------------------------------------------
# helpers


class Payload:
    """Pickles into a call that creates ``marker`` when it is loaded (an attacker's value)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def _forge_every_row(cache_dir: Path, value: Any) -> int:
    """Overwrite every stored entry under ``cache_dir`` through diskcache's pickle mode."""
    forged = 0
    for root, _dirs, files in os.walk(cache_dir):
        if "cache.db" not in files:
            continue
        with diskcache.Cache(root) as store:
            for key in list(store.iterkeys()):
                _old, tag = store.get(key, tag=True)
                store.set(key, value, tag=tag)
                forged += 1
    return forged


def _outages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "opero" and "unavailable" in r.getMessage()
    ]


def _shared_options(kind: str, redis_url: str, tmp_path: Path) -> dict[str, Any]:
    if kind == "redis":
        return {"cache_backend": "redis", "cache_redis_url": redis_url}
    return {"cache_backend": "disk", "cache_dir": str(tmp_path / "cache")}


@pytest.fixture(params=["redis", "disk"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Options of one shared backend: a real Redis, or a disk directory under tmp_path."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return _shared_options("redis", url, tmp_path)
    return _shared_options("disk", "", tmp_path)


# --------------------------------------------------------------------------------------
# d01: nothing is unpickled before it is verified


@pytest.mark.parametrize(
    "options",
    [{"cache_secret": "s3cret"}, {"cache_serializer": "json"}],
    ids=["secret", "json"],
)
@pytest.mark.parametrize("padding", [0, 100_000], ids=["row", "value-file"])
def test_forged_disk_pickle_is_never_loaded(
    tmp_path: Path, options: dict[str, Any], padding: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A pickle written into a signed or JSON disk cache through diskcache is a miss, never run."""
    cache_dir = tmp_path / "cache"
    marker = tmp_path / "payload-ran"
    calls: list[str] = []

    @cached_with(cache=True, cache_backend="disk", cache_dir=cache_dir, retries=0, **options)
    def balance(account: str) -> int:
        calls.append(account)
        return 100

    assert balance("acct-1") == 100
    # With padding the pickle exceeds 32 KiB, so diskcache keeps it in a value file.
    value: Any = [Payload(str(marker)), b"x" * padding] if padding else Payload(str(marker))
    assert _forge_every_row(cache_dir, value) == 1
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert balance("acct-1") == 100
    assert calls == ["acct-1", "acct-1"], "the forged entry is a miss: computed again"
    assert not marker.exists(), "the forged pickle was loaded"
    assert any("not written by opero" in r.getMessage() for r in caplog.records)


def test_disk_value_file_outside_the_store_is_neither_read_nor_removed(tmp_path: Path) -> None:
    """A row naming a value file outside its store is a miss, and deleting it spares the file."""
    cache_dir = tmp_path / "cache"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not opero's")

    @cached_with(cache=True, cache_backend="disk", cache_dir=cache_dir, retries=0)
    def value(x: int) -> int:
        return x

    assert value(1) == 1
    (database,) = list(cache_dir.glob("ns-*/cache.db"))
    with sqlite3.connect(database) as con:
        con.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL", (str(victim),))
    with pytest.raises(KeyError):
        value.cache_get(1)
    assert value.cache_delete(1) is True
    assert victim.read_bytes() == b"not opero's"


def test_disk_pickled_key_row_is_refused() -> None:
    """The disk store refuses to unpickle a key (opero only stores raw str keys)."""
    disk = disk_module._opaque_disk()(str(Path.cwd()))
    with pytest.raises(ValueError, match="pickled diskcache key"):
        disk.get(b"\x80\x04N.", False)
    assert disk.get("plain", True) == "plain"


# --------------------------------------------------------------------------------------
# d05: different functions never share entries


def test_closures_of_one_factory_keep_separate_entries(shared: dict[str, Any]) -> None:
    """make_scaler(2) and make_scaler(3) (same qualname) never serve each other's results."""

    def make_scaler(factor: int) -> Callable[[int], int]:
        @cached_with(cache=True, retries=0, **shared)
        def scale(x: int) -> int:
            return x * factor

        return scale

    double, triple = make_scaler(2), make_scaler(3)
    assert (double(5), triple(5)) == (10, 15)
    assert (double(5), triple(5)) == (10, 15)
    assert double.cache_info().hits == triple.cache_info().hits == 1


def test_lambdas_of_one_scope_keep_separate_entries(shared: dict[str, Any]) -> None:
    """Two different lambdas decorated in one scope never serve each other's results."""
    inc = cached_with(cache=True, retries=0, **shared)(lambda x: x + 1)
    neg = cached_with(cache=True, retries=0, **shared)(lambda x: -x)
    assert (inc(1), neg(1)) == (2, -1)


def test_defaults_are_part_of_a_local_functions_identity(shared: dict[str, Any]) -> None:
    """Lambdas that differ only by a default value keep separate entries."""
    by_two = cached_with(cache=True, retries=0, **shared)(lambda x, k=2: x * k)
    by_three = cached_with(cache=True, retries=0, **shared)(lambda x, k=3: x * k)
    assert (by_two(5), by_three(5)) == (10, 15)


def test_unencodable_closure_gets_a_private_identity(
    shared: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closure over a lock works, never shares with a namesake, and warns naming cache_key=."""
    monkeypatch.setattr(_identity, "_WARNED", set())  # warned once per qualname per process

    def make(lock: Any, offset: int) -> Callable[[int], int]:
        def guarded(x: int) -> int:
            with lock:
                return x + offset

        return guarded

    with caplog.at_level(logging.WARNING, logger="opero"):
        first = cached_with(cache=True, retries=0, **shared)(make(threading.Lock(), 0))
        second = cached_with(cache=True, retries=0, **shared)(make(threading.Lock(), 100))
    assert [r.getMessage() for r in caplog.records if "closure variable 'lock'" in r.getMessage()]
    assert any("cache_key=" in r.getMessage() for r in caplog.records)
    assert (first(3), second(3)) == (3, 103)  # namesakes never share entries
    assert first(3) == 3
    assert first.cache_info().hits == 1  # the same decoration still hits
    keyed = cached_with(cache=True, retries=0, cache_key=lambda f, x: ("guarded", x), **shared)(
        make(threading.Lock(), 0)
    )
    assert keyed(3) == keyed(3) == 3
    assert keyed.cache_info().hits == 1


def test_self_containing_closure_value_decorates_without_a_crash(shared: dict[str, Any]) -> None:
    """A closure over a list that contains itself gets a private identity, never a crash."""
    loop: list[Any] = []
    loop.append(loop)

    def looped(x: int) -> int:
        return x + len(loop)

    cached = cached_with(cache=True, retries=0, **shared)(looped)
    assert cached(1) == cached(1) == 2
    assert cached.cache_info().hits == 1


def test_closure_over_other_opero_functions_is_encoded_by_what_they_wrap(
    shared: dict[str, Any],
) -> None:
    """A local function calling local @opero helpers (sync and async) keeps apart per helper."""

    def make(offset: int) -> Callable[[int], int]:
        @cached_with(cache=True, retries=0)
        def helper(x: int) -> int:
            return x + offset

        @cached_with(cache=True, retries=0)
        async def ahelper(x: int) -> int:
            return x

        @cached_with(cache=True, retries=0, **shared)
        def outer(x: int) -> int:
            assert ahelper is not None
            return helper(x)

        return outer

    assert (make(1)(1), make(2)(1)) == (2, 3)


def test_shared_layer_over_a_memory_layer_tells_closures_apart(shared: dict[str, Any]) -> None:
    """A shared cache stacked over a memory-cached closure is keyed by the closure inside."""

    def make(factor: int) -> Callable[[int], int]:
        @cached_with(cache=True, retries=0, **shared)
        @cached_with(cache=True, retries=0)
        def scale(x: int) -> int:
            return x * factor

        return scale

    assert (make(2)(5), make(3)(5)) == (10, 15)


class Repo:
    """Something whose bound methods a caller might decorate."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get(self, x: int) -> str:
        """Return this repo's name and ``x``."""
        return f"{self.name}:{x}"

    @classmethod
    def kind(cls, x: int) -> str:
        """Return the class name and ``x``."""
        return f"{cls.__name__}:{x}"


def test_bound_methods_of_different_objects_never_share(shared: dict[str, Any]) -> None:
    """a.get and b.get keep apart (private identities); a classmethod or a cache_key works."""
    a_get = cached_with(cache=True, retries=0, **shared)(Repo("a").get)
    b_get = cached_with(cache=True, retries=0, **shared)(Repo("b").get)
    assert (a_get(1), b_get(1)) == ("a:1", "b:1")
    assert cached_with(cache=True, retries=0, **shared)(Repo.kind)(1) == "Repo:1"
    keyed = {
        name: cached_with(cache=True, retries=0, cache_key=lambda f, x, n=name: (n, x), **shared)(
            Repo(name).get
        )
        for name in ("a", "b")
    }
    assert (keyed["a"](1), keyed["b"](1)) == ("a:1", "b:1")


def test_memory_backend_accepts_any_closure() -> None:
    """The memory backend keeps one store per function, so any closure value is fine there."""
    lock = threading.Lock()

    @cached_with(cache=True, retries=0)
    def guarded(x: int) -> int:
        with lock:
            return x

    assert guarded(2) == guarded(2) == 2


def module_level_square(x: int) -> int:
    """Return the square (module level: its identity is module.qualname)."""
    return x * x


def test_module_level_function_keeps_module_qualname(redis_url: str) -> None:
    """A module-level function's Redis key stays namespace:module.qualname:digest."""
    square = cached_with(cache=True, retries=0, cache_backend="redis", cache_redis_url=redis_url)(
        module_level_square
    )
    assert square(4) == 16
    keys = redis.Redis.from_url(redis_url).keys("*")
    digest = stable_digest_call((4,), {})
    assert keys == [f"opero:{__name__}.module_level_square:{digest}".encode()]


def test_local_function_identity_is_stable_across_processes(tmp_path: Path) -> None:
    """The same local function over the same frozen values shares disk entries across runs."""
    source = """
        import sys
        from opero import opero

        def make(tags):
            @opero(cache=True, retries=0, cache_backend="disk", cache_dir=sys.argv[1])
            def label(x):
                calls.append(x)
                return f"{x}:{sorted(tags)}:{x in {'a', 'b', 'c'}}"
            return label

        calls = []
        label = make(frozenset({"red", "green", "blue"}))
        print(label("a"), len(calls))
    """
    first = run_scenario(source, timeout=60, env={"PYTHONHASHSEED": "1"}, args=(str(tmp_path),))
    second = run_scenario(source, timeout=60, env={"PYTHONHASHSEED": "2"}, args=(str(tmp_path),))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.lines() == ["a:['blue', 'green', 'red']:True 1"]
    assert second.lines() == ["a:['blue', 'green', 'red']:True 0"], "a hit from the first run"


# --------------------------------------------------------------------------------------
# d06: a full pool is back-pressure, never an outage

TASKS = 300


def test_async_readers_beyond_the_pool_size_all_hit(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """300 concurrent async readers of a stored key (pool of 100) all hit, no outage logged."""
    calls: list[str] = []

    @cached_with(cache=True, cache_backend="redis", cache_redis_url=redis_url, retries=0)
    async def price(sku: str) -> int:
        calls.append(sku)
        return 42

    async def run() -> list[int]:
        await price("a")
        return await asyncio.gather(*(price("a") for _ in range(TASKS)))

    with caplog.at_level(logging.INFO, logger="opero"):
        assert asyncio.run(run()) == [42] * TASKS
    assert calls == ["a"]
    assert _outages(caplog) == []


def _small_pool_client(url: str, size: int) -> tuple[redis.Redis, redis.ConnectionPool]:
    pool = redis.ConnectionPool.from_url(url, max_connections=size)
    return redis.Redis(connection_pool=pool), pool


def test_user_client_full_pool_waits_for_a_connection(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A user client whose pool is full waits for a connection: a hit, no outage, no recompute."""
    client, pool = _small_pool_client(redis_url, 1)
    backend = RedisBackend(client=client, pool_timeout=30.0)
    calls: list[int] = []

    @cached_with(cache=True, cache_backend=backend, retries=0)
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    assert double(4) == 8
    held = pool.get_connection()  # the pool's only connection is now busy
    results: list[int] = []
    reader = threading.Thread(target=lambda: results.append(double(4)))
    with caplog.at_level(logging.INFO, logger="opero"):
        reader.start()
        time.sleep(0.2)
        assert results == [], "the reader waits while the pool is full"
        pool.release(held)
        reader.join(30)
    assert results == [8]
    assert calls == [4], "served from Redis, not recomputed"
    assert _outages(caplog) == []
    assert not backend.outage.down


def test_pool_full_past_pool_timeout_is_a_miss_not_an_outage(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool still full after pool_timeout gives a logged miss; Redis is not marked down."""
    client, pool = _small_pool_client(redis_url, 1)
    backend = RedisBackend(client=client, pool_timeout=0.1)

    @cached_with(cache=True, cache_backend=backend, retries=0)
    def double(x: int) -> int:
        return 2 * x

    held = pool.get_connection()
    try:
        with caplog.at_level(logging.INFO, logger="opero"):
            assert double(4) == 8
    finally:
        pool.release(held)
    assert not backend.outage.down
    assert _outages(caplog) == []
    assert any("no connection" in r.getMessage() for r in caplog.records)
    assert double(4) == 8


def test_url_client_blocking_pool_waits_then_misses_without_outage(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL-built client waits on its blocking pool; past pool_timeout a miss, not an outage."""
    backend = RedisBackend(redis_url, max_connections=1, pool_timeout=0.3)
    calls: list[int] = []

    @cached_with(cache=True, cache_backend=backend, retries=0)
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    assert double(4) == 8
    pool = backend.sync_client().connection_pool
    held = pool.get_connection()
    with caplog.at_level(logging.INFO, logger="opero"):
        assert double(4) == 8  # the pool stays full: a miss after 0.3 s
        assert calls == [4, 4]
        results: list[int] = []
        reader = threading.Thread(target=lambda: results.append(double(4)))
        reader.start()
        pool.release(held)  # freed while the reader waits (or before it asks)
        reader.join(30)
    assert results == [8]
    assert calls == [4, 4], "the waiting reader was served by Redis"
    assert _outages(caplog) == []
    assert not backend.outage.down


def test_outage_tracker_never_counts_a_full_pool() -> None:
    """Outage.failed ignores a full pool (either redis-py form); a refused connection counts."""
    from opero._connections.health import Outage

    outage = Outage("test service")
    outage.failed(redis.exceptions.MaxConnectionsError("Too many connections"), "misses")
    outage.failed(redis.exceptions.ConnectionError("No connection available."), "misses")
    assert not outage.down
    outage.failed(redis.exceptions.ConnectionError("Connection refused"), "misses")
    assert outage.down


def test_rate_limiter_full_pool_never_uses_the_local_bucket(redis_url: str) -> None:
    """With its pool full, the Redis limiter waits, then raises RateLimitTimeout: never local."""
    client, pool = _small_pool_client(redis_url, 1)
    limiter = RedisRateLimiter("fault-pool", 1000, client=client, pool_timeout=0.1)
    assert limiter.reserve_with_time()[0] > 0  # the server decided
    held = pool.get_connection()
    try:
        with pytest.raises(RateLimitTimeout, match="fault-pool"):
            limiter.reserve()
    finally:
        pool.release(held)
    assert limiter._local is None, "the local per-process bucket was never used"
    assert not limiter.outage.down
    server_time, _wait = limiter.reserve_with_time()
    assert server_time == server_time, "decided by Redis again (not NaN)"


def test_async_rate_limiter_beyond_pool_size_stays_shared(redis_url: str) -> None:
    """50 concurrent async decisions over a pool of 3 all book one shared Redis bucket."""
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=3)
    # One token per 1000 s: decision i must wait i * 1000 s (minus the few ms elapsed).
    limiter = RedisRateLimiter("fault-async-pool", 0.001, client=client)

    async def run() -> list[float]:
        try:
            return await asyncio.gather(*(limiter.areserve() for _ in range(50)))
        finally:
            await client.aclose()

    waits = sorted(asyncio.run(run()))
    assert limiter._local is None
    assert not limiter.outage.down
    assert [round(wait / 1000) for wait in waits] == list(range(50))


# --------------------------------------------------------------------------------------
# d15: clearing one namespace never touches another

TRICKY = ["prices", "prices:eu", "prices*", "pr?ces", "prices[eu]", "back\\slash", "100%", "p%3Aeu"]


def test_clear_cache_reaches_one_namespace_only(shared: dict[str, Any]) -> None:
    """clear_cache(ns) recomputes ns only, for namespaces with ':', '%' and glob metacharacters."""
    calls: list[str] = []

    def make(namespace: str) -> Callable[[str], str]:
        @cached_with(cache=True, retries=0, cache_namespace=namespace, **shared)
        def price(sku: str) -> str:
            calls.append(namespace)
            return namespace

        return price

    functions = {namespace: make(namespace) for namespace in TRICKY}
    for function in functions.values():
        function("a")
    for namespace in TRICKY:
        calls.clear()
        opero.clear_cache(namespace)
        for function in functions.values():
            function("a")
        assert calls == [namespace]


def test_disk_namespace_too_long_for_a_directory_fails_at_decoration(tmp_path: Path) -> None:
    """A namespace whose directory name exceeds 255 bytes is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=r"cache_namespace=.*too long"):
        cached_with(
            cache=True, cache_backend="disk", cache_dir=tmp_path, cache_namespace="n" * 300
        )(module_level_square)


def test_cache_clear_of_one_function_spares_its_namesake_in_another_namespace(
    redis_url: str,
) -> None:
    """cache_clear() of ns 'a' spares namespace 'a:b' in Redis even with the same function."""
    opts = {"cache": True, "retries": 0, "cache_backend": "redis", "cache_redis_url": redis_url}
    first = cached_with(cache_namespace="a", **opts)(module_level_square)
    second = cached_with(cache_namespace="a:b", **opts)(module_level_square)
    first(2), second(2)
    first.cache_clear()
    raw = redis.Redis.from_url(redis_url)
    assert [k.decode().split(":")[0] for k in raw.keys("*")] == ["a%3Ab"]


# --------------------------------------------------------------------------------------
# d17: what opero keeps for a namespace is freed with its last function


def test_dropped_namespaces_leave_nothing_behind(tmp_path: Path) -> None:
    """Functions with one namespace each, once dropped, leave no registry entry behind."""
    backend = RedisBackend("redis://127.0.0.1:1/0")  # never reached: nothing is called

    def one(i: int) -> None:
        for options in (
            {},
            {"cache_backend": backend},
            {"cache_backend": "disk", "cache_dir": str(tmp_path)},
        ):
            func = cached_with(cache=True, retries=0, cache_namespace=f"gone-{i}", **options)(
                module_level_square
            )
            if options.get("cache_backend") != backend:
                assert func(3) == 9  # opens the memory store / the namespace's SQLite store
            del func

    for i in range(50):
        one(i)
    gc.collect()
    opero.clear_cache("unrelated")  # any registry call prunes what died
    with _registry._lock:
        left = [ns for ns in list(_registry._backends) + list(_registry._caches) if "gone-" in ns]
    assert left == []
    assert len(backend._opened) == 0
    assert not any("gone-" in key[1] for key in list(disk_module._CACHES.keys()))


def test_clear_cache_still_reaches_every_live_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """clear_cache() clears the live functions of every namespace after others were pruned."""
    # A global clear reaches every backend of the process (other modules' Redis ones
    # too); an empty registry keeps this test to its own functions.
    for name in ("_caches", "_strong", "_backends", "_watch"):
        monkeypatch.setattr(_registry, name, {})
    keep = [
        cached_with(cache=True, retries=0, cache_namespace=f"live-{i}")(module_level_square)
        for i in range(3)
    ]
    for i in range(20):
        cached_with(cache=True, retries=0, cache_namespace=f"dead-{i}")(module_level_square)(1)
    gc.collect()
    for func in keep:
        func(3)
    opero.clear_cache()
    assert [func.cache_info().currsize for func in keep] == [0, 0, 0]
    assert sorted(_registry._backends) == ["live-0", "live-1", "live-2"]


# --------------------------------------------------------------------------------------
# fork: a child uses the caches it inherited


def test_forked_child_uses_inherited_backends(redis_url: str, tmp_path: Path) -> None:
    """A child forked while other threads hold opero's locks uses Redis and disk caches."""
    source = """
        import asyncio, os, sys, threading
        import opero as opero_pkg
        from opero import opero
        from opero._connections import health
        from opero._connections import redis as connections
        from opero.cache import _disk, _redis, _registry

        url, cache_dir = sys.argv[1], sys.argv[2]

        @opero(cache=True, retries=0, cache_backend="redis", cache_redis_url=url)
        def from_redis(x):
            return ("redis", x, os.getpid())

        @opero(cache=True, retries=0, cache_backend="disk", cache_dir=cache_dir)
        def from_disk(x):
            return ("disk", x, os.getpid())

        parent = os.getpid()
        assert from_redis(1)[2] == parent and from_disk(1)[2] == parent

        # Another thread holds every lock of the backends at the moment of fork().
        locks = [
            _registry._lock,
            _redis._LOCK,
            connections._LOCK,
            _disk._LOCK,
            health._REGISTRY_LOCK,
        ]
        held, release = threading.Event(), threading.Event()

        def holder():
            for lock in locks:
                lock.acquire()
            held.set()
            release.wait()
            for lock in locks:
                lock.release()

        threading.Thread(target=holder, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            try:
                ok = from_redis(1)[2] == parent and from_disk(1)[2] == parent  # inherited hits
                ok = ok and from_redis(2)[2] == os.getpid() and from_disk(2)[2] == os.getpid()

                @opero(cache=True, retries=0, cache_backend="redis", cache_redis_url=url,
                       cache_namespace="child")
                async def aredis(x):
                    return x + 1

                ok = ok and asyncio.run(aredis(1)) == 2
                opero_pkg.clear_cache("child")
            except BaseException as exc:
                print("child failed:", repr(exc), flush=True)
                os._exit(1)
            os._exit(0 if ok else 2)
        _, status = os.waitpid(pid, 0)
        release.set()
        print("child", os.waitstatus_to_exitcode(status))
        print("parent", from_redis(2)[2] != parent, from_disk(2)[2] != parent)
    """
    outcome = run_scenario(source, timeout=90, args=(redis_url, str(tmp_path / "cache")))
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["child 0", "parent True True"], outcome.stdout
