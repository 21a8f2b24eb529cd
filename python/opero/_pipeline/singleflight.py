"""Single flight: concurrent cache misses on one key compute once (threads and tasks).

Threads
-------


The memory backend gets single flight from the native
:class:`~opero._opero_core.CachedCall`; Redis, disk and user backends go
through :class:`ThreadFlight`, with the same rules:

* concurrent misses on one key from several threads compute once, the other
  threads wait and get the same result or the same ``Exception``;
* an owner stopped by a ``BaseException`` that is not an ``Exception``
  (``KeyboardInterrupt``, ``SystemExit``...) keeps it: the flight is
  abandoned and one waiter computes instead;
* a wait that would deadlock (the thread computes the key itself, or the
  owner waits on it through other threads, native flights included: one
  wait-for graph, :class:`~opero._opero_core.FlightToken`) computes directly;
* the thread that wins a flight looks at the cache again (``recheck``) when
  a computation of that key finished, or a value was stored for it
  (:meth:`ThreadFlight.stored`), since its own lookup began, so a value stored
  in between is returned, not recomputed (keys share 64 stripes of counters:
  another key of the stripe may cause a needless look, never a missed one);
* after ``fork()`` the child starts with empty tables: flights of the
  parent's threads are gone, never waited on.

Asyncio tasks
-------------
:class:`TaskFlight` does the same across the tasks of one event loop: the
first task computes, the others await the same future and get the same result
or the same exception. A task that re-enters a key it is computing itself, or
whose wait would close a cycle of tasks waiting on each other, computes
directly (no deadlock). If the computing task is cancelled (or stopped by any
``BaseException`` that is not an ``Exception``), a waiter takes over instead of
inheriting it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from opero._opero_core import FlightToken
from opero.cache._base import MISS

__all__ = ["TaskFlight", "ThreadFlight"]

_STRIPES = 64  # completion counters per function, indexed by the key's hash
_POLL = 0.05  # seconds between two looks at a waited-on token

_generation = 0  # bumped in a child process after fork()
_live: weakref.WeakSet[ThreadFlight] = weakref.WeakSet()


class _Flight:
    """One computation in progress: its token, outcome and completion event."""

    __slots__ = ("abandoned", "done", "error", "generation", "token", "value")

    def __init__(self) -> None:
        self.token = FlightToken()
        self.generation = _generation
        self.done = threading.Event()
        self.value: Any = None
        self.error: Exception | None = None
        self.abandoned = False


class ThreadFlight:
    """Single flight of cache misses across the threads of one decorated function."""

    __slots__ = ("__weakref__", "_flights", "_lock", "_stamps")

    def __init__(self) -> None:
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        # Re-entrant: the table compares keys with their __eq__ under this lock, and
        # a key's __eq__ (or __hash__) may call the decorated function again.
        self._lock = threading.RLock()
        self._flights: dict[Any, _Flight] = {}
        self._stamps = [0] * _STRIPES

    def stamp(self, key: Any) -> int:
        """Return the completion count of ``key``'s stripe: take it before the lookup."""
        return self._stamps[hash(key) % _STRIPES]

    def stored(self, key: Any) -> None:
        """Note a value stored for ``key`` outside a flight (a later winner looks again)."""
        slot = hash(key) % _STRIPES
        with self._lock:
            self._stamps[slot] += 1

    def do(
        self,
        key: Any,
        compute: Callable[[], Any],
        stamp: int | None = None,
        recheck: Callable[[], Any] | None = None,
    ) -> Any:
        """Run ``compute()`` once for concurrent callers of ``key``; share its outcome.

        Args:
            key: The cache key (hashable).
            compute: Computes the value and stores it in the cache before returning.
            stamp: :meth:`stamp` of ``key`` taken before the caller's cache lookup.
            recheck: Looks the key up again (returns ``MISS`` on a miss); called by
                the winner of the flight when a computation of a key of the same
                stripe finished since ``stamp``.

        """
        slot = hash(key) % _STRIPES
        flight: _Flight | None = None
        # A raised error's traceback holds this frame, and the flight holds the
        # error: drop the local on the way out (no cycle).
        try:
            while True:
                with self._lock:
                    flight = self._flights.get(key)
                    if flight is not None and flight.token.done:
                        # Finished: its owner may have been stopped before unlisting it.
                        del self._flights[key]
                        if flight.abandoned:
                            flight = None
                    owner = flight is None
                    if flight is None:
                        flight = self._flights[key] = _Flight()
                        stale = stamp is not None and self._stamps[slot] != stamp
                if owner:
                    break
                if not flight.token.done:
                    if not flight.token.wait_begin():
                        # This thread computes the key itself, or the owner waits on
                        # it through other threads: waiting would deadlock.
                        return compute()
                    try:
                        # Finishing the token is the owner's first act once done (one
                        # native call, which a signal cannot split): a second Ctrl-C
                        # that stops the owner before it sets the event, or unlists
                        # the flight, leaves no waiter stuck.
                        while not flight.done.wait(_POLL) and not flight.token.done:
                            pass
                    finally:
                        flight.token.wait_end()
                if flight.abandoned:
                    continue  # the owner was interrupted: one waiter computes
                if flight.error is not None:
                    raise flight.error
                return flight.value
            return self._own(key, slot, flight, compute, recheck if stale else None)
        finally:
            flight = None

    def _own(
        self,
        key: Any,
        slot: int,
        flight: _Flight,
        compute: Callable[[], Any],
        recheck: Callable[[], Any] | None,
    ) -> Any:
        """Compute as the flight's owner and publish the outcome to its waiters."""
        ok = False
        try:
            value = MISS if recheck is None else recheck()
            if value is MISS:
                value = compute()
            flight.value = value
            ok = True
            return value
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            # Neither a value nor an Exception: a BaseException left the owner
            # (KeyboardInterrupt...); it is not the waiters' to receive.
            flight.abandoned = not ok and flight.error is None
            flight.token.finish()  # the outcome is published
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
                if ok:
                    self._stamps[slot] += 1
            if flight.generation == _generation:
                # After a fork the event's lock may be held by a parent thread
                # that is gone; nobody in this process waits on it anyway.
                flight.done.set()
            del flight  # the error's traceback holds this frame (no cycle)


