"""``@opero``: cache, retries, fallbacks and a rate limit around one function.

Options are validated once into a frozen :class:`~opero._policy.Policy`; the
wrapper is then specialized so each call only pays for the layers configured.
Per call, outside in: the cache (a hit returns at once, without a token or the
retry machinery), the retry loop, the fallback chain, one rate-limit token per
real call, the function.

Sync functions with the memory cache become a native
:class:`~opero._opero_core.CachedCall` (key build, lookup and single flight in
Rust; a hit never runs Python code of opero); ``async def`` functions get an
``async def`` wrapper; the other backends go through the
:class:`~opero.cache.FunctionCache` protocol.

Internal contract (for ``@opmap`` and other layers of opero)
-----------------------------------------------------------
Every function returned by ``@opero`` has ``__opero__``, an
:class:`OperoInternals` with:

* ``policy``: the frozen :class:`~opero._policy.Policy`; ``policy.options``
  is the read-only mapping of the options given (normalized, without
  ``_limiter``), so ``opero(**policy.options)`` rebuilds the decorator;
* ``function``: the function that was decorated; ``is_async``; ``has_cache``;
* ``call_uncached(*args, **kwargs)``: retries, fallbacks and the rate limit,
  without the cache (for an ``async def`` function it runs the coroutine with
  ``asyncio.run``, so only outside a running loop);
* ``async acall_uncached(*args, **kwargs)``: the same, awaitable (a sync
  function runs in ``asyncio.to_thread``);
* ``cache_lookup(args, kwargs) -> value | MISS``: one lookup that counts as a
  hit or a miss and fires ``on_cache_hit`` on a hit (always ``MISS`` without a
  cache); ``async acache_lookup(args, kwargs)`` through the backend's ``aget``;
* ``cache_store(args, kwargs, value)`` and ``async acache_store(...)``: store a
  successful result (nothing without a cache);
* ``cache_lookup_many(items) -> (values, hits)``: ``cache_lookup((x,), {})``
  for every item ``x`` of a list in one go (``MISS`` for a miss, ``hits`` the
  number of hits); counters and ``on_cache_hit`` exactly as the single
  lookups (native on the memory backend with the default key);
* ``cache_store_many(items, values)``: ``cache_store((x,), {}, v)`` for every
  pair of two lists of equal length;
* ``cache``: the :class:`~opero.cache.FunctionCache` or ``None``.

``opero(...)`` also accepts the private keyword ``_limiter=``: an object with
``reserve(rate: float | None = None) -> float`` (seconds to wait; and
optionally ``async areserve(rate=None)``) that replaces the rate-limit bucket,
so a map shares one limiter across its workers. It takes a token before every
real call, with or without ``rate_limit``; with a callable ``rate_limit`` it
receives the current rate, else ``None``.

Other private keywords, for tests: ``_sleep=`` (sync sleep used for retry and
rate-limit waits), ``_asleep=`` (its async twin), ``_backoff_seed=`` (seed of
the jitter).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import reprlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from opero._aio import TaskFlight, build_async_call
from opero._callbacks import adapt_callback
from opero._opero_core import CachedCall, make_key, stable_digest, stable_digest_call
from opero._policy import Policy, build_policy
from opero._retry import Engine, build_sync_call, specialize
from opero._singleflight import ThreadFlight
from opero.cache._base import MISS, CacheInfo, FunctionCache
from opero.cache._identity import function_identity
from opero.cache._memory import MemoryBackend, MemoryFunctionCache
from opero.cache._registry import clear_cache, register, resolve_backend

__all__ = ["OperoDecorator", "OperoFunction", "OperoInternals", "clear_cache", "opero"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
S = TypeVar("S")
R_co = TypeVar("R_co", covariant=True)

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


class OperoFunction(Protocol[P, R_co]):
    """A function decorated by ``@opero``: same parameters and result, plus cache helpers.

    The helpers take the same arguments as the function. For a method, call
    them on the class with the instance first: ``Repo.get.cache_get(repo, 1)``
    (``self`` is part of the key).
    """

    __opero__: OperoInternals
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call through the cache, retries, fallbacks and rate limit."""
        ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> OperoFunction[P, R_co]: ...

    @overload
    def __get__(
        self: OperoFunction[Concatenate[S, P2], R2], instance: S, owner: type[Any] | None = None
    ) -> Callable[P2, R2]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        """Bind as a method: ``obj.method(...)`` passes ``obj`` as the first argument."""
        ...

    def cache_get(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Return the cached result for these arguments; raise ``KeyError`` on a miss."""
        ...

    def cache_delete(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the cached result for these arguments; return whether it was there."""
        ...

    def cache_clear(self) -> None:
        """Remove every cached result of this function."""
        ...

    def cache_info(self) -> CacheInfo:
        """Return the cache counters (hits, misses, maxsize, currsize, ...)."""
        ...


class OperoDecorator(Protocol):
    """What ``opero(**options)`` returns: turns a function into an :class:`OperoFunction`."""

    def __call__(self, func: Callable[P, R], /) -> OperoFunction[P, R]:
        """Decorate ``func``."""
        ...


class OperoInternals:
    """The ``__opero__`` attribute of a decorated function (internal contract, see module doc).

    Attributes:
        policy: The validated options.
        function: The function that was decorated.
        is_async: Whether it is an ``async def`` function.
        has_cache: Whether ``cache=True``.
        cache: The function's :class:`~opero.cache.FunctionCache` (``None``
            without a cache).
        call_uncached: Sync call without the cache.
        acall_uncached: Async call without the cache.
        cache_lookup: ``(args, kwargs) -> value | MISS``.
        cache_store: ``(args, kwargs, value) -> None``.
        acache_lookup: Async ``cache_lookup``.
        acache_store: Async ``cache_store``.
        cache_lookup_many: ``(items) -> (values, hits)``, one-argument calls.
        cache_store_many: ``(items, values) -> None``, one-argument calls.

    """

    __slots__ = (
        "acache_lookup",
        "acache_store",
        "acall_uncached",
        "cache",
        "cache_lookup",
        "cache_lookup_many",
        "cache_store",
        "cache_store_many",
        "call_uncached",
        "function",
        "has_cache",
        "is_async",
        "policy",
    )

    def __init__(
        self,
        *,
        policy: Policy,
        function: Callable[..., Any],
        is_async: bool,
        cache: FunctionCache | None,
        call_uncached: Callable[..., Any],
        acall_uncached: Callable[..., Awaitable[Any]],
        cache_lookup: Callable[[Args, Kwargs], Any],
        cache_store: Callable[[Args, Kwargs, Any], None],
        acache_lookup: Callable[[Args, Kwargs], Awaitable[Any]],
        acache_store: Callable[[Args, Kwargs, Any], Awaitable[None]],
        cache_lookup_many: Callable[[list[Any]], tuple[list[Any], int]] | None = None,
        cache_store_many: Callable[[list[Any], list[Any]], None] | None = None,
    ) -> None:
        self.policy = policy
        self.function = function
        self.is_async = is_async
        self.has_cache = cache is not None
        self.cache = cache
        self.call_uncached = call_uncached
        self.acall_uncached = acall_uncached
        self.cache_lookup = cache_lookup
        self.cache_store = cache_store
        self.acache_lookup = acache_lookup
        self.acache_store = acache_store
        self.cache_lookup_many = cache_lookup_many or _lookup_many_loop(cache_lookup)
        self.cache_store_many = cache_store_many or _store_many_loop(cache_store)

    def __repr__(self) -> str:
        name = getattr(self.function, "__qualname__", repr(self.function))
        return f"<opero internals of {name} options={dict(self.policy.options)!r}>"


# ---------------------------------------------------------------------------------------
# The public decorator


@overload
def opero(func: Callable[P, R], /) -> OperoFunction[P, R]: ...


@overload
def opero(
    *,
    retries: int = 3,
    backoff_factor: float = 1.5,
    min_delay: float = 0.1,
    max_delay: float = 30.0,
    jitter: bool = True,
    retry_on: type[Exception] | tuple[type[Exception], ...] | list[type[Exception]] = ...,
    retry_predicate: Callable[..., Any] | None = None,
    backoff_function: Callable[[int], float] | None = None,
    arg_fallback: str | None = None,
    rate_limit: float | Callable[[], float] | None = None,
    rate_burst: int = 1,
    rate_limit_key: str | None = None,
    rate_max_wait: float | None = None,
    rate_limit_backend: str = "memory",
    rate_limit_redis_url: Any = None,
    on_retry: Callable[..., Any] | None = None,
    on_success: Callable[..., Any] | None = None,
    on_failure: Callable[[Exception], Any] | None = None,
    on_cache_hit: Callable[[], Any] | None = None,
    cache: bool = False,
    cache_ttl: float | None = None,
    cache_max_size: int | None = 1024,
    cache_namespace: str = "opero",
    cache_key: Callable[..., Any] | None = None,
    cache_backend: Any = "memory",
    cache_redis_url: Any = None,
    cache_serializer: Any = "pickle",
    cache_secret: str | bytes | None = None,
    cache_strict: bool = False,
    cache_dir: Any = None,
    _limiter: Any = None,
    _sleep: Callable[[float], Any] | None = None,
    _asleep: Callable[[float], Awaitable[Any]] | None = None,
    _backoff_seed: int | None = None,
) -> OperoDecorator: ...


def opero(func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Add a cache, retries, argument fallbacks and a rate limit to a function.

    Works on ``def`` and ``async def`` functions and methods, bare
    (``@opero``) or with options (``@opero(retries=3, cache=True)``). Per
    call, outside in: cache, retry loop, fallback chain, rate limit, function.

    Args:
        func: The function, when used bare (``@opero``).
        **options: Keyword options (all validated at decoration time):

            Retries: ``retries`` (int >= 0, default 3: up to 4 calls),
            ``backoff_factor`` (>= 1, default 1.5), ``min_delay`` (seconds,
            default 0.1), ``max_delay`` (seconds, default 30.0), ``jitter``
            (default True: each wait drawn from ``[d/2, d]``), ``retry_on``
            (exception type, tuple or list; default ``Exception``),
            ``retry_predicate(exc)`` or ``(exc, response=None)`` (return True
            to retry), ``backoff_function(attempt) -> seconds`` (0-based;
            replaces the schedule).

            Fallback: ``arg_fallback`` (name of a parameter holding a list or
            tuple of candidates; candidate ``i`` is called with
            ``values[i:]``).

            Rate limit: ``rate_limit`` (calls per second, or a zero-argument
            callable read on every call), ``rate_burst`` (calls at once,
            default 1), ``rate_limit_key`` (bucket shared by name),
            ``rate_max_wait`` (seconds; a longer wait raises
            :class:`~opero.errors.RateLimitTimeout`), ``rate_limit_backend``
            (``"memory"`` or ``"redis"``), ``rate_limit_redis_url``.

            Callbacks: ``on_retry(exc)`` / ``on_retry(exc, attempt)``,
            ``on_success(result)`` / ``on_success()``, ``on_failure(exc)``,
            ``on_cache_hit()``. A raising callback is logged and ignored.

            Cache: ``cache`` (default False), ``cache_ttl`` (seconds > 0 or
            None), ``cache_max_size`` (default 1024, None = unbounded),
            ``cache_namespace`` (default ``"opero"``),
            ``cache_key(func, *args, **kwargs)``, ``cache_backend``
            (``"memory"``, ``"redis"``, ``"disk"`` or a backend object),
            ``cache_redis_url``, ``cache_serializer``, ``cache_secret``,
            ``cache_strict``, ``cache_dir``.

    Returns:
        The decorated function (bare use), or a decorator.

    Raises:
        TypeError: An unknown option (naming the closest valid one), or a
            non-callable to decorate.
        ConfigurationError: A bad option value (naming the option, the value
            and the fix).

    """
    if func is not None and not callable(func):
        raise TypeError(
            f"opero() takes the function to decorate or keyword options, got {func!r}; "
            "use @opero or @opero(retries=3, ...)"
        )
    policy = build_policy(func, options)
    if func is not None:
        return _decorate(func, policy)

    def decorator(function: Callable[..., Any], /) -> Any:
        if not callable(function):
            raise TypeError(f"@opero(...) decorates a function or method, got {function!r}")
        return _decorate(function, policy)

    return decorator


# ---------------------------------------------------------------------------------------
# Building the wrapper


def _qualname(func: Callable[..., Any]) -> str:
    """Return ``module.qualname``; a partial or callable object is named without its repr.

    A repr may be megabytes long (a partial over a large list), fail (an int past
    4300 digits) or hold a memory address that a later object reuses.
    """
    if isinstance(func, functools.partial):
        return f"functools.partial({_qualname(func.func)})"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if not isinstance(name, str):  # a callable object: named by its class
        kind = type(func)
        return f"{kind.__module__}.{kind.__qualname__}"
    return f"{getattr(func, '__module__', None) or '?'}.{name}"


def _decorate(func: Callable[..., Any], policy: Policy) -> Any:
    """Build the wrapper of ``func`` for ``policy``."""
    is_async = inspect.iscoroutinefunction(func)
    qualname = _qualname(func)
    engine = Engine(policy, func, qualname)
    inner: Callable[..., Any] = build_async_call(engine) if is_async else build_sync_call(engine)

    if is_async:
        call_uncached: Callable[..., Any] = functools.partial(_run_coroutine, inner)
        acall_uncached: Callable[..., Awaitable[Any]] = inner
    else:
        call_uncached = inner
        acall_uncached = functools.partial(asyncio.to_thread, inner)

    if not policy.cache:
        return _uncached(func, policy, inner, is_async, call_uncached, acall_uncached)

    on_hit = adapt_callback("on_cache_hit", policy.on_cache_hit, (0,))
    backend = resolve_backend(policy)
    stable_keys = bool(getattr(backend, "stable_keys", False))
    identity = (
        function_identity(func, qualname, has_cache_key=policy.cache_key is not None)
        if stable_keys
        else qualname
    )
    fcache = backend.open(
        namespace=policy.cache_namespace,
        qualname=identity,
        ttl=policy.cache_ttl,
        max_size=policy.cache_max_size,
        is_async=is_async,
    )
    register(policy.cache_namespace, backend, fcache)
    key_func = functools.partial(policy.cache_key, func) if policy.cache_key is not None else None
    if isinstance(backend, MemoryBackend) and isinstance(fcache, MemoryFunctionCache):
        return _memory_cached(
            func, policy, inner, is_async, fcache, key_func, on_hit, call_uncached, acall_uncached
        )
    return _backend_cached(
        func,
        policy,
        inner,
        is_async,
        fcache,
        stable_keys,
        key_func,
        on_hit,
        qualname,
        call_uncached,
        acall_uncached,
    )


def _run_coroutine(inner: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """Run the async pipeline to completion from sync code (``asyncio.run``)."""
    return asyncio.run(_await(inner(*args, **kwargs)))


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _finish(
    wrapper: Any,
    func: Callable[..., Any],
    internals: OperoInternals,
    helpers: Mapping[str, Any],
) -> Any:
    """Copy ``func``'s metadata onto ``wrapper`` and attach the helpers and ``__opero__``."""
    functools.update_wrapper(wrapper, func)
    wrapper.__dict__.update(helpers)
    wrapper.__dict__["__opero__"] = internals
    return wrapper


def _lookup_many_loop(
    cache_lookup: Callable[[Args, Kwargs], Any],
) -> Callable[[list[Any]], tuple[list[Any], int]]:
    """Return ``cache_lookup_many`` as a loop of single lookups (any backend, any key)."""

    def lookup_many(items: list[Any]) -> tuple[list[Any], int]:
        values = [cache_lookup((item,), {}) for item in items]
        misses = sum(1 for value in values if value is MISS)
        return values, len(values) - misses

    return lookup_many


def _store_many_loop(
    cache_store: Callable[[Args, Kwargs, Any], None],
) -> Callable[[list[Any], list[Any]], None]:
    """Return ``cache_store_many`` as a loop of single stores (any backend, any key)."""

    def store_many(items: list[Any], values: list[Any]) -> None:
        if len(items) != len(values):
            raise ValueError(
                f"cache_store_many: items and values differ in length "
                f"({len(items)} != {len(values)}); pass one value per item"
            )
        for item, value in zip(items, values, strict=True):
            cache_store((item,), {}, value)

    return store_many


async def _miss_async(args: Args, kwargs: Kwargs) -> Any:
    return MISS


def _nothing(args: Args, kwargs: Kwargs, value: Any) -> None:
    return None


async def _anothing(args: Args, kwargs: Kwargs, value: Any) -> None:
    return None


def _uncached(
    func: Callable[..., Any],
    policy: Policy,
    inner: Callable[..., Any],
    is_async: bool,
    call_uncached: Callable[..., Any],
    acall_uncached: Callable[..., Awaitable[Any]],
) -> Any:
    """Build the wrapper without a cache: the pipeline itself (a fresh function)."""
    if inner is func:
        # Nothing configured around the call: a fresh forwarder carries the helpers.
        generated = specialize(
            func, is_async=False, limiter=False, on_success=False, guard=False, namespace={}
        )
        if generated is not None:
            wrapper: Any = generated
        else:

            def plain(*args: Any, **kwargs: Any) -> Any:
                return func(*args, **kwargs)

            wrapper = plain
    else:
        wrapper = inner
    qualname = _qualname(func)

    def cache_get(*args: Any, **kwargs: Any) -> Any:
        raise KeyError(f"{qualname} has no cache (add cache=True to @opero)")

    def cache_delete(*args: Any, **kwargs: Any) -> bool:
        return False

    def cache_clear() -> None:
        return None

    def cache_info() -> CacheInfo:
        return CacheInfo(0, 0, 0, 0)

    internals: OperoInternals = OperoInternals(
        policy=policy,
        function=func,
        is_async=is_async,
        cache=None,
        call_uncached=call_uncached,
        acall_uncached=acall_uncached,
        cache_lookup=lambda args, kwargs: MISS,
        cache_store=_nothing,
        acache_lookup=_miss_async,
        acache_store=_anothing,
    )
    helpers: dict[str, Any] = {
        "cache_get": cache_get,
        "cache_delete": cache_delete,
        "cache_clear": cache_clear,
        "cache_info": cache_info,
    }
    return _finish(wrapper, func, internals, helpers)


def _memory_cached(
    func: Callable[..., Any],
    policy: Policy,
    inner: Callable[..., Any],
    is_async: bool,
    fcache: MemoryFunctionCache,
    key_func: Callable[..., Any] | None,
    on_hit: Callable[[], None] | None,
    call_uncached: Callable[..., Any],
    acall_uncached: Callable[..., Awaitable[Any]],
) -> Any:
    """Build the memory-cached wrapper: a native ``CachedCall`` or an async wrapper."""
    store = fcache.store
    get_call = store.get_call
    store_get = store.get
    store_set = store.set

    if key_func is None:

        def key_of(args: Args, kwargs: Kwargs) -> Any:
            return make_key(args, kwargs)

        def lookup(args: Args, kwargs: Kwargs) -> Any:
            return get_call(args, kwargs)

    else:
        custom = key_func

        def key_of(args: Args, kwargs: Kwargs) -> Any:
            return custom(*args, **kwargs)

        def lookup(args: Args, kwargs: Kwargs) -> Any:
            return store_get(custom(*args, **kwargs))

    def cache_lookup(args: Args, kwargs: Kwargs) -> Any:
        try:
            value = lookup(args, kwargs)
        except KeyError:
            return MISS
        if on_hit is not None:
            on_hit()
        return value

    def cache_store(args: Args, kwargs: Kwargs, value: Any) -> None:
        store_set(key_of(args, kwargs), value)

    async def acache_lookup(args: Args, kwargs: Kwargs) -> Any:
        return cache_lookup(args, kwargs)

    async def acache_store(args: Args, kwargs: Kwargs, value: Any) -> None:
        cache_store(args, kwargs, value)

    lookup_many: Callable[[list[Any]], tuple[list[Any], int]] | None = None
    store_many: Callable[[list[Any], list[Any]], None] | None = None
    if key_func is None:
        # One native call per batch: a single lookup costs ~0.5 us from Python
        # (a miss raises KeyError); the batch costs ~10 ns per item.
        get_many_items = store.get_many_items
        store_many = store.set_many_items

        def lookup_many(items: list[Any]) -> tuple[list[Any], int]:
            values, hits = get_many_items(items, MISS)
            if hits and on_hit is not None:
                for _ in range(hits):
                    on_hit()
            return values, hits

    def cache_get(*args: Any, **kwargs: Any) -> Any:
        return lookup(args, kwargs)

    def cache_delete(*args: Any, **kwargs: Any) -> bool:
        return store.delete(key_of(args, kwargs))

    helpers: dict[str, Any] = {
        "cache_get": cache_get,
        "cache_delete": cache_delete,
        "cache_clear": fcache.clear,
        "cache_info": fcache.info,
    }
    internals: OperoInternals = OperoInternals(
        policy=policy,
        function=func,
        is_async=is_async,
        cache=fcache,
        call_uncached=call_uncached,
        acall_uncached=acall_uncached,
        cache_lookup=cache_lookup,
        cache_store=cache_store,
        acache_lookup=acache_lookup,
        acache_store=acache_store,
        cache_lookup_many=lookup_many,
        cache_store_many=store_many,
    )

    if not is_async:
        wrapper: Any = CachedCall(store, inner, key_func=key_func, on_hit=on_hit)
        return _finish(wrapper, func, internals, helpers)

    flight = TaskFlight()

    async def compute(key: Any, args: Args, kwargs: Kwargs) -> Any:
        value = await inner(*args, **kwargs)
        store_set(key, value)
        return value

    if key_func is None:

        async def cached(*args: Any, **kwargs: Any) -> Any:
            try:
                value = get_call(args, kwargs)
            except KeyError:
                pass
            else:
                if on_hit is not None:
                    on_hit()
                return value
            key = make_key(args, kwargs)
            return await flight.do(key, lambda: compute(key, args, kwargs))

    else:

        async def cached(*args: Any, **kwargs: Any) -> Any:
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
            return await flight.do(make_key((key,), {}), lambda: compute(key, args, kwargs))

    return _finish(cached, func, internals, helpers)


def _backend_cached(
    func: Callable[..., Any],
    policy: Policy,
    inner: Callable[..., Any],
    is_async: bool,
    fcache: FunctionCache,
    stable: bool,
    key_func: Callable[..., Any] | None,
    on_hit: Callable[[], None] | None,
    qualname: str,
    call_uncached: Callable[..., Any],
    acall_uncached: Callable[..., Awaitable[Any]],
) -> Any:
    """Build the wrapper for Redis, disk and user backends (``FunctionCache`` protocol)."""
    key_of = _key_builder(stable, key_func, qualname)
    get = fcache.get
    put = fcache.set
    tflight = ThreadFlight()
    aflight = TaskFlight()
    # A value stored outside a flight also tells a flight's winner to look again.
    stored = aflight.stored if is_async else tflight.stored
    # A user backend's cache_key result goes to the backend as it is; the flight
    # tables need it hashable (a list is keyed by structure, as the memory cache does).
    fk = _flight_key if key_func is not None and not stable else _same

    def cache_lookup(args: Args, kwargs: Kwargs) -> Any:
        value = get(key_of(args, kwargs))
        if value is not MISS and on_hit is not None:
            on_hit()
        return value

    def cache_store(args: Args, kwargs: Kwargs, value: Any) -> None:
        key = key_of(args, kwargs)
        put(key, value)
        stored(fk(key))

    async def acache_lookup(args: Args, kwargs: Kwargs) -> Any:
        value = await fcache.aget(key_of(args, kwargs))
        if value is not MISS and on_hit is not None:
            on_hit()
        return value

    async def acache_store(args: Args, kwargs: Kwargs, value: Any) -> None:
        key = key_of(args, kwargs)
        await fcache.aset(key, value)
        stored(fk(key))

    def cache_get(*args: Any, **kwargs: Any) -> Any:
        value = get(key_of(args, kwargs))
        if value is MISS:
            raise KeyError(
                f"{qualname}: no cached result for args={_short(args)} kwargs={_short(kwargs)}"
            )
        return value

    def cache_delete(*args: Any, **kwargs: Any) -> bool:
        return fcache.delete(key_of(args, kwargs))

    helpers: dict[str, Any] = {
        "cache_get": cache_get,
        "cache_delete": cache_delete,
        "cache_clear": fcache.clear,
        "cache_info": fcache.info,
    }
    internals: OperoInternals = OperoInternals(
        policy=policy,
        function=func,
        is_async=is_async,
        cache=fcache,
        call_uncached=call_uncached,
        acall_uncached=acall_uncached,
        cache_lookup=cache_lookup,
        cache_store=cache_store,
        acache_lookup=acache_lookup,
        acache_store=acache_store,
    )

    if not is_async:

        def compute(key: Any, args: Args, kwargs: Kwargs) -> Any:
            value = inner(*args, **kwargs)
            put(key, value)
            return value

        def cached(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            stamp = tflight.stamp(fk(key))
            value = get(key)
            if value is not MISS:
                if on_hit is not None:
                    on_hit()
                return value
            return tflight.do(fk(key), lambda: compute(key, args, kwargs), stamp, lambda: get(key))

        return _finish(cached, func, internals, helpers)

    aget = fcache.aget
    aset = fcache.aset

    async def acompute(key: Any, args: Args, kwargs: Kwargs) -> Any:
        value = await inner(*args, **kwargs)
        await aset(key, value)
        return value

    async def acached(*args: Any, **kwargs: Any) -> Any:
        key = key_of(args, kwargs)
        stamp = aflight.stamp(fk(key))
        value = await aget(key)
        if value is not MISS:
            if on_hit is not None:
                on_hit()
            return value
        return await aflight.do(
            fk(key), lambda: acompute(key, args, kwargs), stamp, lambda: aget(key)
        )

    return _finish(acached, func, internals, helpers)


def _same(key: Any) -> Any:
    return key


def _flight_key(key: Any) -> Any:
    """Return ``key`` if hashable, else its in-process key by structure (a list...)."""
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


def _key_builder(
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

    if key_func is None:

        def stable_call(args: Args, kwargs: Kwargs) -> Any:
            try:
                return stable_digest_call(args, kwargs)
            except TypeError as exc:
                raise hint(exc) from exc

        return stable_call
    custom = key_func

    def stable_custom(args: Args, kwargs: Kwargs) -> Any:
        value = custom(*args, **kwargs)
        try:
            return stable_digest(value)
        except TypeError as exc:
            raise hint(exc) from exc

    return stable_custom
