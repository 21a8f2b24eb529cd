"""``@opmap``: a one-item function mapped over many items, with every ``@opero`` option.

The decorated object takes any iterable (generators included) and returns a
``list``. Each item gets the whole ``@opero`` pipeline (cache, retries,
fallbacks, rate limit, callbacks). Modes:

* ``"thread"``: a reused thread pool; items go in batches pulled by at most
  ``workers`` threads (the calling thread is one of them), not one future per
  item.
* ``"process"``: a reused :class:`opero._map.process_pool.ProcessPool` (created on first
  use, one per worker count, shut down at exit) on the default start method
  (fork, spawn or forkserver), automatic chunk sizes like
  ``multiprocessing.Pool.map``. The decorated function travels by reference
  when it can be imported by name, else by value through cloudpickle
  (lambdas, closures, ``__main__``). A worker that dies marks only the item it
  was running failed (:class:`WorkerDiedError`); a new worker replaces it and
  the map finishes (the other items of that item's job run again, one per
  job, to find it). An item or a result that does not pickle fails only its
  own item the same way.

Interrupts: ``KeyboardInterrupt`` in the calling thread, or cancelling
``await f.amap(...)``, stops a thread or process map: items not started never
start, and the pool is free for the next map.
* ``"async"``: one event loop, ``workers`` coroutines in flight. An ``async
  def`` function runs on the loop; a plain ``def`` runs in
  ``asyncio.to_thread`` so it never blocks the loop.
* ``"async_process"``: ``async def`` functions on an ``aiomultiprocess`` pool
  (the ``opero[aiomultiprocess]`` extra), reused across calls on a background
  event loop.
* ``"dask"``: a ``distributed`` client (``client=`` or the current one at first
  use); items batched into tasks, at most ``workers`` tasks in flight.
* ``executor=``: any ``concurrent.futures.Executor``; items batched onto it.

Calling from async code: ``await f.amap(items)`` never blocks the running loop
(pool modes wait in a helper thread; ``"async"`` runs on the caller's loop).
The plain call ``f(items)`` also works inside a running loop: in ``"async"``
mode it runs its own loop in a helper thread, in the other modes it blocks
like any synchronous call.

Cache: in ``"thread"`` and ``"async"`` modes each item goes through the
decorated function's cache directly (single flight included). In the pool
modes the parent looks every item up before dispatch (hits are never sent) and
stores the results computed by the workers; the workers run the function
without a cache (``call_uncached``). An item whose key cannot be built fails
in its own place. The parent does both per batch
(``cache_lookup_many`` once per map, ``cache_store_many`` once per finished
job): one native call on the memory backend, ~10 ns a lookup against ~0.5 us
for a single ``cache_lookup`` from Python (a miss there raises ``KeyError``).
Failed items are never stored.

Rate limit: global across the map's workers. Threads and tasks share the
function's bucket. Worker processes (process, async_process, process
executors, Dask) share a :class:`opero._ratelimit.shared_memory.SharedTokenBucket`: the
bucket state in shared memory on the parent's host, under a file lock
(``flock``; ``msvcrt.locking`` on Windows).
Dask workers on other hosts therefore get one bucket per host; use
``rate_limit_backend="redis"`` for a cluster-wide limit (then no shared bucket
is injected).

Failures: a failed item leaves its exception (``AllFailedError`` or the
original) in its place, and an :class:`OpmapFailureWarning` counts them;
``strict=True`` raises :class:`MapError` (an ``ExceptionGroup``) after every
item has finished, with the partial results in ``.results``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import functools
import importlib
import io
import logging
import os
import pickle
import threading
import types
import uuid
import warnings
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, Generic, Literal, NoReturn, Protocol, TypeVar, overload

from opero import _testing
from opero._map import pools as _pools
from opero._map import process_pool as _process_pool
from opero._map.progress import PROGRESS_VALUES, counting_retries, make_progress, telling
from opero._map.stream import failure_message
from opero._opero_core import CachedCall
from opero._ratelimit.shared_memory import SharedTokenBucket
from opero.errors import ConfigurationError, MapError, OpmapFailureWarning, WorkerStartError

__all__ = ["MODES", "MappedFunction", "OpmapDecorator", "opmap"]


_log = logging.getLogger("opero")

MODES = ("thread", "process", "async", "async_process", "dask")
"""The values ``@opmap(mode=...)`` accepts."""

Mode = Literal["thread", "process", "async", "async_process", "dask"]

T = TypeVar("T")
R = TypeVar("R")


def _default_workers(mode: str) -> int:
    """Return the default worker count of ``mode``."""
    cpu = os.cpu_count() or 1
    if mode in ("process", "async_process"):
        return cpu
    if mode == "async":
        return 32
    return min(32, cpu + 4)


def _check_options(
    mode: Any,
    workers: Any,
    ordered: Any,
    progress: Any,
    strict: Any,
    client: Any,
    executor: Any,
    chunksize: Any,
) -> None:
    """Validate ``@opmap``'s own options; raise ConfigurationError naming the bad one."""
    if mode not in MODES:
        raise ConfigurationError(
            f"opmap: mode={mode!r} is not a mode; use one of {', '.join(map(repr, MODES))}"
        )
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ConfigurationError(
            f"opmap: workers={workers!r} must be an int >= 1, or None for the mode's default"
        )
    if chunksize is not None and (
        isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
    ):
        raise ConfigurationError(
            f"opmap: chunksize={chunksize!r} must be an int >= 1, or None for automatic chunks"
        )
    for name, value in (("ordered", ordered), ("strict", strict)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"opmap: {name}={value!r} must be True or False")
    if not any(progress is v for v in PROGRESS_VALUES) and progress != "force":
        raise ConfigurationError(
            f"opmap: progress={progress!r} must be True (tqdm on a terminal), "
            "False or 'force' (tqdm whenever installed)"
        )
    if executor is not None and not isinstance(executor, cf.Executor):
        raise ConfigurationError(
            f"opmap: executor={executor!r} must be a concurrent.futures.Executor "
            "(ThreadPoolExecutor, ProcessPoolExecutor, ...)"
        )
    if client is not None and mode != "dask":
        raise ConfigurationError(f"opmap: client= is only used with mode='dask', got mode={mode!r}")


