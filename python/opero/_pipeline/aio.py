"""The async driver of ``@opero`` and single flight across asyncio tasks.

:func:`build_async_call` mirrors :func:`opero._retry.build_sync_call` with the
same :class:`~opero._retry.Engine` decisions: it awaits the function and waits
with ``asyncio.sleep`` (or the private ``_asleep``), so it never blocks the
event loop. ``asyncio.CancelledError`` is a ``BaseException`` and is never
caught, retried or wrapped.

:class:`TaskFlight` makes concurrent cache misses on one key compute once: the
first task computes, the others await the same future and get the same result
or the same exception. A task that re-enters a key it is computing itself,
or whose wait would close a cycle of tasks waiting on each other, computes
directly (no deadlock). If the computing task is cancelled (or stopped by any
``BaseException`` that is not an ``Exception``), a waiter takes over instead of
inheriting it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from opero._pipeline.engine import Engine, _no_reserve, specialize
from opero._ratelimit import MIN_WAIT
from opero.cache._base import MISS

__all__ = ["TaskFlight", "build_async_call"]


def build_async_call(engine: Engine) -> Callable[..., Awaitable[Any]]:
    """Return the async function running retries, fallbacks and the rate limit (no cache)."""
    func = engine.func
    policy = engine.policy
    asleep: Callable[[float], Awaitable[Any]] = policy.asleep or asyncio.sleep
    limiter = engine.limiter
    on_success = engine.on_success
    retries = engine.retries
    fallback = engine.fallback

    async_source = limiter is not None and limiter.has_async_source

    async def take_token() -> None:
        assert limiter is not None
        delay = await limiter.areserve() if async_source else reserve()
        if delay > MIN_WAIT:
            limiter.check_wait(delay)
            await asleep(delay)

    reserve = limiter.reserve_function() if limiter is not None else _no_reserve

    if fallback is not None:

        async def acall_fallback(*args: Any, **kwargs: Any) -> Any:
            calls = fallback.candidates(args, kwargs)
            total = len(calls)
            errors: list[Exception] = []
            # The errors' tracebacks reference this frame: clear it on the way out (no cycle).
            try:
                for round_ in range(retries + 1):
                    if round_:
                        wait = engine.before_retry(errors[-1], round_ - 1)
                        if wait > 0:
                            await asleep(wait)
                    for index, (a, k) in enumerate(calls):
                        if limiter is not None:
                            await take_token()
                        try:
                            result = await func(*a, **k)
                        except Exception as exc:
                            errors.append(exc)
                            if not engine.is_retryable(exc):
                                raise engine.give_up(exc)  # noqa: B904 (unchanged, as pinned)
                            if index + 1 < total:
                                engine.log_fallback(exc, index, total)
                            continue
                        if on_success is not None:
                            on_success(result)
                        return result
                raise engine.exhausted(errors)
            finally:
                del errors, calls

        return acall_fallback

    async def retry_from(first: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Continue after the first call failed with ``first`` (the slow path)."""
        # Tracebacks of the errors reference this frame: drop its references to them
        # on the way out, or each failed call leaves a cycle for the collector.
        errors = [first]
        exc = first
        try:
            if retries == 0:
                raise engine.exhausted(errors)
            attempt = 0
            while True:
                if not engine.is_retryable(exc):
                    raise engine.give_up(exc)
                if attempt == retries:
                    raise engine.exhausted(errors)
                wait = engine.before_retry(exc, attempt)
                if wait > 0:
                    await asleep(wait)
                attempt += 1
                if limiter is not None:
                    await take_token()
                try:
                    result = await func(*args, **kwargs)
                except Exception as err:
                    errors.append(err)
                    exc = err
                    continue
                if on_success is not None:
                    on_success(result)
                return result
        finally:
            del first, errors, exc

    guard = retries > 0 or engine.on_failure is not None
    generated = specialize(
        func,
        is_async=True,
        limiter=limiter is not None,
        on_success=on_success is not None,
        guard=guard,
        namespace={
            "__opero_retry_from": retry_from,
            "__opero_take_token": take_token,
            "__opero_on_success": on_success,
        },
    )
    if generated is not None:
        return generated

    if limiter is None and on_success is None:
        if not guard:

            async def acall_plain(*args: Any, **kwargs: Any) -> Any:
                return await func(*args, **kwargs)

            return acall_plain

        async def acall_retry(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except Exception as exc:
                return await retry_from(exc, args, kwargs)

        return acall_retry

    async def acall(*args: Any, **kwargs: Any) -> Any:
        if limiter is not None:
            await take_token()
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            return await retry_from(exc, args, kwargs)
        if on_success is not None:
            on_success(result)
        return result

    return acall


class _Retry:
    """Result of a flight whose computing task was cancelled: the waiters try again."""


_RETRY = _Retry()

_STRIPES = 64  # completion counters per function, indexed by the key's hash

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
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            flight_loop, future, owner = flight
            if flight_loop is not loop or _closes_cycle(task, owner):
                # Another event loop, or a wait that would deadlock (re-entry from
                # the computing task, or a cycle of tasks): compute directly.
                return await compute()
            if task is not None:
                _task_waits[task] = (owner, future)
            try:
                result = await asyncio.shield(future)
            finally:
                if task is not None:
                    _task_waits.pop(task, None)
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
