"""Streaming maps: ``f.imap(items)`` and ``f.aimap(items)``.

One :class:`_Driver` per stream pulls the items in *chunks*, sends each chunk
as a job to a *backend* (the mode's pool), and hands the results back in input
order or in completion order. It never holds more than ``max_jobs`` chunks
that were pulled and not yet yielded (``2 * workers``; ``workers`` single
items in ``"async"`` mode), each of at most ``chunksize`` items, so an endless
generator streams in flat memory.

The first chunk of a function's first stream is one item (later streams of
the same function start at the size the previous one reached); after each
job the size becomes what would
take about :data:`TARGET_JOB` seconds at the time per item that job showed
(sent to received), between 1 and :data:`MAX_CHUNK` (``chunksize=`` fixes
the size): the first result of slow items comes after one item, and trivial
items travel in big jobs after two or three.

:func:`imap` returns an ``itertools.chain`` over the chunks' result lists (a
subclass with ``close()``), so the consumer takes each result at C speed; the
driver's generator runs once per chunk.

Backends call ``deliver(job_id, values, errors)`` from any thread when a job
finishes, exactly once per job (a job that fails as a whole fails each of its
items). The front ends turn that into a queue: a ``queue.SimpleQueue`` for the
iterator, the running loop's ``asyncio.Queue`` for the async iterator. Closing
the stream (the consumer stopped) cancels every job not started; the workers
finish the job they run, whose results are dropped.

Cache: in ``"thread"`` and ``"async"`` modes each item goes through the
``@opero`` function's cache (single flight included); in the pool modes the
consumer's thread looks a chunk up before sending its misses, and stores the
results of a job when it arrives, while the workers run the next jobs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from opero._map import pools as _pools
from opero._map import process_pool as _process_pool
from opero._map.progress import make_progress, telling
from opero.errors import MapError, OperoError, OpmapFailureWarning, WorkerStartError

if TYPE_CHECKING:
    from opero._map.decorator import MappedFunction

__all__ = [
    "MAX_CHUNK",
    "RESTART_JOB",
    "TARGET_JOB",
    "Stream",
    "aimap",
    "failure_message",
    "imap",
    "short",
]

_log = logging.getLogger("opero")

MAX_CHUNK = 4096
"""The largest automatic chunk (items per job) of a stream."""
TARGET_JOB = 0.01
"""Seconds an automatic chunk aims to take (sent to received)."""
RESTART_JOB = 0.25
"""With ``max_tasks_per_child``, a job shorter than this doubles the next chunk."""

Deliver = Callable[[int, list[Any], "dict[int, BaseException] | None"], None]


def _all_failed(n: int, exc: BaseException) -> tuple[list[Any], dict[int, BaseException]]:
    """Return the outcome of a job of ``n`` items that failed as a whole with ``exc``."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit raised by an item
        error = OperoError(f"opmap: the job running this item raised {exc!r}")
        error.__cause__ = exc
        exc = error
    return [None] * n, dict.fromkeys(range(n), exc)


def short(exc: BaseException) -> str:
    """Return ``Type: message`` of ``exc``, the message cut to one short line."""
    try:
        text = str(exc)
    except Exception:  # a hostile __str__ must not hide the failure report
        text = "<str() failed>"
    text = " ".join(text.split())
    if len(text) > 120:
        text = text[:117] + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def failure_message(label: str, count: int, total: int | None, first: int, exc: Any) -> str:
    """Return ``opmap f: 2 of 10 items failed; the first at index 3: ValueError: bad``."""
    of = f"{count} of {total} items" if total is not None else f"{count} items"
    return f"opmap {label}: {of} failed; the first at index {first}: {short(exc)}"


