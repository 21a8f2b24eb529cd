"""``@opero``: cache, retries, fallbacks and a rate limit around one function.

Options are validated once into a frozen :class:`~opero._pipeline.policy.Policy`
(per-stage policies built from the option table); :func:`_decorate` then builds
the uncached pipeline (the engine and its sync or async driver) and puts the
cache adapter of :mod:`opero._pipeline.caching` around it, so each call only
pays for the layers configured. Per call, outside in: the cache (a hit returns
at once, without a token or the retry machinery), the retry loop, the fallback
chain, one rate-limit token per real call, the function.

Sync functions with the memory cache become a native
:class:`~opero._opero_core.CachedCall` (key build, lookup and single flight in
Rust; a hit never runs Python code of opero); ``async def`` functions get an
``async def`` wrapper; the other backends go through the
:class:`~opero.cache.FunctionCache` protocol.

Internal contract (for ``@opmap`` and other layers of opero)
-----------------------------------------------------------
Every function returned by ``@opero`` has ``__opero__``, an
:class:`OperoInternals` with:

* ``policy``: the frozen :class:`~opero._pipeline.policy.Policy`; ``policy.options``
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
the jitter), ``_clock=`` (the monotonic clock of ``timeout``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import pickle
import sys
import types
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

from opero._pipeline.aio import build_async_call
from opero._pipeline.breaker import CircuitBreaker
from opero._pipeline.caching import cache_adapter
from opero._pipeline.engine import Engine
from opero._pipeline.policy import Policy, build_policy
from opero._pipeline.stats import FunctionStats
from opero._pipeline.sync import build_sync_call
from opero.cache._base import MISS, CacheInfo, FunctionCache
from opero.cache._registry import clear_cache
from opero.errors import ConfigurationError

__all__ = [
    "BoundOperoFunction",
    "OperoDecorator",
    "OperoFunction",
    "OperoInternals",
    "clear_cache",
    "opero",
]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
S = TypeVar("S")
R_co = TypeVar("R_co", covariant=True)
S_contra = TypeVar("S_contra", contravariant=True)

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


class OperoFunction(Protocol[P, R_co]):
    """A function decorated by ``@opero``: same parameters and result, plus cache helpers.

    The helpers take the same arguments as the function. For a method, call
    them on the class with the instance first: ``Repo.get.cache_get(repo, 1)``
    (``self`` is part of the key). Read from an instance (or, under
    ``@classmethod``, from the class), a method is a
    :class:`BoundOperoFunction` taking the parameters after ``self``/``cls``;
    under ``@staticmethod`` it stays an ``OperoFunction``.
    """

    __opero__: OperoInternals
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call through the cache, retries, fallbacks and rate limit."""
        ...

    # How a type checker binds the decorated function in a class. Both mypy and pyright
    # keep the OperoFunction type under @classmethod / @staticmethod (they only flag the
    # function), so these overloads tell the three kinds apart by the first parameter:
    # one that takes any object (``object``, ``Any``, unannotated) is left unbound (a
    # staticmethod), ``cls: type[Owner]`` binds the class, ``self: Owner`` binds an
    # instance, anything else is left unbound. The self-types are matched through the
    # ``__call__`` of small protocols: matching ``OperoFunction[Concatenate[...], ...]``
    # instead lets mypy solve the first parameter as Never and bind every method as a
    # classmethod.
    @overload
    def __get__(
        self: _TakesAnything, instance: object, owner: type[Any] | None = None
    ) -> OperoFunction[P, R_co]: ...

    @overload
    def __get__(
        self: _ClassCall[S, P2, R2], instance: S | None, owner: type[S]
    ) -> BoundOperoFunction[P2, R2]: ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> OperoFunction[P, R_co]: ...

    @overload
    def __get__(
        self: _SelfCall[S, P2, R2], instance: S, owner: type[Any] | None = None
    ) -> BoundOperoFunction[P2, R2]: ...

    @overload
    def __get__(
        self, instance: object, owner: type[Any] | None = None
    ) -> OperoFunction[P, R_co]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        """Bind as a method: ``obj.method(...)`` passes ``obj`` as the first argument.

        Under ``@classmethod`` the class is passed instead, and under
        ``@staticmethod`` nothing is.
        """
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

    def stats(self, *, reset: bool = False) -> FunctionStats:
        """Return this function's counters (calls, retries, waits...); ``reset`` zeroes them."""
        ...


