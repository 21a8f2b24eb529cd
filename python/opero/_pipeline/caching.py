"""The cache stage of ``@opero``: one adapter per kind of store, behind one interface.

:func:`cache_adapter` returns the adapter of a decoration:

* :class:`NoCache` (``cache=False``): lookups miss, the helpers are no-ops;
* :class:`MemoryCache` (the native store): a sync function becomes a native
  :class:`~opero._opero_core.CachedCall` (key build, lookup and single flight
  in Rust: a hit never runs Python code of opero); an ``async def`` gets a
  wrapper with :class:`~opero._pipeline.singleflight.TaskFlight`;
* :class:`BackendCache` (Redis, disk, user backends): the
  :class:`~opero.cache.FunctionCache` protocol, stable digests as keys when
  the backend is shared, single flight across threads or tasks.

Each adapter gives the same things: :meth:`wrap` (the cached wrapper around
the uncached pipeline), the helpers (``cache_get``, ``cache_delete``,
``cache_clear``, ``cache_info``) and the lookups of ``__opero__``.
"""

from __future__ import annotations

import functools
import reprlib
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from opero import _testing
from opero._opero_core import CachedCall, make_key, stable_digest, stable_digest_call
from opero._pipeline.callbacks import cache_hit_callback
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.policy import Policy
from opero._pipeline.singleflight import TaskFlight, ThreadFlight
from opero._pipeline.sync import first_call
from opero.cache._base import MISS, CacheInfo, FunctionCache
from opero.cache._identity import function_identity
from opero.cache._memory import MemoryBackend, MemoryFunctionCache
from opero.cache._registry import register, resolve_backend

__all__ = ["BackendCache", "CacheAdapter", "MemoryCache", "NoCache", "cache_adapter"]

Args = tuple[Any, ...]
Kwargs = dict[str, Any]
LookupMany = Callable[[list[Any]], tuple[list[Any], int]]
StoreMany = Callable[[list[Any], list[Any]], None]


class CacheAdapter:
    """The interface of the three adapters (the base is the no-cache behaviour)."""

    cache: FunctionCache | None = None
    lookup_many: LookupMany | None = None
    store_many: StoreMany | None = None

    def wrap(self, inner: Callable[..., Any], is_async: bool) -> Any:
        """Return the wrapper of ``inner`` (the uncached pipeline) for this cache."""
        raise NotImplementedError

    def lookup(self, args: Args, kwargs: Kwargs) -> Any:
        """Look up one call (a hit fires ``on_cache_hit``); ``MISS`` on a miss."""
        return MISS

    def store(self, args: Args, kwargs: Kwargs, value: Any) -> None:
        """Store a successful result of one call."""

    async def alookup(self, args: Args, kwargs: Kwargs) -> Any:
        """Async :meth:`lookup`."""
        return self.lookup(args, kwargs)

    async def astore(self, args: Args, kwargs: Kwargs, value: Any) -> None:
        """Async :meth:`store`."""
        self.store(args, kwargs, value)

    def helpers(self) -> dict[str, Any]:
        """Return ``cache_get``, ``cache_delete``, ``cache_clear``, ``cache_info``."""
        raise NotImplementedError