def _pull(source: Iterator[Any], size: int, chunk: list[Any]) -> None:
    """Extend ``chunk`` with up to ``size`` items of ``source``, for about :data:`TARGET_JOB` s.

    The items come in slices of 1, 2, 4, ... (each at C speed); once pulling
    took :data:`TARGET_JOB`, the chunk goes as it is: a slow source (items
    arriving over time) streams at its own pace instead of filling a chunk
    sized for fast items first. ``extend`` keeps the items pulled before an
    error of the source.
    """
    start = time.monotonic()
    step = 1
    while True:
        want = min(step, size - len(chunk))
        before = len(chunk)
        chunk.extend(itertools.islice(source, want))
        if len(chunk) - before < want or len(chunk) >= size:
            return  # the source is exhausted (the next pull says so), or the chunk is full
        if time.monotonic() - start >= TARGET_JOB:
            return
        step *= 2


# --------------------------------------------------------------------------- backends


class _Backend:
    """Runs jobs; reports each one through ``deliver``; :meth:`cancel` drops the rest."""

    def help(self) -> bool:
        """Run a queued job in the consumer's thread, when the backend allows; return whether."""
        return False

    def flush(self) -> None:
        """Send the jobs started since the last flush (backends that batch them)."""

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        """Start a job over ``items`` (their input ``indices``, for messages)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Drop the jobs not started; let the running ones finish (results ignored)."""
        raise NotImplementedError


class _ThreadBackend(_Backend):
    """Jobs on the shared thread pool, pulled from a queue; the consumer may run one too.

    Like the list call, the consuming thread is one of the ``workers``: rather
    than wait for a result it runs the next job itself (:meth:`help`), so at
    most ``workers - 1`` pool threads help (``workers`` for ``aimap``, whose
    consumer is an event loop that must not block). A job runs at C speed
    over its items (see :func:`~opero._map.pools.map_items`).
    """

    def __init__(
        self, fn: Callable[[Any], Any], workers: int, deliver: Deliver, consumer_helps: bool
    ) -> None:
        self.fn = fn
        self.workers = workers
        self.max_helpers = workers - 1 if consumer_helps else workers
        self.deliver = deliver
        self.pending: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self.helpers = 0
        self.running: dict[int, tuple[Any, int]] = {}
        self.stopped = False
        self.lock = threading.Lock()

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        with self.lock:
            self.pending.append((job_id, items))
            if self.helpers >= self.max_helpers:
                return
            self.helpers += 1
        try:
            _pools.thread_pool(self.workers).submit(self._loop)
        except BaseException:
            with self.lock:
                self.helpers -= 1
            raise

    def _next(self) -> tuple[int, list[Any]] | None:
        with self.lock:
            if self.stopped or not self.pending:
                return None
            return self.pending.popleft()

    def _loop(self) -> None:
        """Run queued jobs in a pool thread until none is left."""
        while True:
            with self.lock:
                if self.stopped or not self.pending:
                    self.helpers -= 1
                    return
                job_id, items = self.pending.popleft()
            self._run(job_id, items)

    def help(self) -> bool:
        """Run the next queued job in the consumer's thread; return whether there was one."""
        job = self._next()
        if job is None:
            return False
        self._run(*job, inline=True)
        return True

    def _run(self, job_id: int, items: list[Any], inline: bool = False) -> None:
        source = iter(items)
        with self.lock:
            if self.stopped:
                return
            self.running[job_id] = (source, len(items))
        try:
            values, errors = _pools.map_items(self.fn, source)
        except Exception as exc:  # pragma: no cover - map_items keeps an item's Exception
            values, errors = _all_failed(len(items), exc)
        except BaseException as exc:  # KeyboardInterrupt or SystemExit raised by an item
            error = getattr(exc, "error", None)
            if isinstance(error, WorkerStartError):
                # This thread's initializer failed (the decorator's _InitFailed): the
                # job's items fail with it; the thread runs the initializer again next time.
                values, errors = _all_failed(len(items), error)
            elif inline:
                raise  # in the consumer's thread: its Ctrl-C stops the stream
            else:
                values, errors = _all_failed(len(items), exc)
        finally:
            with self.lock:
                self.running.pop(job_id, None)
        if not self.stopped:
            self.deliver(job_id, values, errors)

    def cancel(self) -> None:
        with self.lock:
            self.stopped = True
            self.pending.clear()
            running = list(self.running.values())
        # A job runs over a list iterator at C speed (see map_items): moving the
        # iterator to its end stops it after the item in progress.
        for source, n in running:
            source.__setstate__(n)