def _check_worker_options(
    mode: Any, executor: Any, initializer: Any, initargs: Any, max_tasks: Any
) -> None:
    """Validate ``initializer``, ``initargs`` and ``max_tasks_per_child``."""
    if initializer is not None and not callable(initializer):
        raise ConfigurationError(
            f"opmap: initializer={initializer!r} must be a callable run once per worker (or None)"
        )
    if isinstance(initargs, (str, bytes)) or not isinstance(initargs, (tuple, list)):
        raise ConfigurationError(
            f"opmap: initargs={initargs!r} must be a tuple of the initializer's arguments, "
            "e.g. initargs=(path,)"
        )
    if initargs and initializer is None:
        raise ConfigurationError("opmap: initargs= is given without initializer=")
    if initializer is not None and (executor is not None or mode == "async"):
        where = "executor=" if executor is not None else "mode='async'"
        raise ConfigurationError(
            f"opmap: initializer= is not supported with {where}: "
            + (
                "give it to your executor (ThreadPoolExecutor(initializer=...))"
                if executor is not None
                else "its one worker is the event loop; do the setup before the call"
            )
        )
    if max_tasks is not None:
        if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
            raise ConfigurationError(
                f"opmap: max_tasks_per_child={max_tasks!r} must be an int >= 1, or None "
                "(workers live until exit)"
            )
        if mode != "process" or executor is not None:
            raise ConfigurationError(
                "opmap: max_tasks_per_child= recycles opero's own worker processes: use it "
                f"with mode='process', not {'executor=' if executor is not None else repr(mode)}"
            )


def _init_blob(
    initializer: Callable[..., object] | None, initargs: tuple[Any, ...], mode: str, executor: Any
) -> bytes | None:
    """Pickle ``(initializer, initargs)`` for the workers, at decoration time.

    Like the mapped function: by reference when the initializer can be
    imported by name, else by value through cloudpickle (``__main__``, a
    notebook, a lambda or closure), which a spawned worker can rebuild.
    """
    if initializer is None or executor is not None or mode == "thread":
        return None
    state = (initializer, initargs)
    if _importable(initializer):
        try:
            return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # initargs holding a lambda: by value below
            pass
    try:
        blob: bytes = importlib.import_module("cloudpickle").dumps(
            state, protocol=pickle.HIGHEST_PROTOCOL
        )
    except Exception as exc:
        raise ConfigurationError(
            f"opmap: initializer={initializer!r} with initargs={initargs!r} cannot be pickled "
            f"to the worker processes ({type(exc).__name__}: {exc}); define the initializer "
            "at module level and pass picklable initargs (paths, not open files)"
        ) from exc
    return blob


def _check_function(func: Any, mode: str, executor: Any) -> bool:
    """Check that ``func`` fits ``mode``; return whether it is an ``async def``."""
    if not callable(func):
        raise ConfigurationError(f"opmap: decorates a callable, got {func!r}")
    from opero._pipeline.decorate import is_async_callable  # import cycle

    is_async = is_async_callable(func)  # an async def, or an object with async __call__
    name = getattr(func, "__qualname__", repr(func))
    if executor is not None:
        if is_async:
            raise ConfigurationError(
                f"opmap: {name} is an async def; executor= runs plain functions "
                "(use mode='async' or mode='async_process')"
            )
        return is_async
    if mode == "async_process":
        if not is_async:
            raise ConfigurationError(
                f"opmap: mode='async_process' needs an async def function, {name} is a plain "
                "def (use mode='process')"
            )
        try:
            importlib.import_module("aiomultiprocess")
        except ImportError as exc:
            raise ConfigurationError(
                "opmap: mode='async_process' needs aiomultiprocess: "
                'pip install "opero[aiomultiprocess]"'
            ) from exc
    elif mode == "dask":
        try:
            importlib.import_module("distributed")
        except ImportError as exc:
            raise ConfigurationError(
                "opmap: mode='dask' needs distributed: pip install \"opero[dask]\""
            ) from exc
    if is_async and mode in ("thread", "process", "dask"):
        raise ConfigurationError(
            f"opmap: {name} is an async def; mode={mode!r} runs plain functions "
            "(use mode='async', or mode='async_process' for processes)"
        )
    return is_async


def _as_list(items: Any, name: str) -> list[Any]:
    """Materialize the argument; a non-iterable or a string is a TypeError naming it."""
    if isinstance(items, list):
        return items
    if isinstance(items, (str, bytes, bytearray)):
        # Almost always one item passed bare (a URL, a path): mapping its characters
        # would run the function on each of them and "succeed" with garbage.
        raise TypeError(
            f"{name}() takes an iterable of items, got {type(items).__name__} (it would be "
            "mapped one character at a time): pass [value] to map over one item, or "
            "list(value) to map over its characters"
        )
    try:
        return list(items)
    except TypeError as exc:
        if not isinstance(items, Iterable):
            raise TypeError(
                f"{name}() takes an iterable of items (list, tuple, generator, ...), "
                f"got {type(items).__name__}: pass [item] to map over one item"
            ) from None
        raise exc


class _InitFailed(BaseException):
    """Carries a thread's failed initializer out of the thread engine, which catches Exception."""

    def __init__(self, error: WorkerStartError) -> None:
        super().__init__(error)
        self.error = error


def _with_thread_init(
    fn: Callable[[Any], Any], initializer: Callable[..., object], initargs: tuple[Any, ...]
) -> Callable[[Any], Any]:
    """Return ``fn`` preceded, once per thread, by ``initializer(*initargs)``.

    A raising initializer stops the map with :class:`WorkerStartError`; the
    thread runs it again at the next call.
    """
    local = threading.local()

    def call(item: Any, **kwargs: Any) -> Any:
        if "ready" not in local.__dict__:
            try:
                initializer(*initargs)
            except Exception as exc:
                error = WorkerStartError(
                    f"opmap: the initializer raised in thread "
                    f"{threading.current_thread().name!r}: {type(exc).__name__}: {exc}; the map "
                    "stopped (its items that had not run never will)"
                )
                error.__cause__ = exc
                raise _InitFailed(error) from None
            local.ready = True
        return fn(item, **kwargs)

    return call


def _as_iter(items: Any, name: str) -> Iterator[Any]:
    """Return an iterator over the argument; the same TypeErrors as :func:`_as_list`."""
    if isinstance(items, (str, bytes, bytearray)):
        _as_list(items, name)  # raises the TypeError that explains it
    try:
        return iter(items)
    except TypeError:
        raise TypeError(
            f"{name}() takes an iterable of items (list, tuple, generator, ...), "
            f"got {type(items).__name__}: pass [item] to map over one item"
        ) from None


def _check_ordered(ordered: Any) -> None:
    """Reject an ``ordered=`` that is not a bool (a function's own ``ordered`` clashes)."""
    if not isinstance(ordered, bool):
        raise ConfigurationError(
            f"opmap: ordered={ordered!r} must be True or False (imap/aimap take ordered= "
            "themselves: a function parameter named ordered cannot be passed through them)"
        )