class BoundOperoFunction(Protocol[P, R_co]):
    """A method decorated by ``@opero``, bound to its instance (or class, for a classmethod).

    ``repo.get`` of ``Repo.get`` (an :class:`OperoFunction` taking ``self``)
    takes the parameters after ``self``. The counters and ``cache_clear`` are
    the function's (shared by every instance). ``cache_get`` and
    ``cache_delete`` need the instance as their first argument: call them on
    the class, ``Repo.get.cache_get(repo, 1)``.
    """

    __opero__: OperoInternals
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call through the cache, retries, fallbacks and rate limit."""
        ...

    def cache_clear(self) -> None:
        """Remove every cached result of this function (for every instance)."""
        ...

    def cache_info(self) -> CacheInfo:
        """Return the cache counters of this function (for every instance)."""
        ...


class _Unbound:
    """Typing only: a class no ``self`` or ``cls`` parameter accepts (see ``_TakesAnything``)."""


class _TakesAnything(Protocol):
    """Typing only: a callable whose first parameter takes any object (a staticmethod's)."""

    def __call__(self, first: _Unbound, /, *args: Any, **kwargs: Any) -> Any: ...


class _ClassCall(Protocol[S_contra, P, R_co]):
    """Typing only: a callable whose first parameter is a class (a classmethod's ``cls``)."""

    def __call__(self, cls: type[S_contra], /, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class _SelfCall(Protocol[S_contra, P, R_co]):
    """Typing only: a callable whose first parameter is an instance (a method's ``self``)."""

    def __call__(self, obj: S_contra, /, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


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
    retry_after: bool | Callable[[BaseException], float | None] = True,
    retry_on_result: Callable[[Any], Any] | None = None,
    timeout: float | None = None,
    attempt_timeout: float | None = None,
    arg_fallback: str | None = None,
    circuit_breaker: CircuitBreaker | None = None,
    rate_limit: float | Callable[[], float] | Sequence[tuple[int, float]] | None = None,
    rate_burst: int = 1,
    rate_limit_key: str | Callable[..., str] | None = None,
    rate_max_wait: float | None = None,
    rate_limit_backend: str = "memory",
    rate_limit_redis_url: Any = None,
    rate_limit_max_keys: int = 10_000,
    on_retry: Callable[..., Any] | None = None,
    on_success: Callable[..., Any] | None = None,
    on_failure: Callable[..., Any] | None = None,
    on_cache_hit: Callable[..., Any] | None = None,
    on_circuit_open: Callable[..., Any] | None = None,
    on_fallback: Callable[..., Any] | None = None,
    on_rate_limit_wait: Callable[..., Any] | None = None,
    cache: bool = False,
    cache_ttl: float | None = None,
    cache_max_size: int | None = 1024,
    cache_policy: Literal["lru", "tinylfu"] = "lru",
    cache_namespace: str = "opero",
    cache_key: Callable[..., Any] | None = None,
    cache_backend: Any = "memory",
    cache_redis_url: Any = None,
    cache_serializer: Any = "pickle",
    cache_secret: str | bytes | None = None,
    cache_strict: bool = False,
    cache_dir: Any = None,
    _limiter: Any = None,
    _rate_clock: Any = None,
    _sleep: Callable[[float], Any] | None = None,
    _asleep: Callable[[float], Awaitable[Any]] | None = None,
    _backoff_seed: int | None = None,
    _clock: Callable[[], float] | None = None,
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
            replaces the schedule), ``retry_after`` (default True: wait what
            the server asks in ``Retry-After``; False, or a callable
            ``retry_after(exc) -> seconds | None``), ``retry_on_result(result)``
            (True retries; :class:`~opero.errors.RetryResultError` when
            retries run out), ``timeout`` (seconds for the whole call),
            ``attempt_timeout`` (``async def`` only: seconds per attempt).

            Fallback: ``arg_fallback`` (name of a parameter holding a list or
            tuple of candidates; candidate ``i`` is called with
            ``values[i:]``).

            Circuit breaker: ``circuit_breaker`` (an
            :class:`~opero.CircuitBreaker`, possibly shared by several
            functions; asked before every call, an open circuit raises
            :class:`~opero.errors.CircuitOpenError`, never retried).

            Rate limit: ``rate_limit`` (calls per second, a zero-argument
            callable read on every call, or windows ``[(calls, seconds), ...]``
            that must all admit a call), ``rate_burst`` (calls at once,
            default 1), ``rate_limit_key`` (bucket shared by name, or
            ``callable(*args, **kwargs) -> str``: a bucket per returned key,
            at most ``rate_limit_max_keys`` kept, default 10,000),
            ``rate_max_wait`` (seconds; a longer wait raises
            :class:`~opero.errors.RateLimitTimeout`), ``rate_limit_backend``
            (``"memory"`` or ``"redis"``), ``rate_limit_redis_url``.

            Callbacks: ``on_retry(exc)`` / ``on_retry(exc, attempt)``,
            ``on_success(result)`` / ``on_success()``, ``on_failure(exc)``,
            ``on_cache_hit()``, ``on_circuit_open(details)`` /
            ``on_circuit_open()``, ``on_fallback(exc)`` / ``on_fallback(exc,
            index)``, ``on_rate_limit_wait(wait)`` / ``on_rate_limit_wait()``;
            each may instead take one :class:`~opero.CallDetails` (a single
            parameter annotated ``CallDetails`` or named ``details``). A
            raising callback is logged and ignored.

            Cache: ``cache`` (default False), ``cache_ttl`` (seconds > 0 or
            None), ``cache_max_size`` (default 1024, None = unbounded),
            ``cache_policy`` (memory backend: ``"lru"``, the default, or
            ``"tinylfu"``, which misses less on skewed traffic),
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
    _check_decoratable(func, "opero() takes the function to decorate or keyword options")
    policy = build_policy(func, options)
    return _decorator(policy) if func is None else _decorate(func, policy)


def _check_decoratable(func: Any, what: str) -> None:
    """Raise ``TypeError`` unless ``func`` is ``None``, callable or a classmethod."""
    if func is not None and not callable(func) and not isinstance(func, classmethod):
        raise TypeError(f"{what}, got {func!r}; use @opero or @opero(retries=3, ...)")


def _decorator(policy: Policy) -> Callable[[Callable[..., Any]], Any]:
    """Return the decorator of ``opero(**options)`` (options already validated)."""

    def decorator(function: Callable[..., Any], /) -> Any:
        if not callable(function) and not isinstance(function, classmethod):
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


def is_async_callable(func: Any) -> bool:
    """Return whether calling ``func`` returns a coroutine to await.

    True for an ``async def`` function or method, a ``functools.partial`` of
    one, and an object whose class defines ``async def __call__`` (which
    :func:`inspect.iscoroutinefunction` does not see before Python 3.13's
    ``markcoroutinefunction``): decorated as sync, such an object would return
    its coroutine unawaited, and its errors would never be retried.
    """
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    if isinstance(func, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)):
        return False
    # Looked up statically: no descriptor or metaclass __getattr__ runs.
    return inspect.iscoroutinefunction(inspect.getattr_static(type(func), "__call__", None))


def _check_not_generator(func: Any) -> None:
    """Refuse a generator or async generator function (or a partial or object of one).

    Its body runs while the caller iterates, after the wrapper has returned:
    retries and fallbacks would never see its errors, and a cached generator is
    returned exhausted to every later call.

    Raises:
        ConfigurationError: ``func`` returns a generator.

    """
    target = func
    while isinstance(target, functools.partial):
        target = target.func
    if not isinstance(target, (types.FunctionType, types.MethodType)):
        target = inspect.getattr_static(type(target), "__call__", None)
    if not (inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target)):
        return
    kind = "an async generator" if inspect.isasyncgenfunction(target) else "a generator"
    raise ConfigurationError(
        f"@opero cannot decorate {_qualname(func)}: it is {kind} function, whose body runs "
        "while the caller iterates, after opero returned (retries and fallbacks would not "
        "see its errors, and the cache would return an exhausted generator); decorate a "
        "function that returns the items, for example a list."
    )