class _ExecutorBackend(_Backend):
    """Jobs on a user's ``concurrent.futures.Executor`` (the target pickled per job)."""

    def __init__(self, executor: cf.Executor, target: Any, deliver: Deliver) -> None:
        self.executor = executor
        self.target = target
        self.deliver = deliver
        self.futures: dict[int, cf.Future[Any]] = {}
        self.stopped = False

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        future = self.executor.submit(_pools.run_chunk, self.target, items)
        self.futures[job_id] = future
        n = len(items)

        def finished(future: cf.Future[Any]) -> None:
            self.futures.pop(job_id, None)
            if self.stopped or future.cancelled():
                return
            try:
                values, errors = future.result()
            except BaseException as exc:  # a broken executor, a job that did not pickle
                values, errors = _all_failed(n, exc)
            self.deliver(job_id, values, errors)

        future.add_done_callback(finished)

    def cancel(self) -> None:
        self.stopped = True
        for future in list(self.futures.values()):
            future.cancel()


class _Finished(threading.Event):
    """A run's ``finished`` event that also tells the stream (a run may end without ``done``)."""

    def __init__(self, on_set: Callable[[], None]) -> None:
        super().__init__()
        self.on_set = on_set

    def set(self) -> None:
        super().set()
        self.on_set()


class _ProcessBackend(_Backend):
    """Jobs on opero's process pool; the jobs started together go as one pool run.

    The first fill, and a refill after several results, send their jobs in
    one run, so the pool hands a worker its next job while it runs one (it
    prefetches within a run only); the pool feeds several runs in turn.
    """

    def __init__(
        self,
        pool: Any,
        target: Any,
        deliver: Deliver,
        retried: Callable[[int], object] | None = None,
    ) -> None:
        self.pool = pool
        self.retried = retried
        self.target_blob = _pools.dumps_target(target)
        self.deliver = deliver
        self.staged: list[tuple[int, list[Any], Sequence[int]]] = []
        self.runs: dict[int, Any] = {}
        self.keys = itertools.count()
        self.stopped = False
        self.lock = threading.Lock()

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        self.staged.append((job_id, items, indices))

    def flush(self) -> None:
        staged, self.staged = self.staged, []
        if not staged:
            return
        ids = [job_id for job_id, _, _ in staged]
        jobs = [items for _, items, _ in staged]
        key = next(self.keys)
        delivered: set[int] = set()

        def once(j: int, values: list[Any], errors: dict[int, BaseException] | None) -> None:
            with self.lock:
                if j in delivered:
                    return
                delivered.add(j)
                if len(delivered) == len(ids):
                    self.runs.pop(key, None)
                if self.stopped:
                    return
            self.deliver(ids[j], values, errors)

        run = _process_pool._Run(
            self.target_blob, jobs, once, [ix for _, _, ix in staged], self.retried
        )

        def ended() -> None:  # a run that failed (a worker cannot start) skips its done calls
            if run.failure is not None:  # the pool cannot run anything: the stream raises it
                for j in range(len(jobs)):
                    if j not in delivered:
                        once(j, None, run.failure)  # type: ignore[arg-type]
                        return
            for j, items in enumerate(jobs):
                if j not in delivered:
                    once(j, *_all_failed(len(items), cf.CancelledError("opmap: job cancelled")))

        run.finished = _Finished(ended)
        with self.lock:
            self.runs[key] = run
        self.pool.submit(run)

    def cancel(self) -> None:
        with self.lock:
            self.stopped = True
            runs = list(self.runs.values())
            self.runs.clear()
        for run in runs:
            self.pool.cancel(run, kill=False)


