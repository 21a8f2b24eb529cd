"""The executors behind ``@opmap``: reused pools and the loops that feed them.

Every engine here takes *jobs* (lists of items) or items, runs the per-item
function on them, and reports *pieces*: ``(indices, values, errors)`` where
``errors`` maps a position in ``values`` to the exception of that item (or is
``None``). ``@opmap`` turns the pieces into the result list, in input order or
in completion order.

Pools are created on first use, keyed by their worker count, reused by every
later map, and shut down at exit:

* threads: one ``ThreadPoolExecutor`` per worker count. A map submits at most
  ``workers - 1`` loops that pull batches of items from a shared counter; the
  calling thread runs one loop too, so a map always makes progress (even when
  called from inside another map on the same pool) and a small input never
  waits for a thread to wake up.
* processes: one ``ProcessPoolExecutor`` per worker count, on the default
  ``multiprocessing`` start method. When a worker dies (``os._exit``, a
  signal, a segfault) every pending future fails with ``BrokenProcessPool``;
  the pool is rebuilt, the jobs that no worker had started are sent again, and
  the jobs that were running (read from a shared array each worker writes the
  id of its current job to) are re-run one item at a time, so exactly the items
  that kill a worker get a :class:`WorkerDiedError` and the rest of the map
  finishes. Items of those jobs may therefore run more than once.
* asyncio on processes: one ``aiomultiprocess.Pool`` per worker count, living
  on a background event loop thread so it outlives the caller's loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import importlib
import itertools
import multiprocessing
import pickle
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol, TypeVar

from opero.errors import OperoError

__all__ = [
    "Piece",
    "ProcessPool",
    "Target",
    "WorkerDiedError",
    "aio_process_pool",
    "background_loop",
    "process_pool",
    "run_aio_process_jobs",
    "run_async_items",
    "run_dask_jobs",
    "run_executor_jobs",
    "run_process_jobs",
    "run_thread_items",
    "thread_pool",
]

T = TypeVar("T")

Piece = tuple[Sequence[int], list[Any], "dict[int, BaseException] | None"]
"""``(indices, values, errors)``: results of some items, in their order."""


class WorkerDiedError(OperoError):
    """A worker process died (``os._exit``, a signal, a segfault) while running this item.

    The pool was rebuilt and the other items of the map ran; this item's
    result is lost. The ``BrokenProcessPool`` error is its ``__cause__``.
    """


class Target(Protocol):
    """What a worker runs: it resolves, once per process, to the per-item callable."""

    def resolve(self) -> Callable[[Any], Any]:
        """Return the per-item function (``call_uncached`` or ``acall_uncached``)."""


class _Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...


# --------------------------------------------------------------------------- worker side

_SLOTS: Any = None
"""In a pool worker: the shared array of current job ids (``[0]`` allocates slots)."""
_SLOT = 0
"""In a pool worker: this process's index in ``_SLOTS`` (0 = none)."""


def _init_process_worker(slots: Any) -> None:
    """Pool initializer: claim a slot in the shared array of running job ids."""
    global _SLOTS, _SLOT
    with slots.get_lock():
        slots[0] += 1
        index = int(slots[0])
    if index < len(slots):
        _SLOTS, _SLOT = slots, index


def _portable(exc: BaseException) -> BaseException:
    """Return ``exc``, or an :class:`OperoError` describing it when it does not pickle."""
    try:
        pickle.dumps(exc)
    except Exception as pickling_error:  # the error must still reach the parent
        return OperoError(
            f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} "
            f"(the original exception could not be pickled: {pickling_error})"
        )
    return exc


