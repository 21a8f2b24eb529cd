"""Handwritten pure-Python equivalents of opero's pieces: the anchors that are always there.

Each is what a careful user would write instead of using a library: an
``OrderedDict`` LRU, a GCRA token bucket behind a :class:`threading.Lock`, a
``try``/``except`` retry loop and the same backoff formula in Python.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

__all__ = [
    "PyBackoff",
    "PyLRU",
    "PyTokenBucket",
    "py_lru_cached",
    "py_rate_limited",
    "py_rate_limited_async",
    "py_retry",
    "py_retry_async",
]

T = TypeVar("T")

_KWMARK = object()


class PyLRU:
    """A bounded LRU mapping on :class:`collections.OrderedDict`, with an optional TTL.

    Args:
        max_size: Maximum entries; the least recently used is evicted.
        ttl: Seconds an entry lives, or ``None``.

    """

    def __init__(self, max_size: int = 1024, ttl: float | None = None) -> None:
        self._data: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self._max_size = max_size
        self._ttl = ttl
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """Return the value under ``key`` and mark it recently used; ``KeyError`` on a miss."""
        with self._lock:
            value, expires = self._data[key]
            if self._ttl is not None and time.monotonic() >= expires:
                del self._data[key]
                raise KeyError(key)
            self._data.move_to_end(key)
            return value

    def set(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, evicting the least recently used entry if full."""
        expires = time.monotonic() + self._ttl if self._ttl is not None else 0.0
        with self._lock:
            self._data[key] = (value, expires)
            self._data.move_to_end(key)
            if len(self._data) > self._max_size:
                self._data.popitem(last=False)


def py_lru_cached(
    max_size: int = 1024, ttl: float | None = None
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Memoize a function in a :class:`PyLRU`, keyed like ``functools._make_key``.

    Args:
        max_size: Maximum entries.
        ttl: Seconds an entry lives, or ``None``.

    """

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        store = PyLRU(max_size, ttl)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            key: Hashable = args
            if kwargs:
                key = (*args, _KWMARK, *kwargs.items())
            try:
                result: T = store.get(key)
                return result
            except KeyError:
                pass
            result = func(*args, **kwargs)
            store.set(key, result)
            return result

        return wrapper

    return decorate


class PyTokenBucket:
    """A GCRA token bucket in pure Python behind a :class:`threading.Lock`.

    The one reference bucket of the project: the anchor of the bench's
    ``core`` and ``ratelimit`` groups, and the oracle the tests hold the native
    :class:`opero._opero_core.TokenBucket` to. Same contract: ``burst`` tokens
    at once, then one every ``1 / rate`` seconds; over any window of T seconds
    at most ``burst + rate * T`` reservations start without waiting.

    Args:
        rate: Tokens per second (> 0, finite).
        burst: Tokens available at once (>= 1). Default 1.
        clock: Returns the time in seconds; :func:`time.monotonic` by default
            (tests pass a manual clock's ``now``).

    Raises:
        ValueError: ``rate`` or ``burst`` is out of range.

    """

    def __init__(
        self, rate: float, burst: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0.0 < rate < float("inf"):
            raise ValueError(f"rate must be > 0 and finite, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self._interval = 1.0 / rate
        self._tolerance = self._interval * (burst - 1)
        self._now = clock
        self._tat = clock()  # theoretical arrival time of the next token
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Reserve one token; return the seconds to wait before using it (0.0 if free now)."""
        with self._lock:
            now = self._now()
            tat = self._tat if self._tat > now else now
            delay = tat - self._tolerance - now
            self._tat = tat + self._interval
        return delay if delay > 0.0 else 0.0


class PyBackoff:
    """The backoff schedule ``min(max_delay, min_delay * factor**k)`` with equal jitter.

    Args:
        min_delay: Seconds before the first retry.
        max_delay: Upper bound in seconds.
        factor: Growth per retry.

    """

    def __init__(self, min_delay: float = 0.1, max_delay: float = 30.0, factor: float = 1.5):
        self._min = min_delay
        self._max = max_delay
        self._factor = factor
        self._uniform = random.Random().uniform

    def delay(self, attempt: int) -> float:
        """Return the jittered delay before retry ``attempt`` (0-based)."""
        base = min(self._max, self._min * self._factor**attempt)
        return self._uniform(base / 2, base)


def py_retry(retries: int = 3) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry a function with a plain ``try``/``except`` loop and jittered backoff.

    Args:
        retries: Retries after the first call.

    """
    schedule = PyBackoff()

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            for attempt in range(retries + 1):
                try:
                    return func(*args, **kwargs)
                except Exception:
                    if attempt == retries:
                        raise
                    time.sleep(schedule.delay(attempt))
            raise AssertionError("unreachable")

        return wrapper

    return decorate


def py_retry_async(
    retries: int = 3,
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Retry an ``async def`` function like :func:`py_retry`, awaiting the backoff.

    Args:
        retries: Retries after the first call.

    """
    schedule = PyBackoff()

    def decorate(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            for attempt in range(retries + 1):
                try:
                    return await func(*args, **kwargs)
                except Exception:
                    if attempt == retries:
                        raise
                    await asyncio.sleep(schedule.delay(attempt))
            raise AssertionError("unreachable")

        return wrapper

    return decorate


def py_rate_limited(rate: float) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Take a :class:`PyTokenBucket` token before every call, sleeping when told to.

    Args:
        rate: Calls per second.

    """
    bucket = PyTokenBucket(rate)

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            delay = bucket.reserve()
            if delay:
                time.sleep(delay)
            return func(*args, **kwargs)

        return wrapper

    return decorate


def py_rate_limited_async(
    rate: float,
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Rate-limit an ``async def`` function like :func:`py_rate_limited` (awaits the wait).

    Args:
        rate: Calls per second.

    """
    bucket = PyTokenBucket(rate)

    def decorate(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            delay = bucket.reserve()
            if delay:
                await asyncio.sleep(delay)
            return await func(*args, **kwargs)

        return wrapper

    return decorate