class _DaskBackend(_Backend):
    """Jobs as Dask tasks; each result arrives through the future's done callback."""

    def __init__(self, client: Any, target: Any, deliver: Deliver) -> None:
        self.client = client
        self.target = target
        self.deliver = deliver
        self.futures: dict[int, Any] = {}
        self.stopped = False

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        future = self.client.submit(_pools.run_chunk, self.target, items, pure=False)
        self.futures[job_id] = future
        n = len(items)

        def finished(future: Any) -> None:
            self.futures.pop(job_id, None)
            if self.stopped:
                return
            try:
                values, errors = future.result()
            except BaseException as exc:  # a killed worker, a task that did not run
                values, errors = _all_failed(n, exc)
            self.deliver(job_id, values, errors)

        future.add_done_callback(finished)

    def cancel(self) -> None:
        self.stopped = True
        futures = list(self.futures.values())
        self.futures.clear()
        if futures:
            try:
                self.client.cancel(futures)
            except Exception:  # the client is closing: its tasks go with it
                _log.debug("opmap: could not cancel a stream's Dask tasks", exc_info=True)


class _AioProcessBackend(_Backend):
    """Jobs on the aiomultiprocess pool, each a one-job map on the background loop."""

    def __init__(
        self, workers: int, target: Any, deliver: Deliver, init_blob: bytes | None = None
    ) -> None:
        self.workers = workers
        self.target = target
        self.target_blob = _pools.dumps_target(target)  # once per stream; errors: the caller's
        self.deliver = deliver
        self.init_blob = init_blob
        self.futures: dict[int, cf.Future[Any]] = {}
        self.stopped = False

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        n = len(items)
        delivered = [False]

        def done(_j: int, values: list[Any], errors: dict[int, BaseException] | None) -> None:
            delivered[0] = True
            if not self.stopped:
                self.deliver(job_id, values, errors)

        coro = _pools.run_aio_process_jobs(
            self.workers,
            self.target,
            [items],
            done,
            init_blob=self.init_blob,
            target_blob=self.target_blob,
        )
        future = _pools.background_loop().submit(coro)
        self.futures[job_id] = future

        def finished(future: cf.Future[Any]) -> None:
            self.futures.pop(job_id, None)
            if delivered[0] or self.stopped or future.cancelled():
                return
            exc = future.exception()
            if isinstance(exc, WorkerStartError):  # no worker can start: the stream raises it
                self.deliver(job_id, None, exc)  # type: ignore[arg-type]
            elif exc is not None:
                self.deliver(job_id, *_all_failed(n, exc))

        future.add_done_callback(finished)

    def cancel(self) -> None:
        self.stopped = True
        for future in list(self.futures.values()):
            future.cancel()