def run_chunk(
    target: Target, items: Sequence[Any], job_id: int = 0
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Run the per-item function on ``items`` in a worker; never raise for an item.

    Args:
        target: Resolves to the per-item function.
        items: The job's items.
        job_id: Written to this worker's slot while the job runs (crash attribution).

    Returns:
        The values (``None`` where an item failed) and the failures by position.

    """
    slots = _SLOTS
    if slots is not None:
        slots.get_obj()[_SLOT] = job_id
    fn = target.resolve()
    values: list[Any] = []
    errors: dict[int, BaseException] | None = None
    append = values.append
    for position, item in enumerate(items):
        try:
            append(fn(item))
        except Exception as exc:
            append(None)
            if errors is None:
                errors = {}
            errors[position] = exc
    if errors is not None and (_SLOTS is not None or multiprocessing.parent_process()):
        errors = {position: _portable(exc) for position, exc in errors.items()}
    if slots is not None:
        slots.get_obj()[_SLOT] = 0
    return values, errors


async def arun_chunk(
    target: Target, items: Sequence[Any]
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Run the ``async`` per-item function on every item of a job concurrently."""
    fn = target.resolve()

    async def one(item: Any) -> tuple[bool, Any]:
        try:
            return True, await fn(item)
        except Exception as exc:
            return False, _portable(exc)

    outcomes = await asyncio.gather(*(one(item) for item in items))
    values = [value if ok else None for ok, value in outcomes]
    errors = {i: value for i, (ok, value) in enumerate(outcomes) if not ok}
    return values, errors or None


# --------------------------------------------------------------------------- threads

_THREAD_POOLS: dict[int, cf.ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def thread_pool(workers: int) -> cf.ThreadPoolExecutor:
    """Return the shared thread pool with ``workers`` threads, creating it on first use."""
    pool = _THREAD_POOLS.get(workers)
    if pool is None:
        with _LOCK:
            pool = _THREAD_POOLS.get(workers)
            if pool is None:
                pool = cf.ThreadPoolExecutor(workers, thread_name_prefix=f"opero-opmap-{workers}")
                _THREAD_POOLS[workers] = pool
    return pool


def run_thread_items(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int,
    batch: int,
    bar: _Progress | None,
) -> list[Piece]:
    """Run ``fn`` on every item, ``workers`` at a time, batches pulled from a counter.

    The calling thread is one of the ``workers``; at most ``workers - 1`` pool
    threads help, and a helper that was never started is cancelled.

    Returns:
        The pieces in completion order (one per batch).

    """
    n = len(items)
    n_batches = -(-n // batch)
    counter = itertools.count()
    pieces: list[Piece] = []

    def loop() -> None:
        add = pieces.append
        for b in counter:
            if b >= n_batches:
                return
            lo = b * batch
            hi = min(lo + batch, n)
            values: list[Any] = []
            errors: dict[int, BaseException] | None = None
            append = values.append
            for i in range(lo, hi):
                try:
                    append(fn(items[i]))
                except Exception as exc:
                    append(None)
                    if errors is None:
                        errors = {}
                    errors[i - lo] = exc
            add((range(lo, hi), values, errors))
            if bar is not None:
                bar.update(hi - lo)

    helpers = min(workers - 1, n_batches - 1)
    futures = [thread_pool(workers).submit(loop) for _ in range(helpers)] if helpers > 0 else []
    try:
        loop()
    finally:
        for future in futures:
            if not future.cancel():
                future.result()
    return pieces


# --------------------------------------------------------------------------- asyncio


async def run_async_items(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int,
    is_coroutine: bool,
    bar: _Progress | None,
) -> list[Piece]:
    """Run ``fn`` on every item on the running loop, at most ``workers`` at once.

    ``workers`` tasks pull items from one shared iterator. A plain ``def``
    function runs in ``asyncio.to_thread``, so it never blocks the loop.

    Returns:
        The pieces in completion order (one per item).

    """
    source = iter(enumerate(items))
    pieces: list[Piece] = []

    async def worker() -> None:
        for i, item in source:
            try:
                if is_coroutine:
                    value = await fn(item)
                else:
                    value = await asyncio.to_thread(fn, item)
            except Exception as exc:
                pieces.append(((i,), [None], {0: exc}))
            else:
                pieces.append(((i,), [value], None))
            if bar is not None:
                bar.update(1)

    await asyncio.gather(*(worker() for _ in range(min(workers, len(items)))))
    return pieces


# --------------------------------------------------------------------------- processes


class ProcessPool:
    """A ``ProcessPoolExecutor`` that is rebuilt when a worker dies.

    Args:
        workers: The number of worker processes.

    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._generation = 0
        self._executor: cf.ProcessPoolExecutor | None = None
        self._slots: Any = None

    def get(self) -> tuple[cf.ProcessPoolExecutor, Any, int]:
        """Return the live executor, its slot array and its generation."""
        with self._lock:
            if self._executor is None:
                ctx = multiprocessing.get_context()
                self._slots = ctx.Array("q", self.workers + 1)
                self._executor = cf.ProcessPoolExecutor(
                    self.workers,
                    mp_context=ctx,
                    initializer=_init_process_worker,
                    initargs=(self._slots,),
                )
            return self._executor, self._slots, self._generation

    def rebuild(self, generation: int) -> None:
        """Drop the executor of ``generation`` if it is still the live one."""
        with self._lock:
            if generation == self._generation and self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
                self._generation += 1

    def pids(self) -> set[int]:
        """Return the process ids of the live workers (empty before first use)."""
        with self._lock:
            executor = self._executor
            procs = getattr(executor, "_processes", None) or {}
            return set(procs)

    def shutdown(self) -> None:
        """Stop the workers and wait for them."""
        with self._lock:
            executor, self._executor = self._executor, None
            self._generation += 1
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


_PROCESS_POOLS: dict[int, ProcessPool] = {}
_JOB_IDS = itertools.count(1)


def process_pool(workers: int) -> ProcessPool:
    """Return the shared process pool with ``workers`` processes (started lazily)."""
    with _LOCK:
        pool = _PROCESS_POOLS.get(workers)
        if pool is None:
            pool = _PROCESS_POOLS[workers] = ProcessPool(workers)
        return pool


def _isolate(
    pool: ProcessPool, target: Target, job: Sequence[Any]
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Run the items of a job that was running when a worker died, one at a time.

    With a single item in flight, a crash belongs to that item: it gets a
    :class:`WorkerDiedError` and the pool is rebuilt for the next item.
    """
    values: list[Any] = [None] * len(job)
    errors: dict[int, BaseException] = {}
    for position, item in enumerate(job):
        executor, _slots, generation = pool.get()
        try:
            item_values, item_errors = executor.submit(run_chunk, target, [item], 0).result()
        except BrokenProcessPool as broken:
            pool.rebuild(generation)
            died = WorkerDiedError(
                "a worker process died while running this item (os._exit, a signal or a "
                "crash in native code); the pool was rebuilt and the other items ran"
            )
            died.__cause__ = broken
            errors[position] = died
        except Exception as exc:
            errors[position] = exc
        else:
            values[position] = item_values[0]
            if item_errors:
                errors[position] = item_errors[0]
    return values, errors or None


def run_process_jobs(
    pool: ProcessPool,
    target: Target,
    jobs: Sequence[Sequence[Any]],
    done: Callable[[int, list[Any], dict[int, BaseException] | None], None],
) -> None:
    """Run every job on the process pool; call ``done(job, values, errors)`` as each finishes.

    Survives dying workers (see the module docstring): no job is lost and the
    call always returns.
    """
    job_ids = [next(_JOB_IDS) for _ in jobs]
    remaining = list(range(len(jobs)))
    while remaining:
        executor, slots, generation = pool.get()
        futures: dict[cf.Future[Any], int] = {}
        broken: list[int] = []
        for j in remaining:
            try:
                futures[executor.submit(run_chunk, target, jobs[j], job_ids[j])] = j
            except BrokenProcessPool:
                broken.append(j)
        for future in cf.as_completed(futures):
            j = futures[future]
            try:
                values, errors = future.result()
            except BrokenProcessPool:
                broken.append(j)
                continue
            except Exception as exc:  # the job could not be sent or its result not read back
                values, errors = [None] * len(jobs[j]), dict.fromkeys(range(len(jobs[j])), exc)
            done(j, values, errors)
        if not broken:
            return
        running = set(slots.get_obj()[1:])
        pool.rebuild(generation)
        suspects = [j for j in broken if job_ids[j] in running] or broken
        for j in suspects:
            done(j, *_isolate(pool, target, jobs[j]))
        remaining = [j for j in broken if j not in suspects]


# --------------------------------------------------------------------------- executors, Dask


def run_executor_jobs(
    executor: cf.Executor,
    target: Target,
    jobs: Sequence[Sequence[Any]],
    done: Callable[[int, list[Any], dict[int, BaseException] | None], None],
) -> None:
    """Run every job on a user's executor; a job that fails as a whole fails its items."""
    futures = {executor.submit(run_chunk, target, job): j for j, job in enumerate(jobs)}
    for future in cf.as_completed(futures):
        j = futures[future]
        try:
            values, errors = future.result()
        except Exception as exc:
            values, errors = [None] * len(jobs[j]), dict.fromkeys(range(len(jobs[j])), exc)
        done(j, values, errors)


def run_dask_jobs(
    client: Any,
    target: Target,
    jobs: Sequence[Sequence[Any]],
    done: Callable[[int, list[Any], dict[int, BaseException] | None], None],
    max_in_flight: int,
) -> None:
    """Run every job as one Dask task, at most ``max_in_flight`` at once.

    A task that fails as a whole (a killed worker) fails its items.
    """
    from distributed import as_completed

    pending = iter(range(len(jobs)))
    index: dict[str, int] = {}

    def submit(j: int) -> Any:
        future = client.submit(run_chunk, target, jobs[j], pure=False)
        index[future.key] = j
        return future

    first = [submit(j) for j in itertools.islice(pending, max_in_flight)]
    completed = as_completed(first)  # type: ignore[no-untyped-call]
    for future in completed:
        j = index.pop(future.key)
        try:
            values, errors = future.result()
        except Exception as exc:
            values, errors = [None] * len(jobs[j]), dict.fromkeys(range(len(jobs[j])), exc)
        future.release()
        done(j, values, errors)
        nxt = next(pending, None)
        if nxt is not None:
            completed.add(submit(nxt))  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- aiomultiprocess


class _LoopThread:
    """An event loop running forever in a daemon thread (home of aiomultiprocess pools)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="opero-async-process", daemon=True
        )
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> cf.Future[T]:
        """Schedule ``coro`` on the loop; return a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


_BACKGROUND: _LoopThread | None = None
_AIO_POOLS: dict[int, Any] = {}


def background_loop() -> _LoopThread:
    """Return the background loop thread, starting it on first use."""
    global _BACKGROUND
    with _LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = _LoopThread()
        return _BACKGROUND


def aio_process_pool(workers: int) -> Any:
    """Return the ``aiomultiprocess.Pool`` with ``workers`` processes.

    Must be called on the background loop (the pool binds to the running loop).
    """
    pool = _AIO_POOLS.get(workers)
    if pool is None:
        aiomultiprocess = importlib.import_module("aiomultiprocess")
        pool = _AIO_POOLS[workers] = aiomultiprocess.Pool(processes=workers)
    return pool


async def run_aio_process_jobs(
    workers: int,
    target: Target,
    jobs: Sequence[Sequence[Any]],
    done: Callable[[int, list[Any], dict[int, BaseException] | None], None],
) -> None:
    """Run every job on the aiomultiprocess pool (on the background loop)."""
    pool = aio_process_pool(workers)

    async def one(j: int) -> None:
        try:
            values, errors = await pool.apply(arun_chunk, (target, jobs[j]))
        except Exception as exc:
            values, errors = [None] * len(jobs[j]), dict.fromkeys(range(len(jobs[j])), exc)
        done(j, values, errors)

    await asyncio.gather(*(one(j) for j in range(len(jobs))))


# --------------------------------------------------------------------------- shutdown


async def _close_aio_pools() -> None:
    """Close and join every aiomultiprocess pool."""
    for pool in list(_AIO_POOLS.values()):
        pool.close()
        await pool.join()
    _AIO_POOLS.clear()


def shutdown_all() -> None:
    """Shut down every pool opero started (registered with ``atexit``)."""
    with _LOCK:
        threads = list(_THREAD_POOLS.values())
        processes = list(_PROCESS_POOLS.values())
        background = _BACKGROUND
        _THREAD_POOLS.clear()
        _PROCESS_POOLS.clear()
    for process in processes:
        process.shutdown()
    for thread in threads:
        thread.shutdown(wait=False, cancel_futures=True)
    if background is not None and _AIO_POOLS:
        try:
            background.submit(_close_aio_pools()).result(timeout=10)
        except Exception:  # pragma: no cover - best effort at exit, reported below
            import logging

            logging.getLogger("opero").warning(
                "could not close the aiomultiprocess pools at exit", exc_info=True
            )


atexit.register(shutdown_all)
