"""Single flight across threads for the cache backends other than memory.

The memory backend gets single flight from the native
:class:`~opero._opero_core.CachedCall`; Redis, disk and user backends go
through :class:`ThreadFlight`: concurrent misses on one key from several
threads compute once, the other threads wait and get the same result or the
same exception. A thread that re-enters a key it is computing itself computes
directly instead of waiting on itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadFlight"]


class _Flight:
    """One computation in progress: its owner thread, outcome and completion event."""

    __slots__ = ("done", "error", "owner", "value")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ThreadFlight:
    """Single flight of cache misses across the threads of one decorated function."""

    __slots__ = ("_flights", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Any, _Flight] = {}

    def do(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Run ``compute()`` once for concurrent callers of ``key``; share its outcome.

        Args:
            key: The cache key (hashable).
            compute: Computes the value and stores it in the cache before returning.

        """
        me = threading.get_ident()
        while True:
            with self._lock:
                flight = self._flights.get(key)
                owner = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight(me)
            if owner:
                break
            if flight.owner == me:
                return compute()
            flight.done.wait()
            if flight.error is None:
                return flight.value
            if isinstance(flight.error, Exception):
                raise flight.error
            # The owner was interrupted (KeyboardInterrupt...): try to compute again.
        try:
            flight.value = compute()
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