class _AsyncBackend(_Backend):
    """Items as tasks on an event loop: the caller's (``aimap``) or opero's background one."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        is_coroutine: bool,
        deliver: Deliver,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.fn = fn
        self.is_coroutine = is_coroutine
        self.deliver = deliver
        self.loop = loop  # None: the background loop (a sync imap)
        self.tasks: dict[int, Any] = {}
        self.stopped = False

    async def _run(self, job_id: int, items: list[Any]) -> None:
        values: list[Any] = []
        errors: dict[int, BaseException] | None = None
        for position, item in enumerate(items):
            try:
                if self.is_coroutine:
                    value = await self.fn(item)
                else:
                    value = await asyncio.to_thread(self.fn, item)
            except Exception as exc:
                errors = errors or {}
                errors[position] = exc
                value = None
            values.append(value)
        self.tasks.pop(job_id, None)
        if not self.stopped:
            self.deliver(job_id, values, errors)

    def start(self, job_id: int, items: list[Any], indices: Sequence[int]) -> None:
        if self.loop is not None:
            self.tasks[job_id] = self.loop.create_task(self._run(job_id, items))
            return
        n = len(items)
        future = _pools.background_loop().submit(self._run(job_id, items))
        self.tasks[job_id] = future

        def finished(future: cf.Future[Any]) -> None:
            if self.stopped or future.cancelled():
                return
            exc = future.exception()
            if exc is not None:  # KeyboardInterrupt or SystemExit of an item, contained
                self.deliver(job_id, *_all_failed(n, exc))

        future.add_done_callback(finished)

    def cancel(self) -> None:
        self.stopped = True
        for task in list(self.tasks.values()):
            task.cancel()


# --------------------------------------------------------------------------- driver


class _Record:
    """A chunk pulled from the source: its items, its results so far, and its job."""

    __slots__ = ("base", "done", "errors", "items", "job", "misses", "sent", "values")

    def __init__(self, job: int, base: int, items: list[Any]) -> None:
        self.job = job
        self.base = base  # the input index of items[0]
        self.items: list[Any] | None = items
        self.values: list[Any] = []
        self.errors: dict[int, BaseException] | None = None
        self.misses: list[int] | None = None  # positions sent to the workers (None: all)
        self.done = False
        self.sent = 0.0


class _Driver:
    """The state of one stream: chunks in flight, results to hand back, failures seen."""

    def __init__(
        self,
        mapped: MappedFunction[Any, Any],
        ordered: bool,
        kw: dict[str, Any] | None,
        deliver: Deliver,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.mapped = mapped
        self.ordered = ordered
        self.kw = kw
        self.deliver = deliver
        self.loop = loop
        mode = mapped.mode
        self.mode = mode
        self.workers = mapped.workers
        self.async_items = mode == "async"
        self.fixed = mapped._chunksize is not None or self.async_items
        # A stream starts at the size the last stream of this function reached.
        self.size = 1 if self.async_items else (mapped._chunksize or mapped._stream_chunk)
        self.max_jobs = self.workers if self.async_items else 2 * self.workers
        self.restarts = mode == "process" and mapped._max_tasks is not None
        self.parent_cache = bool(mapped._has_cache) and mode not in ("thread", "async")
        self.store = mapped._store_many(kw) if self.parent_cache else None
        self.records: dict[int, _Record] = {}
        self.ready: collections.deque[_Record] = collections.deque()
        self.jobs = itertools.count()
        self.next_yield = 0
        self.pulled = 0
        self.exhausted = False
        self.failed = 0
        self.first_index = -1
        self.first_error: BaseException | None = None
        self.strict_errors: list[tuple[int, Exception]] = []
        self.backend: _Backend | None = None
        self.bar = make_progress(mapped._progress, None, mapped.__name__)
        # Thread and async items look their cache up themselves: counted from the store.
        self.hits0 = mapped._cache_hits() if self.bar.shown and not self.parent_cache else 0
        self.closed = False
        self.source_error: Exception | None = None  # raised after the pulled items' results

    # ----------------------------------------------------------------- pulling

    def source_failed(self, exc: Exception, chunk: list[Any]) -> None:
        """Record that the items raised ``exc``: run the pulled ones, then raise it."""
        self.source_error = exc
        self.exhausted = True
        if chunk:
            self.add(chunk)

    def want_more(self) -> bool:
        """Return whether another chunk may be pulled (fewer than ``max_jobs`` in flight)."""
        return not self.exhausted and len(self.records) < self.max_jobs

    def add(self, chunk: list[Any]) -> None:
        """Take a chunk: serve its cached items, send the rest as one job."""
        job = next(self.jobs)
        record = _Record(job, self.pulled, chunk)
        self.pulled += len(chunk)
        self.records[job] = record
        n = len(chunk)
        if self.parent_cache:
            pieces, missing = self.mapped._lookup(chunk, self.bar, self.kw, record.base)
            if pieces:
                record.values = [None] * n
                for indices, values, errors in pieces:
                    for position, value in zip(indices, values, strict=True):
                        record.values[position] = value
                    if errors:
                        record.errors = record.errors or {}
                        for p, exc in errors.items():
                            record.errors[indices[p]] = exc
                if not missing:
                    self._complete(record)
                    return
                record.misses = list(missing)
        base = record.base
        labels: Sequence[int]  # the input indices, for error messages
        if record.misses is None:
            send, labels = chunk, range(base, base + n)
        else:
            send = [chunk[p] for p in record.misses]
            labels = [base + p for p in record.misses]
        record.sent = time.monotonic()
        self._backend().start(job, send, labels)

    def _backend(self) -> _Backend:
        """Return the mode's backend (built at the first job)."""
        if self.backend is not None:
            return self.backend
        mapped = self.mapped
        backend: _Backend
        if self.mode == "thread":
            fn = mapped._item_fn(self.kw, thread=True)
            if self.bar.shown:  # count the retries (branch once, not per item)
                fn = telling(fn, self.bar, False)
            backend = _ThreadBackend(fn, self.workers, self.deliver, self.loop is None)
        elif self.mode == "async":
            fn = mapped._item_fn(self.kw)
            if self.bar.shown:
                fn = telling(fn, self.bar, mapped._is_async)
            backend = _AsyncBackend(fn, mapped._is_async, self.deliver, self.loop)
        else:
            target = mapped._worker_target(self.kw)
            if mapped._executor is not None:
                backend = _ExecutorBackend(mapped._executor, target, self.deliver)
            elif self.mode == "process":
                pool = _process_pool.process_pool(
                    self.workers, None, mapped._worker_init_blob(), mapped._max_tasks
                )
                retried = self.bar.retry if self.bar.shown else None
                backend = _ProcessBackend(pool, target, self.deliver, retried)
            elif self.mode == "dask":
                client = mapped._dask_client()
                if mapped._init_blob is not None:
                    mapped._register_dask_initializer(client)
                backend = _DaskBackend(client, target, self.deliver)
            else:
                backend = _AioProcessBackend(
                    self.workers, target, self.deliver, mapped._worker_init_blob()
                )
        self.backend = backend
        return backend

    # ----------------------------------------------------------------- results

    def on_result(
        self, job: int, values: list[Any], errors: dict[int, BaseException] | None
    ) -> None:
        """Record a finished job: merge it with the chunk's hits, fill the cache, adapt size."""
        if values is None:  # the pool failed as a whole (WorkerStartError): so does the stream
            assert isinstance(errors, BaseException)
            raise errors
        record = self.records.get(job)
        if record is None or record.done:  # pragma: no cover - a job is delivered once
            return
        if not self.fixed and values:
            elapsed = max(time.monotonic() - record.sent, 1e-9)
            size = int(TARGET_JOB * len(values) / elapsed)
            if self.restarts and elapsed < RESTART_JOB:
                # Each job may start a worker (max_tasks_per_child): its start time is
                # not the items' cost. Short jobs grow, or every item pays a start.
                size = max(size, 2 * self.size)
            self.size = max(1, min(MAX_CHUNK, size))
            self.mapped._stream_chunk = self.size
        self.bar.update(len(values))
        if errors:
            self.bar.fail(len(errors))
        items = record.items
        assert items is not None
        if self.store is not None:
            self._store(record, items, values, errors)
        if record.misses is None:
            record.values = values
            record.errors = errors
        else:
            for k, position in enumerate(record.misses):
                record.values[position] = values[k]
            if errors:
                record.errors = record.errors or {}
                for k, exc in errors.items():
                    record.errors[record.misses[k]] = exc
        self._complete(record)

    def _store(
        self,
        record: _Record,
        items: list[Any],
        values: list[Any],
        errors: dict[int, BaseException] | None,
    ) -> None:
        """Store a job's successful results (a store failure never fails the item)."""
        assert self.store is not None
        positions = range(len(items)) if record.misses is None else record.misses
        keys = [items[p] for k, p in enumerate(positions) if not errors or k not in errors]
        kept = [v for k, v in enumerate(values) if not errors or k not in errors]
        try:
            self.store(keys, kept)
        except Exception:
            _log.warning(
                "opmap %s: could not store a streamed job's results in the cache",
                self.mapped._label,
                exc_info=True,
            )

    def _complete(self, record: _Record) -> None:
        record.done = True
        record.items = None  # the results no longer need them
        if not self.ordered:
            self.ready.append(record)

    def take(self) -> Iterator[list[Any]]:
        """Yield the result lists that may be handed back now (in order, or as completed)."""
        while True:
            if self.ordered:
                record = self.records.get(self.next_yield)
                if record is None or not record.done:
                    return
                self.next_yield += 1
            else:
                if not self.ready:
                    return
                record = self.ready.popleft()
            del self.records[record.job]
            errors = record.errors
            values = record.values
            if errors:
                for position in sorted(errors):
                    exc = errors[position]
                    values[position] = exc
                    self._count(record.base + position, exc)
            yield values

    def _count(self, index: int, exc: BaseException) -> None:
        self.failed += 1
        if self.first_index < 0 or index < self.first_index:
            self.first_index, self.first_error = index, exc
        if self.mapped._strict and isinstance(exc, Exception):
            self.strict_errors.append((index, exc))

    def flush(self) -> None:
        """Send the jobs the backend holds back to batch them (process mode)."""
        if self.backend is not None:
            self.backend.flush()

    def help(self) -> bool:
        """Run a queued job in the consumer's thread (thread mode); return whether it did."""
        return self.backend is not None and self.backend.help()

    def finished(self) -> bool:
        """Return whether every item was pulled and handed back."""
        return self.exhausted and not self.records

    def report(self) -> None:
        """At the end of the stream: warn about the failures, or raise them when strict.

        When the items themselves raised, that error is raised instead (every
        result before it was yielded, failures in their place).
        """
        if self.source_error is not None:
            error, self.source_error = self.source_error, None
            raise error
        if not self.failed:
            return
        message = failure_message(
            self.mapped._label, self.failed, self.pulled, self.first_index, self.first_error
        )
        if self.mapped._strict:
            self.strict_errors.sort(key=lambda pair: pair[0])
            raise MapError(
                message,
                [exc for _, exc in self.strict_errors],
                [],
                [i for i, _ in self.strict_errors],
            )
        warnings.warn(
            f"{message}; every exception was yielded in its item's place; strict=True raises "
            "instead",
            OpmapFailureWarning,
            stacklevel=4,
        )

    def close(self) -> None:
        """Stop the stream: drop the jobs not started, close the bar."""
        self.closed = True
        if self.backend is not None and not self.finished():
            self.backend.cancel()
        if self.bar.shown and not self.parent_cache:
            self.bar.cache(self.mapped._cache_hits() - self.hits0)
        self.bar.close()