def _is_opero(func: Callable[..., Any]) -> bool:
    """Return whether ``func`` is already opero-decorated (it carries ``__opero__``)."""
    try:
        return isinstance(getattr(func, "__opero__", None), OperoInternals)
    except Exception:  # a hostile __getattr__: not ours
        return False


def _decorate(func: Callable[..., Any], policy: Policy) -> Any:
    """Build the wrapper of ``func`` for ``policy``: the cache adapter around the pipeline."""
    if isinstance(func, (staticmethod, classmethod)):
        # @opero over @staticmethod/@classmethod: wrap the function, keep the binding rule
        # (the native wrapper binds like a plain function, so a bare staticmethod would
        # receive the instance).
        return type(func)(_decorate(func.__func__, policy))
    _check_not_generator(func)
    is_async = is_async_callable(func)
    qualname = _qualname(func)
    engine = Engine(policy, func, qualname, stacked=_is_opero(func))
    inner: Callable[..., Any] = build_async_call(engine) if is_async else build_sync_call(engine)
    if is_async:
        call_uncached: Callable[..., Any] = functools.partial(_run_coroutine, inner)
        acall_uncached: Callable[..., Awaitable[Any]] = inner
    else:
        call_uncached = inner
        acall_uncached = functools.partial(asyncio.to_thread, inner)
    adapter = cache_adapter(func, policy, qualname, is_async)
    helpers = adapter.helpers()
    counters = engine.counters
    if adapter.cache is not None:
        counters.cache_info = helpers["cache_info"]
    helpers["stats"] = counters.snapshot
    internals = OperoInternals(
        policy=policy,
        function=func,
        is_async=is_async,
        cache=adapter.cache,
        call_uncached=call_uncached,
        acall_uncached=acall_uncached,
        cache_lookup=adapter.lookup,
        cache_store=adapter.store,
        acache_lookup=adapter.alookup,
        acache_store=adapter.astore,
        cache_lookup_many=adapter.lookup_many,
        cache_store_many=adapter.store_many,
    )
    wrapper = adapter.wrap(inner, is_async)
    counters.watch_native(wrapper)
    return _finish(wrapper, func, internals, helpers)


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
    if not hasattr(func, "__qualname__"):
        # A callable object or a functools.partial has no __qualname__ to pickle by.
        if isinstance(wrapper, types.FunctionType):
            # Pickle looks functions up by __qualname__ alone: name it so the error says why.
            label = type(func).__qualname__.replace("<locals>", "locals")
            wrapper.__name__ = wrapper.__qualname__ = (
                f"<opero wrapper of a {label} object, which has no __qualname__: "
                "decorate a def function to pickle it>"
            )
        else:
            # The native wrapper calls __reduce_ex__: find its module-level name then.
            wrapper.__dict__["__reduce_ex__"] = _reduce_by_module_name(wrapper, func)
    return wrapper