class NoCache(CacheAdapter):
    """``cache=False``: the wrapper is the pipeline itself, lookups always miss."""

    def __init__(self, func: Callable[..., Any], qualname: str) -> None:
        self.func = func
        self.qualname = qualname

    def wrap(self, inner: Callable[..., Any], is_async: bool) -> Any:
        """Return ``inner``, or a fresh forwarder when ``inner`` is the function itself."""
        if inner is not self.func:
            return inner
        # Nothing configured around the call: a fresh forwarder carries the helpers.
        func = self.func
        generated = specialize(func, Template(), {})
        if generated is not None:
            return generated

        def plain(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        return plain

    def helpers(self) -> dict[str, Any]:
        """Return helpers that say there is no cache."""
        qualname = self.qualname

        def cache_get(*args: Any, **kwargs: Any) -> Any:
            raise KeyError(f"{qualname} has no cache (add cache=True to @opero)")

        def cache_delete(*args: Any, **kwargs: Any) -> bool:
            return False

        def cache_clear() -> None:
            return None

        def cache_info() -> CacheInfo:
            return CacheInfo(0, 0, 0, 0)

        return {
            "cache_get": cache_get,
            "cache_delete": cache_delete,
            "cache_clear": cache_clear,
            "cache_info": cache_info,
        }


class MemoryCache(CacheAdapter):
    """The native memory store: ``CachedCall`` for sync functions, task flights for async."""

    def __init__(
        self,
        fcache: MemoryFunctionCache,
        key_func: Callable[..., Any] | None,
        on_hit: Callable[[], None] | None,
    ) -> None:
        self.cache = self.fcache = fcache
        self.key_func = key_func
        self.on_hit = on_hit
        self.native = fcache.store
        if key_func is None:
            # One native call per batch: a single lookup costs ~0.5 us from Python
            # (a miss raises KeyError); the batch costs ~10 ns per item.
            self.lookup_many = self._lookup_many
            self.store_many = self.native.set_many_items

    def key_of(self, args: Args, kwargs: Kwargs) -> Any:
        """Return the in-process key of one call."""
        if self.key_func is None:
            return make_key(args, kwargs)
        return self.key_func(*args, **kwargs)

    def get(self, args: Args, kwargs: Kwargs) -> Any:
        """Return the cached value of one call; ``KeyError`` on a miss (no counters)."""
        if self.key_func is None:
            return self.native.get_call(args, kwargs)
        return self.native.get(self.key_func(*args, **kwargs))

    def lookup(self, args: Args, kwargs: Kwargs) -> Any:
        """Look up one call (a hit fires ``on_cache_hit``); ``MISS`` on a miss."""
        try:
            value = self.get(args, kwargs)
        except KeyError:
            return MISS
        if self.on_hit is not None:
            self.on_hit()
        return value

    def store(self, args: Args, kwargs: Kwargs, value: Any) -> None:
        """Store a successful result of one call."""
        self.native.set(self.key_of(args, kwargs), value)

    def _lookup_many(self, items: list[Any]) -> tuple[list[Any], int]:
        values, hits = self.native.get_many_items(items, MISS)
        if hits and self.on_hit is not None:
            for _ in range(hits):
                self.on_hit()
        return values, hits

    def helpers(self) -> dict[str, Any]:
        """Return the helpers over the native store."""
        get, native, key_of = self.get, self.native, self.key_of

        def cache_get(*args: Any, **kwargs: Any) -> Any:
            return get(args, kwargs)

        def cache_delete(*args: Any, **kwargs: Any) -> bool:
            return native.delete(key_of(args, kwargs))

        return {
            "cache_get": cache_get,
            "cache_delete": cache_delete,
            "cache_clear": self.fcache.clear,
            "cache_info": self.fcache.info,
        }

    def wrap(self, inner: Callable[..., Any], is_async: bool) -> Any:
        """Return the native ``CachedCall`` (sync) or the task-flight wrapper (async)."""
        if not is_async:
            first = first_call(inner)
            if first is not None:
                # Retries only: the native call makes the first call itself and enters the
                # retry loop on failure (no Python frame of opero on a miss that succeeds).
                call = CachedCall(
                    self.native,
                    first.func,
                    key_func=self.key_func,
                    on_hit=self.on_hit,
                    on_error=first.retry_from,
                )
            else:
                call = CachedCall(self.native, inner, key_func=self.key_func, on_hit=self.on_hit)
            return _listening(call, _native_bypass(call))
        flight, on_hit, native, custom = TaskFlight(), self.on_hit, self.native, self.key_func
        # set_testing(cache=False) rebinds these (no per-call check of the switch).
        get_call: Callable[..., Any] = native.get_call
        store_get: Callable[..., Any] = native.get
        put: Callable[..., Any] = native.set
        do: Callable[..., Awaitable[Any]] = flight.do

        def testing_changed() -> None:
            nonlocal get_call, store_get, put, do
            if _testing._cache:
                get_call, store_get, put, do = native.get_call, native.get, native.set, flight.do
            else:
                get_call, store_get, put, do = _miss, _miss, _no_store, _direct

        async def compute(key: Any, args: Args, kwargs: Kwargs) -> Any:
            value = await inner(*args, **kwargs)
            put(key, value)
            return value

        # Two closures, not one with a branch: the hit path is the hot one (~200 ns).
        if custom is None:

            async def cached(*args: Any, **kwargs: Any) -> Any:
                try:
                    value = get_call(args, kwargs)
                except KeyError:
                    pass  # computed below, outside the handler (no KeyError as __context__)
                else:
                    if on_hit is not None:
                        on_hit()
                    return value
                key = make_key(args, kwargs)
                return await do(key, lambda: compute(key, args, kwargs))

            return _listening(cached, testing_changed)

        async def cached_by_key(*args: Any, **kwargs: Any) -> Any:
            key = custom(*args, **kwargs)
            try:
                value = store_get(key)
            except KeyError:
                pass
            else:
                if on_hit is not None:
                    on_hit()
                return value
            # The store keys a cache_key result by structure (a list is fine, as in
            # the sync wrapper); the flight table needs that as a hashable key too.
            return await do(make_key((key,), {}), lambda: compute(key, args, kwargs))

        return _listening(cached_by_key, testing_changed)


class BackendCache(CacheAdapter):
    """Redis, disk and user backends through the ``FunctionCache`` protocol."""

    def __init__(
        self,
        fcache: FunctionCache,
        key_of: Callable[[Args, Kwargs], Any],
        on_hit: Callable[[], None] | None,
        qualname: str,
        is_async: bool,
    ) -> None:
        self.cache = self.fcache = fcache
        self.key_of = key_of
        self.on_hit = on_hit
        self.qualname = qualname
        self.tflight = ThreadFlight()
        self.aflight = TaskFlight()
        # A value stored outside a flight also tells a flight's winner to look again.
        self.stored = self.aflight.stored if is_async else self.tflight.stored

    def lookup(self, args: Args, kwargs: Kwargs) -> Any:
        """Look up one call (a hit fires ``on_cache_hit``); ``MISS`` on a miss."""
        value = self.fcache.get(self.key_of(args, kwargs))
        if value is not MISS and self.on_hit is not None:
            self.on_hit()
        return value

    def store(self, args: Args, kwargs: Kwargs, value: Any) -> None:
        """Store a successful result of one call."""
        key = self.key_of(args, kwargs)
        self.fcache.set(key, value)
        self.stored(_flight_key(key))

    async def alookup(self, args: Args, kwargs: Kwargs) -> Any:
        """Look up one call through the backend's ``aget``."""
        value = await self.fcache.aget(self.key_of(args, kwargs))
        if value is not MISS and self.on_hit is not None:
            self.on_hit()
        return value

    async def astore(self, args: Args, kwargs: Kwargs, value: Any) -> None:
        """Store one result through the backend's ``aset``."""
        key = self.key_of(args, kwargs)
        await self.fcache.aset(key, value)
        self.stored(_flight_key(key))

    def helpers(self) -> dict[str, Any]:
        """Return the helpers over the backend."""
        fcache, key_of, qualname = self.fcache, self.key_of, self.qualname

        def cache_get(*args: Any, **kwargs: Any) -> Any:
            value = fcache.get(key_of(args, kwargs))
            if value is MISS:
                raise KeyError(
                    f"{qualname}: no cached result for args={_short(args)} kwargs={_short(kwargs)}"
                )
            return value

        def cache_delete(*args: Any, **kwargs: Any) -> bool:
            return fcache.delete(key_of(args, kwargs))

        return {
            "cache_get": cache_get,
            "cache_delete": cache_delete,
            "cache_clear": fcache.clear,
            "cache_info": fcache.info,
        }

    def wrap(self, inner: Callable[..., Any], is_async: bool) -> Any:
        """Return the wrapper: look up, else compute once per key (single flight) and store."""
        return self._awrap(inner) if is_async else self._wrap(inner)

    def _wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        key_of, get, put, on_hit, flight = (
            self.key_of,
            self.fcache.get,
            self.fcache.set,
            self.on_hit,
            self.tflight,
        )

        fcache = self.fcache

        def testing_changed() -> None:
            nonlocal get, put
            on = _testing._cache
            get, put = (fcache.get, fcache.set) if on else (_miss_value, _no_store)

        def compute(key: Any, args: Args, kwargs: Kwargs) -> Any:
            value = inner(*args, **kwargs)
            put(key, value)
            return value

        def cached(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            fkey = _flight_key(key)
            stamp = flight.stamp(fkey)
            value = get(key)
            if value is not MISS:
                if on_hit is not None:
                    on_hit()
                return value
            if put is _no_store:  # set_testing(cache=False): the function runs, alone
                return inner(*args, **kwargs)
            return flight.do(fkey, lambda: compute(key, args, kwargs), stamp, lambda: get(key))

        return _listening(cached, testing_changed)

    def _awrap(self, inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        key_of, aget, aset, on_hit, flight = (
            self.key_of,
            self.fcache.aget,
            self.fcache.aset,
            self.on_hit,
            self.aflight,
        )

        fcache = self.fcache

        def testing_changed() -> None:
            nonlocal aget, aset
            on = _testing._cache
            aget, aset = (fcache.aget, fcache.aset) if on else (_amiss_value, _ano_store)

        async def acompute(key: Any, args: Args, kwargs: Kwargs) -> Any:
            value = await inner(*args, **kwargs)
            await aset(key, value)
            return value

        async def acached(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            fkey = _flight_key(key)
            stamp = flight.stamp(fkey)
            value = await aget(key)
            if value is not MISS:
                if on_hit is not None:
                    on_hit()
                return value
            if aset is _ano_store:  # set_testing(cache=False): the function runs, alone
                return await inner(*args, **kwargs)
            return await flight.do(
                fkey, lambda: acompute(key, args, kwargs), stamp, lambda: aget(key)
            )

        return _listening(acached, testing_changed)


# --- set_testing(cache=False) ------------------------------------------------------------
# A wrapper's lookups and stores are rebound by a listener of the switch, so the hit path
# never reads it. The listener lives in the wrapper's __dict__ (the switch holds it weakly).


def _listening(wrapper: Callable[..., Any], listener: Callable[[], None]) -> Callable[..., Any]:
    """Keep ``listener`` alive with ``wrapper`` and register it with the testing switch."""
    wrapper.__dict__["__opero_testing_listener__"] = listener
    _testing.listen(listener)
    return wrapper


def _native_bypass(call: CachedCall) -> Callable[[], None]:
    """Return the listener flagging the native ``call`` (held weakly: no cycle)."""
    ref = weakref.ref(call)

    def testing_changed() -> None:
        target = ref()
        if target is not None:
            target.set_bypass(not _testing._cache)

    return testing_changed


def _miss(*args: Any) -> Any:
    """Miss, always: the native store's lookup while the cache is bypassed."""
    raise KeyError("cache bypassed by set_testing(cache=False)")


def _miss_value(key: Any) -> Any:
    """Miss, always: a backend lookup while the cache is bypassed."""
    return MISS


async def _amiss_value(key: Any) -> Any:
    """Miss, always: an async backend lookup while the cache is bypassed."""
    return MISS


def _no_store(key: Any, value: Any) -> None:
    """Keep nothing: a store while the cache is bypassed."""


async def _ano_store(key: Any, value: Any) -> None:
    """Keep nothing: an async store while the cache is bypassed."""


async def _direct(key: Any, compute: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``compute`` without a flight (cache bypassed: every call runs the function)."""
    return await compute()


def _flight_key(key: Any) -> Any:
    """Return ``key`` if hashable, else its in-process key by structure (a list...).

    A user backend gets a ``cache_key`` result as it is; the flight tables need a
    hashable key (a list is keyed by structure, as the memory cache does).
    """
    try:
        hash(key)
    except TypeError:
        return make_key((key,), {})
    return key


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlong = 40


def _short(value: Any) -> str:
    """Return a short repr for a message; never raises (an int past 4300 digits, a bad repr)."""
    try:
        return _SHORT.repr(value)
    except Exception:
        return f"<{type(value).__qualname__}>"


def cache_adapter(
    func: Callable[..., Any], policy: Policy, qualname: str, is_async: bool
) -> CacheAdapter:
    """Open the store of ``func`` for ``policy`` and return its adapter."""
    caching = policy.caching
    if not caching.cache:
        return NoCache(func, qualname)
    on_hit = cache_hit_callback(policy.callbacks.on_cache_hit, qualname)
    backend = resolve_backend(policy)
    stable = bool(getattr(backend, "stable_keys", False))
    has_key = caching.cache_key is not None
    fcache = backend.open(
        namespace=caching.cache_namespace,
        qualname=function_identity(func, qualname, has_cache_key=has_key) if stable else qualname,
        ttl=caching.cache_ttl,
        max_size=caching.cache_max_size,
        is_async=is_async,
        # Only the memory backend takes a policy (checked at decoration).
        **({"policy": caching.cache_policy} if caching.cache_policy != "lru" else {}),
    )
    register(caching.cache_namespace, backend, fcache)
    key_func = functools.partial(caching.cache_key, func) if caching.cache_key else None
    if isinstance(backend, MemoryBackend) and isinstance(fcache, MemoryFunctionCache):
        return _bypassable(MemoryCache(fcache, key_func, on_hit))
    return _bypassable(
        BackendCache(fcache, key_builder(stable, key_func, qualname), on_hit, qualname, is_async)
    )


def _bypassable(adapter: CacheAdapter) -> CacheAdapter:
    """Make the lookups of ``__opero__`` (``@opmap``'s cache path) honour ``cache=False``.

    Per lookup or per batch, not per item: the switch is read here, where a map
    already pays a Python call.
    """
    lookup, alookup, store, astore = adapter.lookup, adapter.alookup, adapter.store, adapter.astore
    lookup_many, store_many = adapter.lookup_many, adapter.store_many

    def checked_lookup(args: Args, kwargs: Kwargs) -> Any:
        return lookup(args, kwargs) if _testing._cache else MISS

    async def checked_alookup(args: Args, kwargs: Kwargs) -> Any:
        return await alookup(args, kwargs) if _testing._cache else MISS

    def checked_store(args: Args, kwargs: Kwargs, value: Any) -> None:
        if _testing._cache:
            store(args, kwargs, value)

    async def checked_astore(args: Args, kwargs: Kwargs, value: Any) -> None:
        if _testing._cache:
            await astore(args, kwargs, value)

    adapter.lookup, adapter.alookup = checked_lookup, checked_alookup  # type: ignore[method-assign]
    adapter.store, adapter.astore = checked_store, checked_astore  # type: ignore[method-assign]
    if lookup_many is not None:
        many = lookup_many

        def checked_lookup_many(items: list[Any]) -> tuple[list[Any], int]:
            return many(items) if _testing._cache else ([MISS] * len(items), 0)

        adapter.lookup_many = checked_lookup_many
    if store_many is not None:
        put_many = store_many

        def checked_store_many(items: list[Any], values: list[Any]) -> None:
            if _testing._cache:
                put_many(items, values)

        adapter.store_many = checked_store_many
    return adapter


def key_builder(
    stable: bool, key_func: Callable[..., Any] | None, qualname: str
) -> Callable[[Args, Kwargs], Any]:
    """Return ``key_of(args, kwargs)`` for a backend (stable digests when it needs them)."""
    if not stable:
        if key_func is None:
            return make_key
        custom = key_func
        return lambda args, kwargs: custom(*args, **kwargs)

    def hint(exc: TypeError) -> TypeError:
        if "cache_key" in str(exc):
            return exc
        return TypeError(
            f"{qualname}: {exc}; a shared cache needs arguments made of None, bool, int, "
            "float, str, bytes, tuple, list, dict or set: pass cache_key= to build the key"
        )

    def stable_key(args: Args, kwargs: Kwargs) -> Any:
        # The user's cache_key raises unchanged; only the digest's TypeError gets the hint.
        value = None if key_func is None else key_func(*args, **kwargs)
        try:
            if key_func is None:
                return stable_digest_call(args, kwargs)
            return stable_digest(value)
        except TypeError as exc:
            raise hint(exc) from exc

    return stable_key