# --------------------------------------------------------------------------- front ends


class Stream(itertools.chain):  # type: ignore[type-arg]
    """The iterator ``f.imap(items)`` returns: results at C speed, and ``close()``.

    Closing it (or dropping the last reference to it) stops the map.
    """

    _chunks: Any
    _results: Any

    def close(self) -> None:
        """Stop the map: no more items are pulled, jobs not started are dropped.

        From another thread while the consumer waits in ``next()``: that
        ``next()`` ends the iteration (``StopIteration``) and the map stops.
        """
        try:
            self._chunks.close()
        except ValueError:  # "generator already executing": a next() runs in another thread
            self._results.put(None)  # wakes it: the stream stops there


def imap(
    mapped: MappedFunction[Any, Any],
    source: Iterator[Any],
    ordered: bool,
    kw: dict[str, Any] | None,
) -> Iterator[Any]:
    """Return the iterator of ``f.imap(items)`` (nothing runs before the first ``next``)."""
    results: queue.SimpleQueue[tuple[int, list[Any], Any] | None] = queue.SimpleQueue()
    chunks = _imap(mapped, source, ordered, kw, results)
    stream: Any = Stream.from_iterable(chunks)  # a Stream: from_iterable keeps the subclass
    stream._chunks = chunks
    stream._results = results
    result: Iterator[Any] = stream
    return result