def _reduce_by_module_name(wrapper: Any, func: Callable[..., Any]) -> Callable[[int], Any]:
    """Return a ``__reduce_ex__`` pickling ``wrapper`` by the module-level name bound to it.

    The native wrapper pickles by its ``__qualname__``, which a decorated
    callable object or ``functools.partial`` does not have. This looks for a
    global of the wrapped object's module (or the wrapper's) that is the
    wrapper itself, and otherwise raises a ``PicklingError`` saying why.
    """
    ref = weakref.ref(wrapper)
    modules: list[str] = []
    for owner in (wrapper, getattr(func, "func", None), type(func), func):
        name = getattr(owner, "__module__", None)
        if isinstance(name, str) and name not in modules and name != "functools":
            modules.append(name)

    def __reduce_ex__(protocol: int) -> Any:
        target = ref()
        for module_name in modules:
            module = sys.modules.get(module_name)
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if value is target:
                    return _import_global, (module_name, name)
        raise pickle.PicklingError(
            f"cannot pickle {target!r}: it wraps {func!r}, which has no __qualname__, and it "
            f"is not bound to a module-level name in {', '.join(modules) or 'any module'}; "
            "assign the decorated object to a module-level name, or decorate a def function"
        )

    return __reduce_ex__


def _import_global(module: str, name: str) -> Any:
    """Return the global ``name`` of ``module`` (how a pickled decorated object comes back)."""
    return getattr(importlib.import_module(module), name)


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
