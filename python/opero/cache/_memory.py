"""The memory backend: one native :class:`~opero._opero_core.Store` per function.

The store evicts by LRU, or by W-TinyLFU with ``cache_policy="tinylfu"``.

``@opero(cache=True)`` on a sync function does not even go through this
module's :class:`MemoryFunctionCache` on a call: the decorated function is a
native :class:`~opero._opero_core.CachedCall` over the same store, so a hit
never leaves native code. The async wrapper, ``cache_get``/``cache_delete``
and ``@opmap`` use the store directly. Keys are in-process
(``stable_keys = False``): ``make_key(args, kwargs)`` or the ``cache_key``
result.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Literal

from opero._opero_core import ManualClock, Store
from opero.cache._base import MISS, CacheInfo

__all__ = ["MemoryBackend", "MemoryFunctionCache"]


class MemoryFunctionCache:
    """The memory cache of one decorated function (a native store).

    Args:
        store: The native store holding the entries.
        namespace: The function's ``cache_namespace``.
        qualname: ``module.qualname`` of the function.

    """

    __slots__ = ("__weakref__", "namespace", "qualname", "store")

    stable_keys = False

    def __init__(self, store: Store, namespace: str, qualname: str) -> None:
        self.store = store
        self.namespace = namespace
        self.qualname = qualname

    def get(self, key: Any) -> Any:
        """Return the stored value, or :data:`~opero.cache.MISS`."""
        try:
            return self.store.get(key)
        except KeyError:
            return MISS

    def set(self, key: Any, value: Any) -> None:
        """Store a successful result (with the store's TTL)."""
        self.store.set(key, value)

    def delete(self, key: Any) -> bool:
        """Remove one entry; return whether it was there."""
        return self.store.delete(key)

    def clear(self) -> None:
        """Remove every entry of this function (the counters are kept)."""
        self.store.clear()

    def info(self) -> CacheInfo:
        """Return the counters."""
        hits, misses, evictions, expirations, size, max_size = self.store.info()
        return CacheInfo(hits, misses, max_size, size, evictions, expirations)

    async def aget(self, key: Any) -> Any:
        """Async :meth:`get` (the store never blocks)."""
        return self.get(key)

    async def aset(self, key: Any, value: Any) -> None:
        """Async :meth:`set`."""
        self.set(key, value)

    async def adelete(self, key: Any) -> bool:
        """Async :meth:`delete`."""
        return self.delete(key)

    def __repr__(self) -> str:
        return f"<MemoryFunctionCache {self.namespace}:{self.qualname} size={len(self.store)}>"


class MemoryBackend:
    """Results kept in this process, in a native bounded LRU store per function.

    The default backend (``cache_backend="memory"``). Pass an instance to
    share a test clock: ``cache_backend=MemoryBackend(clock=ManualClock())``.

    Args:
        clock: A :class:`~opero._opero_core.ManualClock` driving the TTLs of
            every store this backend opens (tests); the monotonic clock by
            default.

    """

    stable_keys = False

    def __init__(self, *, clock: ManualClock | None = None) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._opened: weakref.WeakSet[MemoryFunctionCache] = weakref.WeakSet()

    def open(
        self,
        *,
        namespace: str,
        qualname: str,
        ttl: float | None,
        max_size: int | None,
        is_async: bool,
        policy: Literal["lru", "tinylfu"] = "lru",
    ) -> MemoryFunctionCache:
        """Return a new store for one function (no service to reach).

        Args:
            namespace: ``cache_namespace``.
            qualname: ``module.qualname`` of the function.
            ttl: Seconds an entry lives, ``None`` for no expiry.
            max_size: Bound on entries, ``None`` for unbounded.
            is_async: Unused: the store serves sync and async functions alike.
            policy: What a full store evicts (``cache_policy``): ``"lru"`` or
                ``"tinylfu"``.

        """
        store = Store(max_size, ttl, policy=policy, clock=self.clock)
        cache = MemoryFunctionCache(store, namespace, qualname)
        with self._lock:
            self._opened.add(cache)
        return cache

    def clear_namespace(self, namespace: str | None) -> None:
        """Clear every store this backend opened in ``namespace`` (all with ``None``)."""
        with self._lock:
            caches = list(self._opened)
        for cache in caches:
            if namespace is None or cache.namespace == namespace:
                cache.clear()

    def __repr__(self) -> str:
        return "MemoryBackend()" if self.clock is None else f"MemoryBackend(clock={self.clock!r})"
