"""The contract between ``@opero`` and its cache backends.

A *backend* (``"memory"``, ``"redis"``, ``"disk"`` or a user object) is asked
once per decorated function, at decoration time, for a :class:`FunctionCache`
through :meth:`CacheBackend.open`. Opening must not reach any service: Redis or
the disk are touched at first use. The decorator computes the key itself:

* backends with ``stable_keys = False`` (memory) get an in-process key,
  ``opero._opero_core.make_key(args, kwargs)`` or the custom ``cache_key``'s
  result;
* backends with ``stable_keys = True`` (Redis, disk) get a ``str`` digest that
  is identical across processes, runs and machines
  (``opero._opero_core.stable_digest_call(args, kwargs)``, or
  ``stable_digest(custom_key_result)``).

``get`` returns the :data:`MISS` sentinel on a miss, never raises for one, and
never caches exceptions. A backend that fails (Redis down) acts as a miss,
reports the outage once through the ``opero`` logger, and raises
:class:`opero.errors.CacheBackendError` only in strict mode.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["MISS", "CacheBackend", "CacheInfo", "FunctionCache"]


class _Miss:
    """Type of the :data:`MISS` sentinel."""

    _instance: _Miss | None = None

    def __new__(cls) -> _Miss:
        """Return the one instance."""
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        """Show the sentinel's name."""
        return "MISS"

    def __bool__(self) -> bool:
        """Return False: the sentinel is falsy."""
        return False

    def __reduce__(self) -> str:
        """Pickle as the module-level singleton."""
        return "MISS"


MISS: Any = _Miss()
"""Returned by :meth:`FunctionCache.get` when the key is absent or expired."""


class CacheInfo(NamedTuple):
    """Counters of one decorated function's cache, like ``functools.lru_cache``'s.

    Attributes:
        hits: Lookups that returned a stored value.
        misses: Lookups that found nothing (or an expired entry).
        maxsize: The bound on entries, ``None`` for unbounded or unknown.
        currsize: Entries stored now (``-1`` when the backend cannot tell cheaply).
        evictions: Entries dropped to respect ``maxsize``.
        expirations: Entries dropped because their TTL passed.

    """

    hits: int
    misses: int
    maxsize: int | None
    currsize: int
    evictions: int = 0
    expirations: int = 0


@runtime_checkable
class FunctionCache(Protocol):
    """The cache of one decorated function in one backend."""

    def get(self, key: Any) -> Any:
        """Return the stored value, or :data:`MISS`."""
        ...

    def set(self, key: Any, value: Any) -> None:
        """Store a successful result (with the configured TTL)."""
        ...

    def delete(self, key: Any) -> bool:
        """Remove one entry; return whether it was there."""
        ...

    def clear(self) -> None:
        """Remove every entry of this function, and only those."""
        ...

    def info(self) -> CacheInfo:
        """Return the counters."""
        ...

    async def aget(self, key: Any) -> Any:
        """Async :meth:`get` (never blocks the event loop)."""
        ...

    async def aset(self, key: Any, value: Any) -> None:
        """Async :meth:`set`."""
        ...

    async def adelete(self, key: Any) -> bool:
        """Async :meth:`delete`."""
        ...


@runtime_checkable
class CacheBackend(Protocol):
    """A place where decorated functions keep their results."""

    #: ``True`` when keys must be stable digests (shared across processes).
    stable_keys: bool

    def open(
        self,
        *,
        namespace: str,
        qualname: str,
        ttl: float | None,
        max_size: int | None,
        is_async: bool,
    ) -> FunctionCache:
        """Return the cache of one function; must not touch any service yet.

        Args:
            namespace: ``cache_namespace`` (default ``"opero"``).
            qualname: The function's identity: ``module.qualname``; for a
                backend with ``stable_keys``, a local function or lambda also
                carries ``#`` and a digest of its code and closure values, so
                functions that share a name get different identities.
            ttl: Seconds an entry lives, ``None`` for no expiry.
            max_size: Bound on entries, ``None`` for unbounded.
            is_async: The decorated function is ``async def``.

        """
        ...

    def clear_namespace(self, namespace: str | None) -> None:
        """Remove every entry of ``namespace`` (all namespaces with ``None``)."""
        ...
