"""Outage tracking shared by the Redis and disk backends (and the Redis rate limiter).

A service that fails is reported once per outage on the ``opero`` logger, not
once per call. While it is down, callers skip it (a cache miss, a local rate
limit) and probe it again at most every ``retry_interval`` seconds, so a dead
host costs one bounded timeout per interval instead of one per call. The first
success after an outage logs the recovery. A full connection pool (redis-py's
``MaxConnectionsError``) is never recorded as an outage: the service is up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = ["Outage", "logger", "outage_for"]

logger = logging.getLogger("opero")


class Outage:
    """Reachability of one service (a Redis URL, a cache directory).

    Args:
        what: How the service is named in log records (``"Redis at redis://..."``).
        retry_interval: Seconds between probes while the service is down (>= 0).
        clock: Monotonic clock in seconds; injectable for tests.

    """

    __slots__ = ("_clock", "_lock", "_next_probe", "down", "retry_interval", "what")

    def __init__(
        self,
        what: str,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.retry_interval = retry_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next_probe = 0.0
        self.down = False

    def should_try(self) -> bool:
        """Return whether a caller should use the service now (always when it is up).

        While down, one caller per ``retry_interval`` gets ``True`` (the probe).
        """
        if not self.down:
            return True
        now = self._clock()
        with self._lock:
            if now >= self._next_probe:
                self._next_probe = now + self.retry_interval
                return True
        return False

    def failed(self, exc: BaseException, consequence: str) -> None:
        """Record a failure; log a warning only when this starts an outage.

        Args:
            exc: The error the service raised.
            consequence: What callers get meanwhile (``"cache lookups are misses"``).

        """
        if _back_pressure(exc):  # a full connection pool: the service is up, and busy
            logger.debug("opero: %s is busy (%s); not an outage", self.what, exc)
            return
        with self._lock:
            self._next_probe = self._clock() + self.retry_interval
            if self.down:
                return
            self.down = True
        logger.warning(
            "opero: %s is unavailable (%s: %s); %s until it returns "
            "(probing every %.3g s, logged once per outage)",
            self.what,
            type(exc).__name__,
            exc,
            consequence,
            self.retry_interval,
        )

    def succeeded(self) -> None:
        """Record a success; log the recovery when it ends an outage."""
        if not self.down:
            return
        with self._lock:
            if not self.down:
                return
            self.down = False
        logger.info("opero: %s is available again", self.what)


def _back_pressure(exc: BaseException) -> bool:
    """Return whether ``exc`` is a full redis-py connection pool (never an outage)."""
    module = type(exc).__module__
    if module == "opero._connections.redis":
        from opero._connections.redis import PoolExhausted

        return isinstance(exc, PoolExhausted)
    if module.startswith("redis"):  # redis-py is installed: it raised this
        from opero._connections.redis import pool_exhausted

        return pool_exhausted(exc)
    return False


_REGISTRY: dict[tuple[str, float], Outage] = {}
_REGISTRY_LOCK = threading.Lock()


def outage_for(what: str, retry_interval: float) -> Outage:
    """Return the process-wide :class:`Outage` of one service, so it warns once per outage.

    Args:
        what: The service's name; callers using the same name share one state.
        retry_interval: Seconds between probes while it is down.

    """
    key = (what, retry_interval)
    outage = _REGISTRY.get(key)
    if outage is None:
        with _REGISTRY_LOCK:
            outage = _REGISTRY.setdefault(key, Outage(what, retry_interval))
    return outage


def _after_fork_in_child() -> None:
    """Give the child fresh locks: one held by another parent thread at fork stays held forever."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for outage in _REGISTRY.values():
        outage._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