class _WorkerTarget:
    """What a worker receives: the mapped function, the shared rate limiter, the testing switch.

    :func:`opero.set_testing` is a global of the parent process: a worker
    started by spawn or forkserver, or forked before the switch changed, does
    not see it, and would sleep every retry wait of a test suite. The target
    carries the parent's switch at the start of the map, and a worker process
    takes it before running the job.
    """

    __slots__ = ("kwargs", "limiter", "mapped", "pid", "testing")

    def __init__(
        self,
        mapped: MappedFunction[Any, Any],
        limiter: SharedTokenBucket | None,
        testing: _testing.State | bool | None = None,
        pid: int | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.mapped = mapped
        self.limiter = limiter
        self.testing = _testing.state() if testing is None else testing
        self.pid = os.getpid() if pid is None else pid
        self.kwargs = kwargs  # the call's shared keyword arguments: pickled once per map

    def resolve(self) -> Callable[[Any], Any]:
        """Return the uncached per-item function of this process (built once)."""
        if os.getpid() != self.pid:  # a worker process: the parent's switch applies
            _testing.restore(self.testing)
        fn = self.mapped._worker_call(self.limiter)
        if self.kwargs:
            return functools.partial(fn, **self.kwargs)
        return fn

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the mapped function (by reference when importable), limiter and switch."""
        return (_WorkerTarget, (self.mapped, self.limiter, self.testing, self.pid, self.kwargs))


_BY_VALUE: collections.OrderedDict[str, MappedFunction[Any, Any]] = collections.OrderedDict()
"""Mapped functions received by value, by token, least recently used first: a worker
rebuilds each one once while it is among the last :data:`BY_VALUE_KEPT` it ran."""
BY_VALUE_KEPT = 64
"""How many mapped functions received by value a worker keeps. A service that maps
a fresh closure per request would otherwise keep every one of them (and what it
holds) in every long-lived worker, growing without bound."""
_BY_VALUE_LOCK = threading.Lock()  # a Dask worker runs tasks on several threads
_SENT_BY_VALUE: weakref.WeakValueDictionary[str, MappedFunction[Any, Any]] = (
    weakref.WeakValueDictionary()
)
"""Mapped functions this process sent by value (in-process executors get the original)."""


def _importable(obj: Any) -> bool:
    """Return whether ``obj`` can be found again by its module and ``__qualname__``."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<" in qualname:
        return False
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return False
    return found is obj


def _dumps_by_value(obj: Any) -> bytes:
    """Return ``obj`` pickled by cloudpickle, ``@opero`` functions it reaches rebuilt by options.

    cloudpickle copies a function of ``__main__`` (or a local one) by value,
    closure and globals included; the closure of an ``@opero`` function holds
    native objects (the backoff schedule, locks) that do not pickle, and a
    cached one pickles by its name, which a local function cannot be found by,
    so a mapped function calling such an ``@opero`` helper could not be sent to
    a worker. Such a function is sent as the function it decorates and its
    options instead, and decorated again in the worker.
    """
    cloudpickle = importlib.import_module("cloudpickle")
    from opero._pipeline import decorate as _decorator

    class _Pickler(cloudpickle.Pickler):  # type: ignore[misc,name-defined]
        def reducer_override(self, value: Any) -> Any:
            if (
                isinstance(value, (types.FunctionType, CachedCall))  # not a bound method
                and _decorator._is_opero(value)
                and not _importable(value)
            ):
                internals: Any = getattr(value, "__opero__")  # noqa: B009 (checked above)
                # The function is memoized before its state is pickled, so a
                # decorated function that calls itself by its global name pickles.
                return (
                    _opero_trampoline,
                    (internals.is_async,),
                    (internals.function, dict(internals.policy.options)),
                    None,
                    None,
                    _install_opero,
                )
            return super().reducer_override(value)

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _opero_trampoline(is_async: bool) -> Callable[..., Any]:
    """Return a function calling the ``@opero`` function that :func:`_install_opero` builds."""
    target: list[Callable[..., Any]] = []
    if is_async:

        async def acall(*args: Any, **kwargs: Any) -> Any:
            return await target[0](*args, **kwargs)

        acall.__dict__["_opero_target"] = target
        return acall

    def call(*args: Any, **kwargs: Any) -> Any:
        return target[0](*args, **kwargs)

    call.__dict__["_opero_target"] = target
    return call


def _install_opero(trampoline: Any, state: tuple[Callable[..., Any], dict[str, Any]]) -> None:
    """Decorate the unpickled function with its options behind ``trampoline``."""
    from opero._pipeline import decorate as _decorator

    func, options = state
    wrapper = _decorator.opero(**options)(func)
    target = trampoline.__dict__.pop("_opero_target")
    target.append(wrapper)
    functools.update_wrapper(trampoline, wrapper)


def _rebuild_by_value(token: str, blob: bytes) -> MappedFunction[Any, Any]:
    """Unpickle a mapped function sent by value, reusing this process's copy."""
    mapped = _SENT_BY_VALUE.get(token)
    if mapped is not None:
        return mapped
    with _BY_VALUE_LOCK:
        mapped = _BY_VALUE.get(token)
        if mapped is not None:
            _BY_VALUE.move_to_end(token)
            return mapped
    cloudpickle = importlib.import_module("cloudpickle")
    func, options = cloudpickle.loads(blob)
    mapped = MappedFunction(func, token=token, **options)
    with _BY_VALUE_LOCK:
        mapped = _BY_VALUE.setdefault(token, mapped)
        _BY_VALUE.move_to_end(token)
        while len(_BY_VALUE) > BY_VALUE_KEPT:
            _BY_VALUE.popitem(last=False)
    return mapped


def _init_with_mapped(
    token: str,
    state: tuple[Callable[..., Any], dict[str, Any]],
    initializer: Callable[..., object],
    initargs: tuple[Any, ...],
) -> None:
    """In a worker: rebuild a mapped function sent by value, then run its initializer.

    Unpickled together, the function and the initializer share their globals;
    the function is kept under its token, where :func:`_rebuild_by_value`
    finds it when the jobs arrive (in a forked worker, instead of the parent's
    original it inherited).
    """
    func, options = state
    mapped: MappedFunction[Any, Any] = MappedFunction(func, token=token, **options)
    # A forked worker inherited the parent's original: it must use this copy instead.
    _SENT_BY_VALUE.pop(token, None)
    with _BY_VALUE_LOCK:
        _BY_VALUE[token] = mapped
        _BY_VALUE.move_to_end(token)
        while len(_BY_VALUE) > BY_VALUE_KEPT:
            _BY_VALUE.popitem(last=False)
    initializer(*initargs)


class _Results(list):  # type: ignore[type-arg]
    """The list a map returns; it remembers its items (and, unordered, their input indices).

    So ``f.failed(results)`` can name each failed item even when the items
    came from a generator. It is a plain ``list`` otherwise (equality, slicing,
    pickling as a list subclass).
    """

    __slots__ = ("_opmap_indices", "_opmap_items")

    _opmap_items: Sequence[Any]
    _opmap_indices: list[int] | None

    def _forget(self) -> None:
        """Forget the items: reordered results no longer match them by position."""
        for name in self.__slots__:
            if hasattr(self, name):
                delattr(self, name)

    def reverse(self) -> None:
        """Reverse in place; :meth:`MappedFunction.failed` then needs the items again."""
        self._forget()
        super().reverse()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        """Sort in place; :meth:`MappedFunction.failed` then needs the items again."""
        self._forget()
        super().sort(*args, **kwargs)


class MappedFunction(Generic[T, R]):
    """A one-item function mapped over iterables; built by :func:`opmap`.

    Generic in the item type ``T`` and the result type ``R`` (for an ``async
    def`` function, what it returns once awaited). Call it with an iterable to
    get a ``list`` of results, ``await f.amap(items)`` from async code, or
    stream with ``f.imap(items)`` / ``f.aimap(items)``. A failed item holds its
    exception, hence ``R | Exception``. ``f.item_function`` is the per-item
    ``@opero`` function (with its cache methods).
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        mode: Mode = "thread",
        workers: int | None = None,
        ordered: bool = True,
        progress: bool | Literal["force"] = True,
        strict: bool = False,
        client: Any = None,
        executor: cf.Executor | None = None,
        chunksize: int | None = None,
        token: str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[Any] = (),
        max_tasks_per_child: int | None = None,
        **opero_options: Any,
    ) -> None:
        from opero._pipeline import decorate as _decorator

        self._func = func
        self._mode: Mode = mode
        self._workers = workers
        self._ordered = ordered
        self._progress = progress
        self._strict = strict
        self._client = client
        self._executor = executor
        self._chunksize = chunksize
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._init_blob = _init_blob(initializer, self._initargs, mode, executor)
        self._shared_init_blob: bytes | None = None
        self._opero_options = opero_options
        self._is_async = _check_function(func, mode, executor)
        # Validates every @opero option now, at decoration time.
        self.item_function: Any = _decorator.opero(**self._counted(opero_options))(func)
        self._meta: Any = getattr(self.item_function, "__opero__", None)
        self._has_cache = bool(getattr(self._meta, "has_cache", False))
        self._thread_fn: Callable[[Any], Any] = self.item_function
        if initializer is not None and mode == "thread" and executor is None:
            self._thread_fn = _with_thread_init(self.item_function, initializer, self._initargs)
        self._dask_clients: weakref.WeakSet[Any] = weakref.WeakSet()  # plugin registered
        self._token = token or uuid.uuid4().hex
        self._worker_fns: dict[str | None, Callable[[Any], Any]] = {}
        self._limiter: SharedTokenBucket | None = None
        self._limiter_lock = threading.Lock()
        self._blob: bytes | None = None
        self._stream_chunk = 1  # the chunk size the last imap/aimap reached (see stream.py)
        functools.update_wrapper(self, func)
        self._label: str = getattr(func, "__qualname__", repr(func))
        self.__name__ = getattr(func, "__name__", "opmap")

    # ------------------------------------------------------------------ public API

    @property
    def mode(self) -> str:
        """The execution mode (``"thread"``, ``"process"``, ...)."""
        return "executor" if self._executor is not None else self._mode

    @property
    def workers(self) -> int:
        """The worker count used by the next call (the mode's default when not given)."""
        if self._workers is not None:
            return self._workers
        if self._executor is not None:
            return int(getattr(self._executor, "_max_workers", None) or os.cpu_count() or 1)
        if self._mode == "dask":
            return max(1, int(sum(self._dask_client().nthreads().values())))
        return _default_workers(self._mode)

    def __call__(
        self, items: Iterable[T], /, *args: NoReturn, **kwargs: Any
    ) -> list[R | Exception]:
        """Map the function over ``items``; return the results as a list.

        Args:
            items: Any iterable; a generator is consumed once.
            *args: Not supported: extra arguments go by keyword.
            **kwargs: Shared keyword arguments, passed to every item call
                (``func(item, **kwargs)``) and part of each item's cache key.

        Returns:
            One result per item, in input order (completion order with
            ``ordered=False``); a failed item holds its exception. The list
            remembers its items for :meth:`failed`.

        Raises:
            TypeError: ``items`` is not iterable, a positional extra argument,
                or a keyword the function does not take.
            MapError: ``strict=True`` and some items failed (after all finished).

        """
        kw = self._shared_kwargs("", args, kwargs)
        values = _as_list(items, self.__name__)
        if self._executor is None and self._mode == "async":
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(self._amap_async(values, kw))
            with cf.ThreadPoolExecutor(1, thread_name_prefix="opero-opmap-async") as helper:
                return helper.submit(asyncio.run, self._amap_async(values, kw)).result()
        if self._executor is None and self._mode == "async_process":
            future = _pools.background_loop().submit(self._amap_aio_process(values, kw))
            try:
                return future.result()
            except BaseException:  # Ctrl-C: stop the map on the background loop too
                future.cancel()
                raise
        return self._map_sync(values, None, kw)

    async def amap(
        self, items: Iterable[T], /, *args: NoReturn, **kwargs: Any
    ) -> list[R | Exception]:
        """Map the function over ``items`` without blocking the running event loop.

        Same arguments, results and errors as calling the object.
        """
        kw = self._shared_kwargs("amap", args, kwargs)
        values = _as_list(items, self.__name__)
        if self._executor is None and self._mode == "async":
            return await self._amap_async(values, kw)
        if self._executor is None and self._mode == "async_process":
            future = _pools.background_loop().submit(self._amap_aio_process(values, kw))
            return await asyncio.wrap_future(future)
        scope = _pools.CancelScope()
        try:
            return await asyncio.to_thread(self._map_sync, values, scope, kw)
        except asyncio.CancelledError:
            # The helper thread stops between two items (thread mode) or drops
            # the jobs not yet sent (process mode), so asyncio.run() does not
            # wait for the whole map when it joins its executor.
            scope.cancel()
            raise

    def _worker_init_blob(self) -> bytes | None:
        """Return what a worker process runs first: the initializer, pickled at decoration.

        When this function travels by value (``__main__``, a notebook), the
        initializer travels in one pickle with it, and the worker rebuilds the
        function there (:func:`_init_with_mapped`): both then share one copy of
        the globals they use, so a global the initializer sets (a model) is the
        one the function reads. Pickled separately, each would get its own.
        """
        if self._init_blob is None or _importable(self):
            return self._init_blob
        if self._shared_init_blob is None:
            # The options a copy by value is rebuilt with (as in __reduce__).
            options = dict(self._opero_options)
            options.update(
                mode=self._mode,
                workers=self._workers,
                ordered=self._ordered,
                progress=self._progress,
                strict=self._strict,
                chunksize=self._chunksize,
            )
            state = (self._token, (self._func, options), self._initializer, self._initargs)
            try:
                self._shared_init_blob = _dumps_by_value((_init_with_mapped, state))
            except Exception:  # __reduce__ reports it when the function is sent
                self._shared_init_blob = self._init_blob
        return self._shared_init_blob

    def imap(
        self, items: Iterable[T], /, *args: NoReturn, ordered: bool = True, **kwargs: Any
    ) -> Iterator[R | Exception]:
        """Stream the results: an iterator that yields each result as soon as it is ready.

        Items are pulled lazily (an endless generator works): at most
        ``2 * workers`` jobs are in flight, each of at most ``chunksize`` items
        (automatic: one item at first, then what takes about 10 ms, at most
        4096; one item per job in ``"async"`` mode), so at most ``2 * workers * 4096``
        items are pulled and not yet yielded. When the loop over it stops
        (``break``, ``close()``, an exception, Ctrl-C, garbage collection),
        no further item is pulled, jobs not started are dropped, and the
        workers stop after the job they are running.

        Args:
            items: Any iterable; consumed lazily, once.
            *args: Not supported: extra arguments go by keyword.
            ordered: Yield in input order (default) or, when ``False``, in
                completion order (of jobs).
            **kwargs: Shared keyword arguments, as for a call (``ordered`` is
                this method's own, so the function cannot receive it here).

        Returns:
            An iterator of results; a failed item yields its exception. When it
            is exhausted and some items failed, an :class:`OpmapFailureWarning`
            (or :class:`MapError` with ``strict=True``, after the last result;
            its ``results`` are empty: nothing is kept) names the first.

        Raises:
            TypeError: ``items`` is not iterable, or bad extra arguments (at once).
            ConfigurationError: ``ordered`` is not a ``bool``.

        """
        from opero._map import stream as _stream

        kw = self._shared_kwargs("imap", args, kwargs)
        _check_ordered(ordered)
        source = _as_iter(items, self.__name__)
        return _stream.imap(self, source, ordered, kw)

    def aimap(
        self,
        items: Iterable[T] | AsyncIterable[T],
        /,
        *args: NoReturn,
        ordered: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[R | Exception]:
        """Stream the results to async code: the async iterator twin of :meth:`imap`.

        ``items`` may be an iterable or an async iterable. Never blocks the
        running loop (``"async"`` mode runs on it; the other modes deliver
        results to it from their workers). Leaving the ``async for`` loop, or
        cancelling the task running it, stops the map as :meth:`imap` does.

        Args:
            items: An iterable or an async iterable; consumed lazily, once.
            *args: Not supported: extra arguments go by keyword.
            ordered: Input order (default) or completion order.
            **kwargs: Shared keyword arguments, as for a call.

        Returns:
            An async iterator of results; a failed item yields its exception.

        Raises:
            TypeError: ``items`` is not iterable, or bad extra arguments (at once).
            ConfigurationError: ``ordered`` is not a ``bool``.

        """
        from opero._map import stream as _stream

        kw = self._shared_kwargs("aimap", args, kwargs)
        _check_ordered(ordered)
        source: Any = items if isinstance(items, AsyncIterable) else _as_iter(items, self.__name__)
        return _stream.aimap(self, source, ordered, kw)

    def failed(
        self, results: Sequence[Any], items: Iterable[T] | None = None
    ) -> list[tuple[int, T, Exception]]:
        """Return ``(index, item, exception)`` for every failed item of a map's results.

        Rerunning only the failed items is one line:
        ``f([item for _, item, _ in f.failed(results)])``.

        Args:
            results: What a call, ``amap`` or ``MapError.results`` returned.
                Those lists remember their items (and, with ``ordered=False``,
                each result's input index), so ``items`` is not needed.
            items: The items, in input order, for a results list that does not
                remember them (one you built, e.g. ``list(f.imap(items))``,
                whose items are then matched by position: ordered only).

        Returns:
            The failed items, by increasing input index.

        Raises:
            TypeError: ``results`` does not remember its items and ``items`` was
                not given, or their lengths differ.

        """
        indices: list[int] | None = None
        if items is not None:
            known: Sequence[Any] = _as_list(items, "failed")
        elif isinstance(results, _Results) and hasattr(results, "_opmap_items"):
            known = results._opmap_items
            indices = results._opmap_indices
        else:
            raise TypeError(
                f"{self.__name__}.failed(results): this results list does not remember its "
                "items (only the lists a call or amap returns do, until sorted or reversed "
                "in place): pass them, failed(results, items)"
            )
        if len(known) != len(results):
            raise TypeError(
                f"{self.__name__}.failed(): {len(results)} results for {len(known)} items; "
                "pass the items of that map, in input order"
            )
        found = [
            (i if indices is None else indices[i], r)
            for i, r in enumerate(results)
            if isinstance(r, Exception)
        ]
        found.sort(key=lambda pair: pair[0])
        return [(i, known[i], r) for i, r in found]

    def _shared_kwargs(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Check a call's extra arguments; return the shared keywords (``None`` when none)."""
        call = f"{self.__name__}.{method}" if method else self.__name__
        if args:
            raise TypeError(
                f"{call}(items, ...) got {len(args)} extra positional argument(s): extra "
                "arguments are shared by every item and go by keyword only "
                f"({call}(items, scale=2) calls func(item, scale=2)); positional extras are "
                "not supported (use functools.partial, or a tuple per item)"
            )
        if not kwargs:
            return None
        signature = self._signature()
        if signature is not None:
            try:
                signature.bind(None, **kwargs)
            except TypeError as exc:
                raise TypeError(
                    f"{call}(items, {', '.join(f'{k}=...' for k in kwargs)}): {self._label} "
                    f"cannot take these keyword arguments with its item: {exc}"
                ) from None
        return kwargs

    def _signature(self) -> Any:
        """Return the function's signature (``None`` when it has none), computed once."""
        try:
            return self.__dict__["_sig"]
        except KeyError:
            pass
        import inspect

        try:
            sig: Any = inspect.signature(self._func)
        except (TypeError, ValueError):
            sig = None
        self.__dict__["_sig"] = sig
        return sig

    def __reduce__(self) -> Any:
        """Pickle by reference when importable by name, else by value (cloudpickle)."""
        if _importable(self):
            return str(self.__dict__["__qualname__"])  # set by update_wrapper
        if self._blob is None:
            options = dict(self._opero_options)
            options.update(
                mode=self._mode,
                workers=self._workers,
                ordered=self._ordered,
                progress=self._progress,
                strict=self._strict,
                chunksize=self._chunksize,
            )
            try:
                self._blob = _dumps_by_value((self._func, options))
            except Exception as exc:
                raise TypeError(
                    f"opmap: cannot send {self._label} to other processes: it cannot be "
                    "imported by name (defined in __main__, a notebook or a function), so "
                    "it is pickled by value with what it reaches (globals, closure, the "
                    f"options of the @opero functions it calls), and that failed: "
                    f"{type(exc).__name__}: {exc}. Define it, and what it uses, in an "
                    "importable module, or use mode='thread'"
                ) from exc
            _SENT_BY_VALUE[self._token] = self
        return (_rebuild_by_value, (self._token, self._blob))

    def __repr__(self) -> str:
        """Show the function and the mode."""
        return f"<opmap {self._label} mode={self.mode!r}>"

    # ------------------------------------------------------------------ workers side

    def _worker_call(self, limiter: SharedTokenBucket | None) -> Callable[[Any], Any]:
        """Return this process's uncached per-item function using ``limiter``."""
        key = None if limiter is None else limiter.path
        fn = self._worker_fns.get(key)
        if fn is None:
            from opero._pipeline import decorate as _decorator

            options = {
                k: v
                for k, v in self._opero_options.items()
                if k != "cache" and not k.startswith("cache_") and k != "on_cache_hit"
            }
            if limiter is not None:
                options["_limiter"] = limiter
            options = self._counted(options)
            wrapped = _decorator.opero(**options)(self._func)
            meta = getattr(wrapped, "__opero__", None)
            if meta is None:
                fn = wrapped
            else:
                fn = meta.acall_uncached if self._is_async else meta.call_uncached
            self._worker_fns[key] = fn
        return fn

    def _worker_target(self, kw: dict[str, Any] | None) -> _WorkerTarget:
        """Return what the workers of one map run: this function, the limiter, the keywords."""
        return _WorkerTarget(self, self._shared_limiter(), kwargs=kw)

    def _shared_limiter(self) -> SharedTokenBucket | None:
        """Return the bucket shared with worker processes, when a local rate limit is set."""
        rate = self._opero_options.get("rate_limit")
        if rate is None or self._opero_options.get("rate_limit_backend", "memory") != "memory":
            return None
        if isinstance(rate, (list, tuple)) or callable(self._opero_options.get("rate_limit_key")):
            return None  # windows and per-key buckets are per worker process (Redis: global)
        with self._limiter_lock:
            if self._limiter is None:
                # A callable rate is read by the workers on every call and passed to
                # reserve(rate); 1.0 is a placeholder (reading it here would fail the
                # whole map, not its items, when it raises or returns a bad rate).
                current = 1.0 if callable(rate) else rate
                burst = self._opero_options.get("rate_burst") or 1
                self._limiter = SharedTokenBucket(float(current), int(burst))
            return self._limiter

    def _counted(self, options: dict[str, Any]) -> dict[str, Any]:
        """Return ``options`` with an ``on_retry`` that counts retries for the progress bar.

        ``progress=False`` keeps the options as they are (no cost); so does an
        ``on_retry`` that is not callable, which ``@opero`` then rejects.
        """
        user = options.get("on_retry")
        if self._progress is False or not (user is None or callable(user)):
            return options
        return {**options, "on_retry": counting_retries(user)}

    def _told(self, fn: Callable[[Any], Any], bar: Any) -> Callable[[Any], Any]:
        """Return ``fn`` telling the shown bar of each failure and retry as they happen.

        Only used when a bar is shown: a map without one runs ``fn`` itself.
        """
        return telling(fn, bar, self._is_async and self._mode == "async", failures=True)

    def _cache_hits(self) -> int:
        """Return the item function's cache hit count (0 without a cache or counters)."""
        if not self._has_cache:
            return 0
        try:
            return int(self.item_function.cache_info().hits)
        except Exception:  # a backend without counters: no cached count
            return 0

    def _register_dask_initializer(self, client: Any) -> None:
        """Register the initializer as a worker plugin on ``client``, once per client."""
        if client in self._dask_clients:
            return
        from opero._map.dask_init import register

        blob = self._worker_init_blob()
        assert blob is not None
        register(client, blob, self._label)
        self._dask_clients.add(client)

    def _dask_client(self) -> Any:
        """Return ``client=`` or the current Dask client; a clear error when there is none."""
        if self._client is not None:
            return self._client
        from distributed import get_client

        try:
            return get_client()
        except ValueError as exc:
            raise ConfigurationError(
                "opmap: mode='dask' found no Dask client: pass client=distributed.Client(...) "
                "to @opmap, or create a Client before the call"
            ) from exc

    # ------------------------------------------------------------------ engines

    def _finish(self, items: list[Any], pieces: list[_pools.Piece]) -> list[Any]:
        """Assemble the pieces; warn about failures, or raise them when strict."""
        n = len(items)
        failed: list[int] = []
        results = _Results()
        results._opmap_items = items
        results._opmap_indices = None
        if self._ordered:
            results.append(None)
            results *= n  # in C, like [None] * n
            for indices, values, errors in pieces:
                if isinstance(indices, range):
                    results[indices.start : indices.stop] = values
                else:
                    for i, value in zip(indices, values, strict=True):
                        results[i] = value
                if errors:
                    for position, exc in errors.items():
                        results[indices[position]] = exc
                        failed.append(indices[position])
            failed.sort()
        else:
            order: list[int] = []
            first_input = -1  # the smallest input index that failed, and its result place
            first_place = -1
            for indices, values, errors in pieces:
                if errors:
                    base = len(results)
                    values = list(values)
                    for position, exc in errors.items():
                        values[position] = exc
                        failed.append(base + position)
                        if first_input < 0 or indices[position] < first_input:
                            first_input, first_place = indices[position], base + position
                results.extend(values)
                order.extend(indices)
            results._opmap_indices = order
        if failed:
            if self._ordered:
                first_input = first_place = failed[0]
            message = failure_message(
                self._label, len(failed), n, first_input, results[first_place]
            )
            if self._strict:
                raise MapError(message, [results[i] for i in failed], results, failed)
            warnings.warn(
                f"{message}; every exception is in its item's place "
                f"({self.__name__}.failed(results) lists them); strict=True raises instead",
                OpmapFailureWarning,
                stacklevel=4,
            )
        return results

    def _jobs(self, n: int, workers: int) -> int:
        """Return the job size: ``chunksize=`` or about four jobs per worker."""
        if self._chunksize is not None:
            return self._chunksize
        return max(1, -(-n // (workers * 4)))

    def _item_fn(self, kw: dict[str, Any] | None, thread: bool = False) -> Callable[[Any], Any]:
        """Return the per-item ``@opero`` function, with the shared keywords bound.

        With ``thread``: the one that runs the ``initializer`` first in each thread.
        """
        fn: Callable[..., Any] = self._thread_fn if thread else self.item_function
        if kw:
            return functools.partial(fn, **kw)
        return fn

    def _map_sync(
        self,
        items: list[Any],
        scope: _pools.CancelScope | None = None,
        kw: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run a map in the thread, process, dask or executor engine."""
        n = len(items)
        bar = make_progress(self._progress, n, self.__name__)
        try:
            if self._executor is None and self._mode == "thread":
                hits = self._cache_hits() if bar.shown else 0
                workers = self.workers
                batch = self._chunksize or max(1, min(256, n // (workers * 4)))
                pieces = _pools.run_thread_items(
                    self._item_fn(kw, thread=True)
                    if not bar.shown
                    else self._told(self._item_fn(kw, thread=True), bar),
                    items,
                    workers,
                    batch,
                    bar if self._progress else None,
                    scope,
                )
                if bar.shown:
                    bar.cache(self._cache_hits() - hits)
                return self._finish(items, pieces)
            return self._finish(items, self._dispatch(items, bar, scope, kw))
        except _InitFailed as failed:
            raise failed.error from failed.error.__cause__
        finally:
            bar.close()

    def _lookup_many(self, kw: dict[str, Any] | None) -> Callable[[list[Any]], Any]:
        """Return ``cache_lookup_many``, or its loop with the shared keywords in each key."""
        if not kw:
            lookup_many: Callable[[list[Any]], Any] = self._meta.cache_lookup_many
            return lookup_many
        from opero.cache import MISS

        lookup = self._meta.cache_lookup

        def lookup_with(items: list[Any]) -> tuple[list[Any], int]:
            values = [lookup((item,), kw) for item in items]
            return values, sum(1 for value in values if value is not MISS)

        return lookup_with

    def _store_many(self, kw: dict[str, Any] | None) -> Callable[[list[Any], list[Any]], None]:
        """Return ``cache_store_many``, or its loop with the shared keywords in each key."""
        if not kw:
            store_many: Callable[[list[Any], list[Any]], None] = self._meta.cache_store_many
            return store_many
        store = self._meta.cache_store

        def store_with(items: list[Any], values: list[Any]) -> None:
            for item, value in zip(items, values, strict=True):
                store((item,), kw, value)

        return store_with

    def _lookup(
        self, items: list[Any], bar: Any, kw: dict[str, Any] | None = None, offset: int = 0
    ) -> tuple[list[_pools.Piece], Sequence[int]]:
        """Serve cached items in the parent; return their piece and the misses to dispatch.

        An item whose cache key cannot be built (whatever the exception) fails
        in its place, with a note naming its index; it is not dispatched.
        """
        if not self._has_cache:
            return [], range(len(items))
        from opero.cache import MISS

        lookup_many = self._lookup_many(kw)
        try:
            found, hits = lookup_many(items)
            unkeyable: dict[int, Exception] = {}
        except Exception:  # some item cannot be keyed: look the items up one by one
            found, hits, unkeyable = self._lookup_each(items, lookup_many, offset)
        if not hits and not unkeyable:
            return [], range(len(items))
        bar.update(hits + len(unkeyable))
        bar.cache(hits)
        if unkeyable:
            bar.fail(len(unkeyable))
        if hits == len(items):
            return [(range(len(items)), found, None)], []
        pieces: list[_pools.Piece] = []
        if unkeyable:
            bad = sorted(unkeyable)
            errors: dict[int, BaseException] = {p: unkeyable[i] for p, i in enumerate(bad)}
            pieces.append((bad, [None] * len(bad), errors))
        missing = [i for i, value in enumerate(found) if value is MISS and i not in unkeyable]
        hit_indices = [i for i, value in enumerate(found) if value is not MISS]
        if hit_indices:
            pieces.append((hit_indices, [found[i] for i in hit_indices], None))
        return pieces, missing

    def _lookup_each(
        self, items: list[Any], lookup_many: Callable[[list[Any]], Any], offset: int = 0
    ) -> tuple[list[Any], int, dict[int, Exception]]:
        """Look every item up alone; return the values, the hit count and the unkeyable items."""
        from opero.cache import MISS

        found: list[Any] = []
        hits = 0
        unkeyable: dict[int, Exception] = {}
        for i, item in enumerate(items):
            try:
                value = lookup_many([item])[0][0]
            except Exception as exc:
                exc.add_note(
                    f"opmap {self._label}: the cache lookup of item {offset + i} failed (its key "
                    "could not be built, or the backend raised); it failed in its place and the "
                    "other items ran"
                )
                unkeyable[i] = exc
                value = MISS
            found.append(value)
            hits += value is not MISS
        return found, hits, unkeyable

    def _collector(
        self,
        items: list[Any],
        job_indices: list[list[int]] | list[range],
        pieces: list[_pools.Piece],
        bar: Any,
        kw: dict[str, Any] | None = None,
    ) -> Callable[[int, list[Any], dict[int, BaseException] | None], None]:
        """Return the ``done`` callback: record a job's piece, fill the cache, count progress."""
        store_many = self._store_many(kw) if self._has_cache else None
        lock = threading.Lock()

        def store(keys: list[Any], values: list[Any]) -> None:
            # A store failure never fails the item, whose result is computed.
            assert store_many is not None
            try:
                store_many(keys, values)
            except Exception:
                for key, value in zip(keys, values, strict=True):
                    try:
                        store_many([key], [value])
                    except Exception:
                        _log.warning(
                            "opmap %s: could not store a result in the cache",
                            self._label,
                            exc_info=True,
                        )

        def done(j: int, values: list[Any], errors: dict[int, BaseException] | None) -> None:
            indices = job_indices[j]
            with lock:
                pieces.append((indices, values, errors))
            if store_many is not None:
                if errors:
                    # Failed items are never stored.
                    kept = [p for p in range(len(values)) if p not in errors]
                    store([items[indices[p]] for p in kept], [values[p] for p in kept])
                elif isinstance(indices, range):
                    store(items[indices.start : indices.stop], values)
                else:
                    store([items[i] for i in indices], values)
            bar.update(len(indices))
            if errors:
                bar.fail(len(errors))

        return done

    def _plan(
        self, items: list[Any], missing: Sequence[int], workers: int
    ) -> tuple[list[list[Any]], list[list[int]] | list[range]]:
        """Cut the items to dispatch into jobs."""
        size = self._jobs(len(missing), workers)
        if len(missing) == len(items):
            ranges = [range(lo, min(lo + size, len(items))) for lo in range(0, len(items), size)]
            return [items[r.start : r.stop] for r in ranges], ranges
        index_jobs = [list(missing[lo : lo + size]) for lo in range(0, len(missing), size)]
        return [[items[i] for i in job] for job in index_jobs], index_jobs

    def _dispatch(
        self,
        items: list[Any],
        bar: Any,
        scope: _pools.CancelScope | None = None,
        kw: dict[str, Any] | None = None,
    ) -> list[_pools.Piece]:
        """Run the process, dask or executor engine over the cache misses."""
        pieces, missing = self._lookup(items, bar, kw)
        if not missing:
            return pieces
        if self._mode == "dask" and self._executor is None:
            client = self._dask_client()
            workers = self.workers
        else:
            client = None
            workers = self.workers
        jobs, job_indices = self._plan(items, missing, workers)
        target = self._worker_target(kw)
        done = self._collector(items, job_indices, pieces, bar, kw)
        if self._executor is not None:
            _pools.run_executor_jobs(self._executor, target, jobs, done, scope)
        elif client is not None:
            if self._init_blob is not None:
                self._register_dask_initializer(client)
            _pools.run_dask_jobs(client, target, jobs, done, workers)
        else:
            pool = _process_pool.process_pool(
                workers, None, self._worker_init_blob(), self._max_tasks
            )
            retried = bar.retry if bar.shown else None
            _process_pool.run_process_jobs(
                pool, target, jobs, done, job_indices, scope, retried=retried
            )
        return pieces

    async def _amap_async(self, items: list[Any], kw: dict[str, Any] | None = None) -> list[Any]:
        """Run a map on the running loop (``mode="async"``)."""
        n = len(items)
        bar = make_progress(self._progress, n, self.__name__)
        hits = self._cache_hits() if bar.shown else 0
        try:
            pieces = await _pools.run_async_items(
                self._item_fn(kw) if not bar.shown else self._told(self._item_fn(kw), bar),
                items,
                self.workers,
                self._is_async,
                bar if self._progress else None,
            )
            if bar.shown:
                bar.cache(self._cache_hits() - hits)
        finally:
            bar.close()
        return self._finish(items, pieces)

    async def _amap_aio_process(
        self, items: list[Any], kw: dict[str, Any] | None = None
    ) -> list[Any]:
        """Run a map on the aiomultiprocess pool (on the background loop)."""
        n = len(items)
        bar = make_progress(self._progress, n, self.__name__)
        try:
            pieces, missing = self._lookup(items, bar, kw)
            if missing:
                workers = self.workers
                jobs, job_indices = self._plan(items, missing, workers)
                target = self._worker_target(kw)
                done = self._collector(items, job_indices, pieces, bar, kw)
                await _pools.run_aio_process_jobs(
                    workers, target, jobs, done, init_blob=self._worker_init_blob()
                )
        finally:
            bar.close()
        return self._finish(items, pieces)


class OpmapDecorator(Protocol):
    """What ``opmap(...)`` returns: turns a one-item function into a :class:`MappedFunction`.

    ``Callable[[T], Awaitable[R]]`` (an ``async def``) gives
    ``MappedFunction[T, R]``, as does ``Callable[[T], R]``; a function whose
    first parameter is the item and whose other parameters are keyword
    arguments shared by the call (``f(items, scale=2)``) is typed by its item.
    """

    @overload
    def __call__(self, func: Callable[[T], Awaitable[R]], /) -> MappedFunction[T, R]: ...

    @overload
    def __call__(self, func: Callable[[T], R], /) -> MappedFunction[T, R]: ...

    @overload
    def __call__(self, func: Callable[..., R], /) -> MappedFunction[Any, R]: ...

    def __call__(self, func: Callable[..., Any], /) -> MappedFunction[Any, Any]:
        """Decorate ``func``."""
        ...


def opmap(
    mode: Mode = "thread",
    workers: int | None = None,
    ordered: bool = True,
    progress: bool | Literal["force"] = True,
    strict: bool = False,
    client: Any = None,
    executor: cf.Executor | None = None,
    chunksize: int | None = None,
    initializer: Callable[..., object] | None = None,
    initargs: Sequence[Any] = (),
    max_tasks_per_child: int | None = None,
    **opero_options: Any,
) -> OpmapDecorator:
    """Turn a one-item function into a function over an iterable of items.

    Every ``@opero`` option (``retries``, ``arg_fallback``, ``cache``,
    ``rate_limit``, callbacks, ...) applies to each item. See the module
    docstring for how each mode runs, caches and rate-limits.

    Args:
        mode: ``"thread"`` (default), ``"process"``, ``"async"``,
            ``"async_process"`` or ``"dask"``.
        workers: Items (or jobs) in flight at once, >= 1. Default: ``min(32,
            cpus + 4)`` threads, ``cpus`` processes, 32 coroutines, the
            client's thread count for Dask, the executor's ``max_workers``.
        ordered: Results in input order (default) or, when ``False``, in
            completion order (of batches in the batched modes).
        progress: ``True`` shows a tqdm bar on a terminal when tqdm is
            installed, ``"force"`` whenever tqdm is installed, ``False`` never.
        strict: Raise :class:`MapError` after all items finished when any
            failed, instead of warning. Default ``False``.
        client: The ``distributed.Client`` of ``mode="dask"``; the current
            client at first use when ``None``.
        executor: Any ``concurrent.futures.Executor`` to run the batches on,
            instead of opero's own pools (``mode`` is then ignored).
        chunksize: Items per batch or job; automatic (about four jobs per
            worker, at most 256 items per thread batch) when ``None``.
        initializer: Called as ``initializer(*initargs)`` once per worker
            before its first item: per thread (the calling thread included)
            in ``"thread"`` mode, per worker process in ``"process"`` and
            ``"async_process"`` modes, per Dask worker (a worker plugin) in
            ``"dask"`` mode. If it raises, the call raises
            :class:`WorkerStartError` (its ``__cause__`` is that error).
        initargs: The arguments of ``initializer``.
        max_tasks_per_child: ``"process"`` mode: a worker process runs this
            many jobs (chunks of ``chunksize`` items), then exits and a new
            one replaces it. ``None``: workers live until exit.
        **opero_options: Options of ``@opero``, applied per item.

    Returns:
        A decorator returning a :class:`MappedFunction`.

    Raises:
        ConfigurationError: At decoration time, for a bad option (unknown mode,
            ``workers < 1``, ``async_process`` with a plain ``def`` or without
            aiomultiprocess, ...).
        TypeError: An unknown ``@opero`` option (with the closest valid name).

    """
    _check_options(mode, workers, ordered, progress, strict, client, executor, chunksize)
    _check_worker_options(mode, executor, initializer, initargs, max_tasks_per_child)

    def decorate(func: Callable[..., Any]) -> MappedFunction[Any, Any]:
        return MappedFunction(
            func,
            mode=mode,
            workers=workers,
            ordered=ordered,
            progress=progress,
            strict=strict,
            client=client,
            executor=executor,
            chunksize=chunksize,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            **opero_options,
        )

    return decorate