def _imap(
    mapped: MappedFunction[Any, Any],
    source: Iterator[Any],
    ordered: bool,
    kw: dict[str, Any] | None,
    results: queue.SimpleQueue[tuple[int, list[Any], Any] | None],
) -> Iterator[list[Any]]:
    """Run the stream; a ``None`` in ``results`` is a close() from another thread."""

    def deliver(job: int, values: list[Any], errors: dict[int, BaseException] | None) -> None:
        results.put((job, values, errors))

    driver = _Driver(mapped, ordered, kw, deliver, None)
    try:
        while True:
            while driver.want_more():
                chunk: list[Any] = []
                try:  # extend keeps the items pulled before an error
                    _pull(source, driver.size, chunk)
                except Exception as exc:
                    driver.source_failed(exc, chunk)
                    break
                if not chunk:
                    driver.exhausted = True
                    break
                driver.add(chunk)
            driver.flush()
            yield from driver.take()
            if driver.finished():
                break
            if driver.want_more():  # take() freed room: pull before waiting
                continue
            if not driver.help():  # nothing to run here: wait for a worker
                message = results.get()
                if message is None:
                    return  # closed from another thread
                driver.on_result(*message)
            while True:
                try:
                    message = results.get_nowait()
                except queue.Empty:
                    break
                if message is None:
                    return
                driver.on_result(*message)
        driver.report()
    finally:
        driver.close()


