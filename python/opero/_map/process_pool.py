"""The process pool behind ``@opmap(mode="process")``: one dispatcher that owns its state.

One :class:`ProcessPool` per worker count (and start method), created on
first use, reused by every later map, shut down at exit. Worker processes run
on the default ``multiprocessing`` start method (fork, spawn or forkserver),
each with its own pipe and one job at a time (two when the second is small),
fed by one dispatcher thread that owns the pool's state:

* the jobs not yet sent wait in their map's queue, so an interrupted or
  cancelled map drops them at once, and the workers running its jobs are
  stopped and replaced;
* the dispatcher knows which job each worker holds, so a worker that dies
  (``os._exit``, a signal, a segfault) is noticed by its process sentinel:
  its job is re-run one item per job, so exactly the item that kills a
  worker gets a :class:`WorkerDiedError` (the other items of that job run
  twice), and a new worker replaces it; there is no table to fill up;
* an item, or a result, that does not pickle fails only its own place;
* a worker that exits before it could take a job fails the map with
  :class:`WorkerStartError` (a script without the ``__main__`` guard under
  spawn) instead of respawning forever;
* a process forked from this one forgets the pools (``os.register_at_fork``)
  and builds its own.

* a pool with an initializer (``initializer=``) runs it in each worker before
  it says it is ready; an initializer that raises sends its error instead,
  and the maps on the pool fail with :class:`WorkerStartError` (its cause);
  pools are keyed by initializer, so no other map runs on such workers;
* with ``max_jobs`` (``max_tasks_per_child=``) a worker is sent at most that
  many jobs, exits after the last one, and is replaced like a dead worker,
  with no job to re-run;
* a failed item's exception travels with the worker's formatted traceback
  (``RemoteTraceback`` as its ``__cause__``, see :func:`opero._map.pools.portable`),
  and each job's reply carries the retries made for its items (progress bars).

A run's ``done`` callback streams pieces as they come (``imap``),
:func:`_worker_main` is the one place a worker starts, and
:meth:`ProcessPool._bury` the one place a worker is replaced.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import multiprocessing.util  # its atexit hook joins children: register ours after it
import os
import pickle
import selectors
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opero._map.pools import CancelScope, Target, dumps_target, portable, run_chunk
from opero._map.progress import WORKER_RETRIES
from opero.errors import OperoError, WorkerDiedError, WorkerStartError

__all__ = [
    "PREFETCH_BYTES",
    "ProcessPool",
    "process_pool",
    "run_process_jobs",
    "shutdown_process_pools",
]

_log = logging.getLogger("opero")

_READY = b"r"
"""What a worker process sends once it is up (before any job)."""

_INIT_FAILED = b"i"
"""What a worker whose initializer raised sends, followed by the pickled error."""


def _worker_main(conn: Any, init_blob: bytes | None = None, max_jobs: int | None = None) -> None:
    """Run, in a worker process, the jobs that arrive on ``conn`` until the parent hangs up.

    SIGINT is ignored: a Ctrl-C on a terminal reaches every process of the
    group, and it is the parent that decides to stop a map (it stops sending
    jobs); a worker only finishes the job it holds.

    ``init_blob`` is the pickled ``(initializer, initargs)`` of the pool: it
    runs once, before the worker says it is ready; when it raises, the worker
    sends that error (with its traceback) instead, and exits. After
    ``max_jobs`` jobs the worker exits on its own (the parent sends it no
    more, and starts a new one).
    """
    with contextlib.suppress(ValueError):  # not the main thread: nothing to ignore
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if init_blob is not None:
        try:
            initializer, initargs = pickle.loads(init_blob)
            initializer(*initargs)
        except BaseException as exc:  # SystemExit too: the parent must learn why
            with contextlib.suppress(OSError):  # the parent is gone (or stopped this worker)
                conn.send_bytes(_INIT_FAILED + pickle.dumps(portable(exc)))
            return
    WORKER_RETRIES[0] = 0  # forked: the parent's count is not this worker's
    try:
        conn.send_bytes(_READY)
    except OSError:  # the parent hung up during a slow initializer: nothing to do
        return
    jobs = itertools.count(1)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job_id, target_blob, items_blob = pickle.loads(message)
        try:
            values, errors = run_chunk(pickle.loads(target_blob), pickle.loads(items_blob))
            retries, WORKER_RETRIES[0] = WORKER_RETRIES[0], 0
            reply = _encode_result(job_id, values, errors, retries)
        except Exception as exc:  # the target or the items could not be rebuilt here
            reply = pickle.dumps((job_id, None, portable(exc), 0), protocol=pickle.HIGHEST_PROTOCOL)
        conn.send_bytes(reply)
        if max_jobs is not None and next(jobs) >= max_jobs:
            return  # recycled: the parent sent no other job, and replaces this worker


def _encode_result(
    job_id: int, values: list[Any], errors: dict[int, BaseException] | None, retries: int = 0
) -> bytes:
    """Pickle a job's results (and its retry count); a value that does not pickle fails its item."""
    try:
        return pickle.dumps((job_id, values, errors, retries), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # find the values that do not pickle: each fails its own item
        errors = dict(errors or {})
        for position, value in enumerate(values):
            if position in errors:
                continue
            try:
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                values[position] = None
                errors[position] = portable(
                    TypeError(
                        f"the result of this item could not be pickled back to the parent "
                        f"process: {type(exc).__name__}: {exc}"
                    )
                )
        return pickle.dumps(
            (job_id, values, errors or None, retries), protocol=pickle.HIGHEST_PROTOCOL
        )


def _unpickling_error(exc: BaseException) -> Exception:
    """Return the error of a job whose results raised ``exc`` while unpickled in the parent.

    Unpickling runs code of the results' classes in the dispatcher thread, which
    a signal never interrupts: a ``KeyboardInterrupt`` or ``SystemExit`` raised
    there comes from that code, not from the user, and must fail the job's
    items, never the dispatcher (which would fail every map on the pool).
    """
    if isinstance(exc, Exception):
        return exc
    error = OperoError(
        f"unpickling this item's result in the parent process raised {exc!r} "
        "(its class's __reduce__ or __setstate__)"
    )
    error.__cause__ = exc
    return error


def _died(pid: int | None, exitcode: int | None) -> WorkerDiedError:
    """Build the error of an item whose worker process died."""
    how = f"exit code {exitcode}" if exitcode is None or exitcode >= 0 else f"signal {-exitcode}"
    return WorkerDiedError(
        f"worker process {pid} died ({how}) while running this item (os._exit, a signal or a "
        "crash in native code); the pool replaced it and the other items ran"
    )


def _start_error(exitcode: int | None, method: str) -> WorkerStartError:
    """Build the error of a map whose pool cannot start a worker process."""
    hint = (
        f" With the {method!r} start method a worker imports your main module again: put the "
        'code that starts the map under `if __name__ == "__main__":`.'
        if method != "fork"
        else ""
    )
    return WorkerStartError(
        f"opmap: a worker process exited (exit code {exitcode}) before it could take a job, so "
        f"the process pool cannot start.{hint}"
    )


def _init_error(pid: int | None, exc: BaseException) -> WorkerStartError:
    """Build the error of a map whose initializer raised in a worker process."""
    error = WorkerStartError(
        f"opmap: the initializer raised in worker process {pid}: {type(exc).__name__}: {exc}; "
        "the map stopped (its items that had not run never will), and the next call "
        "starts new workers"
    )
    error.__cause__ = exc
    return error


class _Run:
    """One map on a :class:`ProcessPool`: its jobs, what is pending, and how it ends."""

    def __init__(
        self,
        target_blob: bytes,
        jobs: Sequence[Sequence[Any]],
        done: Callable[[int, list[Any], dict[int, BaseException] | None], None],
        indices: Sequence[Sequence[int]] | None,
        retried: Callable[[int], object] | None = None,
    ) -> None:
        self.target_blob = target_blob
        self.jobs = jobs
        self.done = done
        self.indices = indices
        self.pending: collections.deque[_Job] = collections.deque()
        self.open = 0  # jobs pending or running (a split job counts once per item)
        self.partial: dict[int, tuple[list[Any], dict[int, BaseException], list[int]]] = {}
        self.finished = threading.Event()
        self.cancelled = False
        self.failure: BaseException | None = None
        self.retried = retried
        self.retries = 0  # counted by the dispatcher, not yet told to ``retried``

    def label(self, j: int, position: int) -> str:
        """Name an item by its index in the map (its position in the job when unknown)."""
        if self.indices is not None:
            return f"item {self.indices[j][position]}"
        return f"item {position} of job {j}"


class _Job:
    """A job (or one item of a split job) ready to send: its run, place and pickled items."""

    __slots__ = ("blob", "j", "position", "run", "size")

    def __init__(self, run: _Run, j: int, position: int, blob: bytes, size: int) -> None:
        self.run = run
        self.j = j
        self.position = position  # -1: the whole job; else one item of it
        self.blob = blob
        self.size = size


PREFETCH_BYTES = 8192
"""A worker gets a second job of the same map while it runs one, when the job's
message is at most this size: it then waits in the pipe's buffer (64 KiB on
Linux, 16 KiB at least on macOS), so sending it never blocks the dispatcher,
and the worker starts it without waiting for a round trip through the parent
(32 us against 22 us a job of one trivial item, 2 workers, here)."""


class _Worker:
    """A worker process, the parent's end of its pipe, and the jobs sent to it, in order."""

    __slots__ = ("conn", "init_error", "jobs", "killed", "left", "process", "ready")

    def __init__(self, process: Any, conn: Any, left: int | None = None) -> None:
        self.process = process
        self.conn = conn
        self.jobs: collections.deque[_Job] = collections.deque()  # [0] is running
        self.ready = False
        self.killed = False  # stopped by us (a cancelled map), not a crash
        self.left = left  # jobs it may still be sent (max_tasks_per_child); None: no limit
        self.init_error: BaseException | None = None  # what its initializer raised


_Outcome = tuple[_Run, int, list[Any], "dict[int, BaseException] | None"]


class _Waiter:
    """Waits until pipes or process sentinels are ready.

    Where the system has ``epoll``/``kqueue``/``poll``, one selector keeps the
    registrations between waits: 2 us a wait against 12 us for
    ``multiprocessing.connection.wait``, which registers every object again on
    each call (measured with 5 pipes here). Elsewhere (Windows, whose selectors
    take only sockets) it falls back to ``multiprocessing.connection.wait``.
    """

    def __init__(self) -> None:
        self._objects: dict[Any, None] = {}
        self._selector: selectors.BaseSelector | None = (
            None if sys.platform == "win32" else selectors.DefaultSelector()
        )

    def add(self, obj: Any) -> None:
        """Watch a ``Connection`` or a sentinel (lock held)."""
        self._objects[obj] = None
        if self._selector is not None:
            self._selector.register(obj, selectors.EVENT_READ)

    def remove(self, obj: Any) -> None:
        """Stop watching ``obj``; call before closing it (lock held)."""
        if self._objects.pop(obj, 0) is None and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(obj)

    def wait(self) -> list[Any]:
        """Block until some watched objects are ready; return them."""
        if self._selector is not None:
            return [key.fileobj for key, _ in self._selector.select()]
        return multiprocessing.connection.wait(list(self._objects))

    def close(self) -> None:
        """Release the selector."""
        if self._selector is not None:
            self._selector.close()


class ProcessPool:
    """``workers`` processes fed by one dispatcher thread that owns all the pool's state.

    Each worker has its own pipe and holds one job (two when the second is
    small and of the same map, see :data:`PREFETCH_BYTES`); the jobs not yet
    sent stay here, in their map's queue. So the dispatcher always knows which
    job each worker runs: when a worker's sentinel fires (``os._exit``, a
    signal, a segfault), that job's items are re-run one per job (a job of
    one item gets a :class:`WorkerDiedError`), a new worker replaces it, and
    there is no table to fill up. Cancelling a map drops its unsent jobs at
    once and stops (kills and replaces) the workers running its jobs. Maps
    called from several threads at once share the workers, one job at a time,
    round-robin.

    Args:
        workers: The number of worker processes.
        method: The ``multiprocessing`` start method (``None``: the default).
        init_blob: The pickled ``(initializer, initargs)`` each worker runs
            once before its first job, or ``None``.
        max_jobs: Jobs a worker runs before it is replaced by a new one
            (``max_tasks_per_child``), or ``None`` for no limit.

    """

    def __init__(
        self,
        workers: int,
        method: str | None = None,
        init_blob: bytes | None = None,
        max_jobs: int | None = None,
    ) -> None:
        self.workers = workers
        self.init_blob = init_blob
        self.max_jobs = max_jobs
        self._ctx: Any = multiprocessing.get_context(method)
        self._lock = threading.Lock()
        self._procs: list[_Worker] = []
        self._runs: collections.deque[_Run] = collections.deque()
        self._thread: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None  # the thread in _dispatch_loop
        self._wake_r: Any = None
        self._wake_w: Any = None
        self._spawning: Any = None
        self._start_failed: WorkerStartError | None = None
        self._waiter = _Waiter()
        self._by_conn: dict[Any, _Worker] = {}
        self._by_sentinel: dict[int, _Worker] = {}
        self._closed = False

    # ------------------------------------------------------------------ public

    def pids(self) -> set[int]:
        """Return the process ids of the live workers (empty before first use)."""
        with self._lock:
            return {w.process.pid for w in self._procs if w.process.exitcode is None}

    def submit(self, run: _Run) -> None:
        """Queue a map's jobs; its ``done(job, values, errors)`` runs in the dispatcher thread.

        An item that cannot be pickled fails in its place before anything is
        sent (with a note naming its index); the other items run.
        """
        jobs = run.jobs
        unsendable: list[_Outcome] = []
        for j, job in enumerate(jobs):
            try:
                blob = pickle.dumps(list(job), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # find the items that do not pickle: each fails in its place
                outcome = self._split(run, j)
                if outcome is not None:
                    unsendable.append(outcome)
                continue
            run.pending.append(_Job(run, j, -1, blob, len(job)))
            run.open += 1
        self._deliver(unsendable)
        if run.open == 0:
            run.finished.set()
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("opmap: the process pool was shut down (interpreter exit)")
            if run.cancelled:
                return
            self._start_failed = None
            self._runs.append(run)
            self._start()
        self._wake()

    def cancel(self, run: _Run, kill: bool = True) -> None:
        """Stop a map: drop its unsent jobs and kill the workers running its jobs.

        Killing (rather than letting a job of many items finish) stops the
        work as a Ctrl-C stops a plain loop, and frees the workers for the
        next map at once; the dispatcher starts their replacements. With
        ``kill=False`` (a stream whose consumer stopped) the workers finish
        the job they run and its results are dropped.
        """
        with self._lock:
            run.cancelled = True
            run.pending.clear()
            with contextlib.suppress(ValueError):
                self._runs.remove(run)
            for w in self._procs if kill else ():
                # A worker holds a second job only of the map of its first one.
                if w.jobs and w.jobs[0].run is run and not w.killed:
                    w.killed = True
                    with contextlib.suppress(OSError):
                        w.process.kill()
        run.finished.set()

    def shutdown(self) -> None:
        """Stop the dispatcher and the workers (at exit)."""
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
            runs = list(self._runs)
            self._runs.clear()
        for run in runs:
            run.cancelled = True
            run.finished.set()
        self._wake()
        for w in procs:
            with contextlib.suppress(Exception):
                w.process.terminate()
        for w in procs:
            with contextlib.suppress(Exception):
                w.process.join(5)
                w.conn.close()

    def forget(self) -> None:
        """In a forked child: drop the parent's workers and thread without joining them.

        The child closes its copies of the parent's pipe ends: a worker sees
        end-of-file, and exits, only when no process holds the other end, so
        a forked worker must not keep its siblings' (or its own) parent ends,
        or workers would outlive a parent that died.
        """
        procs = self._procs
        self._procs = []
        self._runs = collections.deque()
        self._thread = None
        self._closed = True
        children = getattr(multiprocessing.process, "_children", None)
        ends = [w.conn for w in procs] + [self._spawning, self._wake_r, self._wake_w]
        for end in ends:
            if end is not None:
                with contextlib.suppress(OSError):
                    end.close()
        with contextlib.suppress(OSError):
            self._waiter.close()
        for w in procs:
            if children is not None:
                children.discard(w.process)

    # ------------------------------------------------------------------ dispatcher

    def _start(self) -> None:
        """Make sure the dispatcher thread runs (the caller holds the lock).

        This runs in the caller's thread, where a ``KeyboardInterrupt`` can
        land between any two bytecodes; so it does as little as possible, in
        an order that an interrupt cannot break (a thread that was created
        but not started is replaced). The workers are started by the
        dispatcher itself (:meth:`_fill`), where no interrupt is raised.
        """
        if self._wake_r is None:
            wake_r, wake_w = self._ctx.Pipe(duplex=False)
            self._waiter.add(wake_r)
            self._wake_r, self._wake_w = wake_r, wake_w
        thread = self._thread
        if thread is None or not thread.is_alive():
            thread = threading.Thread(
                target=self._dispatch, name=f"opero-process-pool-{self.workers}", daemon=True
            )
            self._thread = thread
            thread.start()

    def _fill(self) -> None:
        """Start the missing workers, unless a worker failed to start (lock held).

        Workers are missing at first, after a worker died, and after a worker
        failed to start (see :class:`WorkerStartError`): then the next map
        tries again, so a pool that cannot start does not spawn forever.

        Only as many are started as there are jobs waiting for a worker, up
        to ``workers``: a map of two items with ``workers=64`` starts two
        processes, not 64 that would idle until exit.
        """
        idle = sum(1 for w in self._procs if not w.jobs and not w.killed and w.left != 0)
        waiting = sum(len(run.pending) for run in self._runs if not run.cancelled)
        while len(self._procs) < self.workers and waiting > idle and self._start_failed is None:
            idle += 1
            try:
                self._procs.append(self._spawn())
            except Exception as exc:  # out of processes or file descriptors, ...
                hint = ""
                if multiprocessing.current_process().daemon:
                    hint = (
                        "; this map runs inside a worker process of another process-mode "
                        "map, which cannot start processes: use mode='thread' (or 'async') "
                        "for the inner map"
                    )
                error = WorkerStartError(f"opmap: could not start a worker process: {exc!r}{hint}")
                error.__cause__ = exc
                self._fail_all(error)

    def _fail_all(self, error: WorkerStartError) -> None:
        """Fail every map waiting on this pool: its workers cannot start (lock held)."""
        self._start_failed = error
        runs = list(self._runs) + [job.run for w in self._procs for job in w.jobs]
        self._runs.clear()
        for run in runs:
            if not run.finished.is_set():
                run.failure = error
                run.cancelled = True
                run.pending.clear()
                run.finished.set()

    def _spawn(self) -> _Worker:
        """Start one worker process."""
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_end, self.init_blob, self.max_jobs),
            name="opero-opmap-worker",
            daemon=True,
        )
        self._spawning = parent_end  # a forked worker closes its copy (see forget)
        try:
            process.start()
        finally:
            self._spawning = None
        child_end.close()
        w = _Worker(process, parent_end, self.max_jobs)
        self._by_conn[parent_end] = w
        self._by_sentinel[process.sentinel] = w
        self._waiter.add(parent_end)
        self._waiter.add(process.sentinel)
        return w

    def _wake(self) -> None:
        """Make the dispatcher look at its queues again."""
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send_bytes(b"")

    def _dispatch(self) -> None:
        """Run the dispatcher loop; if it ever fails, fail every map instead of hanging them.

        Only one dispatcher runs per pool: a second one (its caller was
        interrupted inside ``Thread.start()``, so :meth:`_start` could not
        tell that the first had started) returns at once.
        """
        me = threading.current_thread()
        with self._lock:
            if self._dispatcher is not None:
                return
            self._dispatcher = me
        try:
            self._dispatch_loop()
        except BaseException as exc:
            _log.error("opmap: the process pool's dispatcher failed", exc_info=True)
            error = OperoError(f"opmap: the process pool's dispatcher failed: {exc!r}")
            error.__cause__ = exc
            with self._lock:
                runs = list(self._runs) + [job.run for w in self._procs for job in w.jobs]
                procs, self._procs = self._procs, []
                for w in procs:
                    self._forget_worker(w)
                wake = (self._wake_r, self._wake_w)
                self._waiter.remove(self._wake_r)
                self._wake_r = self._wake_w = None
                self._runs.clear()
                self._thread = None  # the next map starts a new dispatcher and workers
                self._dispatcher = None
            for run in runs:
                if not run.finished.is_set():
                    run.failure = error
                    run.cancelled = True
                    run.finished.set()
            for w in procs:
                with contextlib.suppress(Exception):
                    w.process.kill()
                    w.process.join(5)
                    w.conn.close()
            for end in wake:
                with contextlib.suppress(Exception):
                    end.close()
        finally:
            with self._lock:
                if self._dispatcher is me:
                    self._dispatcher = None

    def _dispatch_loop(self) -> None:
        """Feed idle workers, collect results, replace the dead (the dispatcher thread)."""
        while True:
            with self._lock:
                if self._closed:
                    return
                self._fill()
                self._feed()
                wake: Any = self._wake_r
            try:
                ready = self._waiter.wait()
            except OSError:  # a pipe closed under us (shutdown)
                continue
            outcomes = []
            with self._lock:
                if self._closed:
                    return
                for obj in ready:
                    if obj is wake:
                        self._drain_wake()
                    elif obj in self._by_conn:
                        outcomes.extend(self._receive(self._by_conn[obj]))
                for obj in ready:
                    if obj in self._by_sentinel:
                        outcomes.extend(self._bury(self._by_sentinel[obj]))
                if outcomes:
                    # The workers that just finished get their next job before the
                    # maps' `done` callbacks run: a cache fill of a job's results
                    # costs about as long as the job, and held the workers back.
                    self._feed()
            self._deliver(outcomes)

    def _forget_worker(self, w: _Worker) -> None:
        """Stop watching a worker's pipe and sentinel (lock held)."""
        self._by_conn.pop(w.conn, None)
        self._by_sentinel.pop(w.process.sentinel, None)
        self._waiter.remove(w.conn)
        self._waiter.remove(w.process.sentinel)

    def _drain_wake(self) -> None:
        """Read the wake-up signals already sent (lock held)."""
        wake: Any = self._wake_r
        while wake.poll():
            wake.recv_bytes()

    def _feed(self) -> None:
        """Give each idle worker the next job, round-robin over the maps (lock held).

        A busy worker also gets the next small job of its own map (see
        :data:`PREFETCH_BYTES`).
        """
        for w in self._procs:
            if w.killed or len(w.jobs) > 1 or w.left == 0:
                continue
            if w.jobs:
                run = w.jobs[0].run
                if run.cancelled or not run.pending:
                    continue
                job = run.pending.popleft()
            else:
                next_job = self._next_job()
                if next_job is None:
                    return
                job = next_job
            message = pickle.dumps(
                (id(job), job.run.target_blob, job.blob), protocol=pickle.HIGHEST_PROTOCOL
            )
            if w.jobs and len(message) > PREFETCH_BYTES:
                job.run.pending.appendleft(job)
                continue
            try:
                w.conn.send_bytes(message)
            except OSError:  # the worker is gone: its sentinel will fire
                self._requeue(job)
                continue
            w.jobs.append(job)
            if w.left is not None:
                w.left -= 1

    def _requeue(self, job: _Job) -> None:
        """Put a job that was not run back first in its map's queue (lock held)."""
        run = job.run
        if run.cancelled:
            return
        run.pending.appendleft(job)
        if run not in self._runs:
            self._runs.appendleft(run)

    def _next_job(self) -> _Job | None:
        """Pop the next pending job, taking maps in turn."""
        while self._runs:
            run = self._runs[0]
            self._runs.rotate(-1)
            if run.pending:
                return run.pending.popleft()
            self._runs.remove(run)
        return None

    def _receive(self, w: _Worker, drain: bool = False) -> list[_Outcome]:
        """Read what worker ``w`` sent: its ready signal or its job's results (lock held).

        Called when its pipe is readable, it reads one message (the waiter is
        level-triggered: more data wakes it again); ``drain`` reads all there
        is (``Connection.poll`` costs a selector, 10 us, per call).
        """
        outcomes: list[_Outcome] = []
        first = not drain
        while True:
            try:
                if not first and (not drain or not w.conn.poll()):
                    return outcomes
                message = w.conn.recv_bytes()
            except (EOFError, OSError):  # dead: its sentinel reports it
                return outcomes
            first = False
            if message == _READY:
                w.ready = True
                continue
            if not w.ready and message[:1] == _INIT_FAILED:
                try:
                    w.init_error = pickle.loads(message[1:])
                except BaseException as exc:  # its class does not unpickle here
                    w.init_error = _unpickling_error(exc)
                continue
            if not w.jobs:
                continue
            job = w.jobs.popleft()
            try:
                _job_id, values, errors, retries = pickle.loads(message)
            except BaseException as exc:  # a result that pickles but does not unpickle here
                values, errors, retries = None, _unpickling_error(exc), 0
            if retries:
                job.run.retries += retries
            if values is None and job.size > 1 and not job.run.cancelled:
                # The job failed as a whole (an item or a result that does not
                # unpickle): run its items one per job, so only the bad one fails.
                job.run.open -= 1
                outcome = self._split(job.run, job.j, first=True)
                if outcome is not None:
                    outcomes.append(outcome)
                continue
            outcomes.extend(self._settle(job, values, errors))

    def _bury(self, w: _Worker) -> list[_Outcome]:
        """Replace a dead worker; its job is split, or its single item failed (lock held)."""
        outcomes = self._receive(w, drain=True)  # a result sent before dying still counts
        w.process.join(1)  # its sentinel fired: it is exiting, reap it for its exit code
        with contextlib.suppress(ValueError):
            self._procs.remove(w)
        self._forget_worker(w)
        w.conn.close()
        job = w.jobs.popleft() if w.jobs else None
        while w.jobs:  # sent but never started: run them elsewhere
            self._requeue(w.jobs.pop())
        if not w.ready and not w.killed:
            if job is not None:
                self._requeue(job)  # so that _fail_all sees its map
            if w.init_error is not None:
                self._fail_all(_init_error(w.process.pid, w.init_error))
            else:
                error = _start_error(w.process.exitcode, self._ctx.get_start_method())
                if self.init_blob is not None:
                    error.add_note(
                        "opmap: this pool's workers run an initializer first; it may have "
                        "ended the process (os._exit, a signal, a crash in native code)"
                    )
                self._fail_all(error)
            return outcomes
        if job is None or job.run.cancelled:
            return outcomes
        if w.killed:  # stopped for another map: not this job's fault
            self._requeue(job)
            return outcomes
        run = job.run
        if job.size > 1:
            run.open -= 1
            outcome = self._split(run, job.j, first=True)
            return outcomes if outcome is None else [*outcomes, outcome]
        died = _died(w.process.pid, w.process.exitcode)
        return outcomes + self._settle(job, [None], {0: died})

    def _split(self, run: _Run, j: int, first: bool = False) -> _Outcome | None:
        """Queue job ``j`` as one job per item; an item that does not pickle fails in place.

        Args:
            run: The map.
            j: The job's index.
            first: Put the items first in line (a job being re-run) rather than last.

        Returns:
            The job's outcome when no item could be queued, else ``None`` (lock
            held, or the run not yet shared).

        """
        items = run.jobs[j]
        values: list[Any] = [None] * len(items)
        errors: dict[int, BaseException] = {}
        queued: list[_Job] = []
        for position, item in enumerate(items):
            try:
                blob = pickle.dumps([item], protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                exc.add_note(
                    f"opmap: {run.label(j, position)} cannot be pickled to a worker process; "
                    "it failed in its place and the other items ran"
                )
                errors[position] = exc
                continue
            queued.append(_Job(run, j, position, blob, 1))
        if not queued:
            return (run, j, values, errors)
        run.partial[j] = (values, errors, [len(queued)])
        run.open += len(queued)
        if first:
            run.pending.extendleft(reversed(queued))
            if run not in self._runs:
                self._runs.appendleft(run)
        else:
            run.pending.extend(queued)
        return None

    def _settle(self, job: _Job, values: list[Any] | None, errors: Any) -> list[_Outcome]:
        """Account for a finished job; return what to report (lock held)."""
        run = job.run
        if run.cancelled:
            return []
        if values is None:  # the whole job failed in the worker
            exc = errors
            if job.position >= 0 and isinstance(exc, BaseException):
                exc.add_note(
                    f"opmap: {run.label(job.j, job.position)} failed in transit (it, or its "
                    "result, could not be unpickled); the other items ran"
                )
            values = [None] * job.size
            errors = dict.fromkeys(range(job.size), exc)
        run.open -= 1
        outcomes: list[_Outcome] = []
        if job.position < 0:
            outcomes.append((run, job.j, values, errors))
        else:
            acc_values, acc_errors, left = run.partial[job.j]
            acc_values[job.position] = values[0]
            if errors:
                acc_errors[job.position] = errors[0]
            left[0] -= 1
            if left[0] == 0:
                del run.partial[job.j]
                outcomes.append((run, job.j, acc_values, acc_errors or None))
        return outcomes

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        """Call each map's ``done`` outside the lock, then finish maps with no job left.

        Only the dispatcher thread settles jobs, so a map whose count of open
        jobs is 0 after its outcomes are delivered has no result still to come.
        """
        touched: list[_Run] = []
        for run, j, values, errors in outcomes:
            if run.cancelled:
                continue
            if run not in touched:
                touched.append(run)
            try:
                run.done(j, values, errors)
            except BaseException as exc:  # never kill the dispatcher: the map re-raises it
                run.failure = exc
                self.cancel(run)
        for run in touched:
            if run.retries and run.retried is not None:
                count, run.retries = run.retries, 0
                try:
                    run.retried(count)
                except Exception:  # the progress bar's: never the dispatcher's problem
                    _log.warning("opmap: the progress bar failed", exc_info=True)
            if run.open == 0:
                run.finished.set()


_PROCESS_POOLS: dict[tuple[Any, ...], ProcessPool] = {}
_LOCK = threading.Lock()


def process_pool(
    workers: int,
    method: str | None = None,
    init_blob: bytes | None = None,
    max_jobs: int | None = None,
) -> ProcessPool:
    """Return the shared process pool with ``workers`` processes (started lazily).

    Maps share a pool only when they have the same worker count, start
    method, initializer (``init_blob``: the pickled ``(initializer,
    initargs)``) and ``max_jobs``: a worker set up by one initializer never
    runs the items of a map with another, or none.
    """
    key: tuple[Any, ...] = (workers, method)
    if init_blob is not None or max_jobs is not None:
        key = (workers, method, init_blob, max_jobs)
    with _LOCK:
        pool = _PROCESS_POOLS.get(key)
        if pool is None:
            pool = _PROCESS_POOLS[key] = ProcessPool(workers, method, init_blob, max_jobs)
        return pool


def run_process_jobs(
    pool: ProcessPool,
    target: Target,
    jobs: Sequence[Sequence[Any]],
    done: Callable[[int, list[Any], dict[int, BaseException] | None], None],
    indices: Sequence[Sequence[int]] | None = None,
    scope: CancelScope | None = None,
    retried: Callable[[int], object] | None = None,
) -> None:
    """Run every job on the process pool; ``done(job, values, errors)`` as each finishes.

    ``done`` runs in the pool's dispatcher thread; so does ``retried(n)``,
    told of the retries the workers made for the map's items (counted only
    when the mapped function counts them: a shown progress bar). An interrupt
    (``KeyboardInterrupt``) or a cancelled ``scope`` drops the map's jobs
    that have not started; the pool stays usable.

    Raises:
        concurrent.futures.CancelledError: ``scope`` was cancelled.

    """
    run = _Run(dumps_target(target), jobs, done, indices, retried)
    try:
        pool.submit(run)
        if scope is not None:
            scope.add(lambda: pool.cancel(run))
        run.finished.wait()
    except BaseException:
        pool.cancel(run)
        raise
    if run.failure is not None:
        raise run.failure
    if run.cancelled:
        raise cf.CancelledError("opmap: the map was cancelled")


def shutdown_process_pools() -> None:
    """Stop every process pool (registered with ``atexit``)."""
    with _LOCK:
        pools = list(_PROCESS_POOLS.values())
        _PROCESS_POOLS.clear()
    for pool in pools:
        pool.shutdown()


def _forget_after_fork() -> None:
    """In a forked child: drop the parent's pools without joining or killing anything."""
    global _LOCK
    _LOCK = threading.Lock()  # it may have been held by another thread at the fork
    for pool in _PROCESS_POOLS.values():
        pool.forget()
    _PROCESS_POOLS.clear()


os.register_at_fork(after_in_child=_forget_after_fork)

# atexit runs hooks last-registered first: this one stops the workers before
# multiprocessing's own hook joins them.
atexit.register(shutdown_process_pools)