def _after_fork_in_child() -> None:
    """Start every table afresh: the parent's other threads are not in this process."""
    global _generation
    _generation += 1
    for flight in list(_live):
        flight._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Retry:
    """Result of a flight whose computing task was cancelled: the waiters try again."""


_RETRY = _Retry()

# Which task waits on which task's computation (the wait-for graph of tasks).
_task_waits: dict[asyncio.Task[Any], tuple[asyncio.Task[Any] | None, asyncio.Future[Any]]] = {}


def _closes_cycle(me: asyncio.Task[Any] | None, owner: asyncio.Task[Any] | None) -> bool:
    """Whether ``me`` waiting on ``owner`` would deadlock (``owner`` waits on ``me``)."""
    at = owner
    for _ in range(len(_task_waits) + 1):
        if at is None:
            return False
        if at is me:
            return True
        edge = _task_waits.get(at)
        if edge is None or edge[1].done():
            return False
        at = edge[0]
    return False


async def _wait_for(
    task: asyncio.Task[Any] | None, owner: asyncio.Task[Any] | None, future: asyncio.Future[Any]
) -> Any:
    """Await ``owner``'s flight, noting the edge ``task`` -> ``owner`` in the wait-for graph."""
    if task is not None:
        _task_waits[task] = (owner, future)
    try:
        return await asyncio.shield(future)
    finally:
        if task is not None:
            _task_waits.pop(task, None)
        # The error's traceback holds this frame, and a task holds its error (no cycle).
        del task, owner, future


class TaskFlight:
    """Single flight of cache misses across the asyncio tasks of one decorated function."""

    __slots__ = ("_flights", "_stamps")

    def __init__(self) -> None:
        self._flights: dict[
            Any, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], asyncio.Task[Any] | None]
        ] = {}
        self._stamps = [0] * _STRIPES

    def stamp(self, key: Any) -> int:
        """Return the completion count of ``key``'s stripe: take it before the lookup."""
        return self._stamps[hash(key) % _STRIPES]

    def stored(self, key: Any) -> None:
        """Note a value stored for ``key`` outside a flight (a later winner looks again)."""
        self._stamps[hash(key) % _STRIPES] += 1

    async def do(
        self,
        key: Any,
        compute: Callable[[], Awaitable[Any]],
        stamp: int | None = None,
        recheck: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        """Run ``compute()`` once for concurrent callers of ``key``; share its outcome.

        A task whose wait would deadlock (it computes the key itself, or the
        computing task waits on it through other tasks) computes directly.

        Args:
            key: The cache key (hashable).
            compute: Computes the value and stores it in the cache before returning.
            stamp: :meth:`stamp` of ``key`` taken before the caller's cache lookup.
            recheck: Looks the key up again (``MISS`` on a miss); awaited by the
                winner of the flight when a computation of a key of the same
                stripe finished since ``stamp``.

        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        slot = hash(key) % _STRIPES
        future: asyncio.Future[Any] | None = None
        entry: tuple[Any, ...] | None = None
        # A raised error's traceback holds this frame, and the future (and the task
        # that raises it) hold the error: drop the locals on the way out (no cycle).
        try:
            flight = self._flights.get(key)
            if flight is not None:  # no coroutine for the wait on an uncontended miss
                result = await self._join(key, flight, loop, task, compute)
                if result is not _RETRY:
                    return result
            stale = stamp is not None and self._stamps[slot] != stamp
            future = loop.create_future()
            entry = (loop, future, task)
            self._flights[key] = entry
            try:
                value = MISS
                if stale and recheck is not None:
                    value = await recheck()
                if value is MISS:
                    value = await compute()
            except Exception as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: the caller re-raises it below anyway
                raise
            except BaseException:
                future.set_result(_RETRY)
                raise
            else:
                self._stamps[slot] += 1
                future.set_result(value)
                return value
            finally:
                if self._flights.get(key) is entry:
                    del self._flights[key]
        finally:
            flight = future = entry = task = None

    async def _join(
        self,
        key: Any,
        flight: tuple[Any, ...] | None,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any] | None,
        compute: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Await ``flight`` of ``key`` (and the flights that replace it) as a waiter.

        A wait that would deadlock computes directly instead.

        Returns:
            This caller's result, or ``_RETRY`` once no flight of ``key`` is
            left (the caller starts one, with no await in between).

        """
        # The error's traceback holds this frame, and the future holds the error.
        try:
            while flight is not None:
                flight_loop, future, owner = flight
                if flight_loop is not loop or _closes_cycle(task, owner):
                    # Another event loop, or a wait that would deadlock (re-entry from
                    # the computing task, or a cycle of tasks): compute directly.
                    return await compute()
                result = await _wait_for(task, owner, future)
                if result is not _RETRY:
                    return result
                flight = self._flights.get(key)
            return _RETRY
        finally:
            flight = future = owner = task = None