def aimap(
    mapped: MappedFunction[Any, Any],
    source: Any,
    ordered: bool,
    kw: dict[str, Any] | None,
) -> AsyncIterator[Any]:
    """Return the async iterator of ``f.aimap(items)``."""
    return _aimap(mapped, source, ordered, kw)


async def _aimap(
    mapped: MappedFunction[Any, Any],
    source: Any,
    ordered: bool,
    kw: dict[str, Any] | None,
) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    results: asyncio.Queue[tuple[int, list[Any], Any]] = asyncio.Queue()
    closed = [False]

    def deliver(job: int, values: list[Any], errors: dict[int, BaseException] | None) -> None:
        if closed[0]:
            return
        try:
            loop.call_soon_threadsafe(results.put_nowait, (job, values, errors))
        except RuntimeError:  # the loop closed under a late job: nobody waits for it
            _log.debug("opmap: a streamed result arrived after its loop closed", exc_info=True)

    async_source = hasattr(source, "__aiter__")
    aiter_ = source.__aiter__() if async_source else None
    driver = _Driver(mapped, ordered, kw, deliver, loop)
    try:
        while True:
            while driver.want_more():
                chunk: list[Any]
                chunk = []
                try:  # an error of the items comes after the results of those pulled
                    if aiter_ is not None:
                        start = time.monotonic()
                        while len(chunk) < driver.size:
                            try:
                                chunk.append(await aiter_.__anext__())
                            except StopAsyncIteration:
                                break
                            if time.monotonic() - start >= TARGET_JOB:
                                break  # a slow source: send what came (see _pull)
                    else:
                        _pull(source, driver.size, chunk)
                except Exception as exc:
                    driver.source_failed(exc, chunk)
                    break
                if not chunk:
                    driver.exhausted = True
                    break
                driver.add(chunk)
            driver.flush()
            for values in driver.take():
                for value in values:
                    yield value
            if driver.finished():
                break
            if driver.want_more():  # take() freed room: pull before waiting
                continue
            driver.on_result(*(await results.get()))
            while True:
                try:
                    message = results.get_nowait()
                except asyncio.QueueEmpty:
                    break
                driver.on_result(*message)
        driver.report()
    finally:
        closed[0] = True
        driver.close()
