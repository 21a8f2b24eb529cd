"""Backend names to backend objects, and the namespaces behind ``opero.clear_cache``.

``cache_backend="memory"`` is the process-wide :class:`MemoryBackend`;
``"redis"`` and ``"disk"`` build :class:`~opero.cache.RedisBackend` /
:class:`~opero.cache.DiskBackend` (imported only when chosen) from the
``cache_*`` options, one instance per distinct configuration, so functions
with the same settings share one directory handle or client (a Redis backend
without a URL, which reads ``OPERO_REDIS_URL`` at first use, is never shared). Any
object with ``open(...)`` and ``stable_keys`` is used as it is.

Every opened function cache is registered (weakly) under its namespace with
the backend that opened it; :func:`clear_cache` clears them and asks each
backend to drop the rest of the namespace (entries written by other
processes, for Redis and disk). Once the last function of a namespace is
garbage collected, nothing is kept for that namespace (a multi-tenant service
that makes one namespace per tenant does not grow).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import weakref
from typing import Any

from opero._pipeline.policy import Policy
from opero.cache._base import CacheBackend, FunctionCache
from opero.cache._memory import MemoryBackend

__all__ = ["clear_cache", "default_memory_backend", "register", "resolve_backend"]

logger = logging.getLogger("opero")

_lock = threading.Lock()
_memory = MemoryBackend()
_shared: dict[Any, CacheBackend] = {}


# namespace -> function caches (weak where possible) and backends that served it.
# A namespace's entries are pruned once its last cache has died (see _prune).
_caches: dict[str, weakref.WeakSet[Any]] = {}
_strong: dict[str, list[FunctionCache]] = {}
_backends: dict[str, list[CacheBackend]] = {}
# (namespace, id(cache)) -> a weak reference whose callback queues the pruning.
_watch: dict[tuple[str, int], weakref.ref[Any]] = {}
# Caches that died since the last prune. Filled by weakref callbacks, which may run
# inside the garbage collector while ``_lock`` is held by this very thread, so they
# only append here (atomic) and never take the lock.
_dead: list[tuple[str, int]] = []


def _on_death(namespace: str, ident: int) -> Any:
    """Return the weakref callback that queues one cache for pruning."""

    def died(_ref: Any) -> None:
        _dead.append((namespace, ident))

    return died


def _prune() -> None:
    """Forget the dead caches queued by :func:`_on_death`, and namespaces left empty.

    Called with ``_lock`` held.
    """
    while _dead:
        namespace, ident = _dead.pop()
        ref = _watch.get((namespace, ident))
        if ref is not None and ref() is None:
            del _watch[(namespace, ident)]
        caches = _caches.get(namespace)
        if (caches is None or not caches) and not _strong.get(namespace):
            _caches.pop(namespace, None)
            _strong.pop(namespace, None)
            _backends.pop(namespace, None)


def default_memory_backend() -> MemoryBackend:
    """Return the process-wide memory backend (``cache_backend="memory"``)."""
    return _memory


def resolve_backend(policy: Policy) -> CacheBackend:
    """Return the backend object for ``policy.cache_backend`` (name or object)."""
    backend = policy.cache_backend
    if not isinstance(backend, str):
        return backend  # type: ignore[no-any-return]
    if backend == "memory":
        return _memory
    if backend == "redis":
        url = policy.cache_redis_url
        module = importlib.import_module("opero.cache._redis")
        kwargs: dict[str, Any] = {
            "serializer": policy.cache_serializer,
            "secret": policy.cache_secret,
            "strict": policy.cache_strict,
        }
        if url is None:
            # The URL comes from OPERO_REDIS_URL at first use: a shared instance would
            # bind every later function to the first user's environment. Instances are
            # cheap (the Redis module pools connections per URL).
            return module.RedisBackend(None, **kwargs)  # type: ignore[no-any-return]
        if isinstance(url, str):
            return _share(
                ("redis", url, *kwargs.values()), lambda: module.RedisBackend(url, **kwargs)
            )
        return _share(
            ("redis-client", id(url), *kwargs.values()),
            lambda: module.RedisBackend(client=url, **kwargs),
        )
    module = importlib.import_module("opero.cache._disk")
    directory = policy.cache_dir
    kwargs = {
        "serializer": policy.cache_serializer,
        "secret": policy.cache_secret,
        "strict": policy.cache_strict,
    }
    return _share(
        ("disk", str(directory) if directory is not None else None, *kwargs.values()),
        lambda: module.DiskBackend(directory, **kwargs),
    )


def _share(config: tuple[Any, ...], build: Any) -> CacheBackend:
    """Return the backend built for ``config`` earlier, or build and remember it."""
    try:
        hash(config)
    except TypeError:
        return build()  # type: ignore[no-any-return]
    with _lock:
        backend = _shared.get(config)
    if backend is None:
        backend = build()
        with _lock:
            backend = _shared.setdefault(config, backend)
    return backend


def register(namespace: str, backend: CacheBackend, cache: FunctionCache) -> None:
    """Remember that ``backend`` opened ``cache`` in ``namespace`` (for :func:`clear_cache`).

    Nothing is kept for a namespace once its last function's cache is gone
    (a cache that cannot be weakly referenced is kept for the process's life).
    """
    with _lock:
        _prune()
        try:
            ref = weakref.ref(cache, _on_death(namespace, id(cache)))
        except TypeError:
            _strong.setdefault(namespace, []).append(cache)
        else:
            _caches.setdefault(namespace, weakref.WeakSet()).add(cache)
            _watch[(namespace, id(cache))] = ref
        served = _backends.setdefault(namespace, [])
        if not any(b is backend for b in served):
            served.append(backend)


def clear_cache(namespace: str | None = None) -> None:
    """Clear the cache of every ``@opero`` function, or of one namespace.

    Clears every store opened in this process (memory, Redis and disk caches
    of the decorated functions) and asks each backend used to drop the rest
    of the namespace, so Redis and disk entries written by other processes go
    too. Counters (``cache_info()``) are kept.

    Args:
        namespace: The ``cache_namespace`` to clear; ``None`` (default)
            clears every namespace of the decorated functions alive in this
            process.

    Raises:
        TypeError: ``namespace`` is not a ``str`` or ``None``.

    """
    if namespace is not None and not isinstance(namespace, str):
        raise TypeError(f"clear_cache(namespace=...) takes a str or None, got {namespace!r}")
    with _lock:
        _prune()
        names = list(_backends) if namespace is None else [namespace]
        work = [
            (
                name,
                list(_caches.get(name, ())) + list(_strong.get(name, ())),
                list(_backends.get(name, ())),
            )
            for name in names
        ]
    for name, caches, backends in work:
        for cache in caches:
            cache.clear()
        for backend in backends:
            if backend is _memory or isinstance(backend, MemoryBackend):
                continue  # its stores are the caches cleared just above
            backend.clear_namespace(name)


def _after_fork_in_child() -> None:
    """Give the child fresh locks (one held by another parent thread at fork stays held)."""
    global _lock
    _lock = threading.Lock()
    _memory._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
