"""The Redis cache backend (``cache_backend="redis"``), on redis-py.

Keys are ``{namespace}:{function identity}:{stable digest}`` (``:`` and ``%``
escaped inside the parts), so every process and host that decorates the same
function with the same arguments shares the entry; Redis enforces the TTL (``SET ...
PX``). Sync functions use a ``redis.Redis`` client, ``async def`` functions a
``redis.asyncio.Redis`` client; clients (and their connection pools) are created at
first use, one per URL per process (per event loop for asyncio), and reused by every
function.

Failure policy: a Redis that is down or times out is a cache miss and the
function still runs; the outage is logged once on the ``opero`` logger (not per
call), Redis is probed again at most every ``retry_interval`` seconds, and the
cache works again by itself when Redis returns. ``strict=True`` raises
:class:`opero.errors.CacheBackendError` instead. A value that cannot be
serialized is not cached (logged once per type); a corrupt, foreign or
tampered value is a miss (logged), never an exception in the caller.

Security: values are pickled by default, and unpickling runs code chosen by
whoever wrote the bytes. An unsigned pickle cache must only be used with a
Redis that nobody else can write to. Otherwise set ``secret=`` (or
``OPERO_CACHE_SECRET``): every value is then signed with HMAC-SHA256 and
verified before it is unpickled, or use ``serializer="json"``.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from opero._connections.health import Outage, logger, outage_for
from opero._connections.redis import (
    PoolExhausted,
    RedisConnector,
    check_interval,
    import_redis,
    pool_exhausted,
    redact,
)
from opero.cache._entries import CodecEntries, escape_part
from opero.cache._identity import is_private
from opero.cache._serializers import Codec
from opero.errors import CacheBackendError

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["RedisBackend", "RedisFunctionCache"]

T = TypeVar("T")

_SCAN_COUNT = 1000
_DELETE_BATCH = 500
_POOL_WARN_EVERY = 10.0  # seconds between two warnings about a full pool, per backend

_LOCK = threading.Lock()  # guards the backends' sets of opened function caches


def _glob_escape(text: str) -> str:
    r"""Escape Redis glob metacharacters (``*?[]\``) for SCAN MATCH."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class RedisBackend:
    """Cache results in Redis, shared by every process and host using the same server.

    Security: with the default pickle serializer and no secret, whoever can
    write to the Redis server can make this process run arbitrary code (pickle
    payloads). Use an unsigned pickle cache only with a Redis nobody else can
    write to; otherwise set ``secret`` (HMAC-SHA256 signing, checked before
    unpickling) or ``serializer="json"``.

    Args:
        url: ``redis://host:port/db`` (also ``rediss://``, ``unix://``). Default
            ``None``: ``OPERO_REDIS_URL``, read at first use, else
            ``redis://localhost:6379/0``.
        client: A ``redis.Redis`` or ``redis.asyncio.Redis`` to use instead of
            a URL (``decode_responses`` must be off). A client of the other
            flavour is derived from it for sync/async functions as needed.
        serializer: ``"pickle"`` (default), ``"json"`` or a ``(dumps, loads)`` pair.
        secret: HMAC key (``str``/``bytes``); ``None`` reads ``OPERO_CACHE_SECRET``
            at first use; unset means values are not signed.
        strict: Raise :class:`~opero.errors.CacheBackendError` when Redis fails,
            instead of treating it as a miss. Default ``False``.
        socket_timeout: Seconds a command may take before it counts as a failure.
            Default 0.5.
        connect_timeout: Seconds a connection attempt may take. Default 0.5.
        retry_interval: Seconds between probes of a Redis that is down (calls in
            between are misses without network). Default 1.0.
        max_connections: Connections per pool when opero builds the client
            from a URL (one pool per process, and per event loop). Default 100.
        pool_timeout: Seconds a call waits for a free connection when the
            pool is full, with any client (a full pool is back-pressure, not an
            outage); after that the lookup is a miss, logged. Default 5.0.

    Raises:
        ConfigurationError: Malformed URL, both ``url`` and ``client``, a client
            with ``decode_responses=True``, an unknown serializer or a bad timeout.

    """

    stable_keys = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        serializer: Any = "pickle",
        secret: str | bytes | None = None,
        strict: bool = False,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retry_interval: float = 1.0,
        max_connections: int = 100,
        pool_timeout: float = 5.0,
    ) -> None:
        self.codec = Codec(serializer, secret)
        self.strict = bool(strict)
        self.connector = RedisConnector(
            url,
            client=client,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            option="cache_redis_url",
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )
        self._pool_warned = -math.inf
        self._errors_warned: dict[tuple[str, str], float] = {}
        self.retry_interval = check_interval(retry_interval)
        self._outage: Outage | None = None
        # Weak: a dropped function's cache (and its namespace) is not kept here.
        self._opened: weakref.WeakSet[RedisFunctionCache] = weakref.WeakSet()

    @property
    def url(self) -> str:
        """The server's URL (``OPERO_REDIS_URL`` or the default, resolved at first use)."""
        return self.connector.url

    @property
    def outage(self) -> Outage:
        """The process-wide reachability state of this server (one warning per outage)."""
        if self._outage is None:
            self._outage = outage_for(f"Redis cache at {redact(self.url)}", self.retry_interval)
        return self._outage

    def sync_client(self) -> redis.Redis:
        """Return the sync client, creating (or sharing) it at first use."""
        return self.connector.sync_client()

    def async_client(self) -> redis.asyncio.Redis:
        """Return the asyncio client of the running event loop, creating it at first use."""
        return self.connector.async_client()

    # -- failure policy ------------------------------------------------------------

    def available(self) -> bool:
        """Return whether to talk to Redis now (``False`` between probes of an outage)."""
        outage = self.outage
        return self.strict or not outage.down or outage.should_try()

    def failed(self, exc: Exception, action: str) -> None:
        """Handle a Redis error: raise in strict mode, else log (once per outage).

        Raises:
            CacheBackendError: In strict mode, chained from ``exc``.
            Exception: ``exc`` itself when it is not a Redis or socket error.

        """
        redis = import_redis()
        if isinstance(exc, PoolExhausted) or pool_exhausted(exc):
            self._pool_full(exc, action)
            return
        if not isinstance(exc, redis.RedisError | OSError):
            raise exc
        if self.strict:
            raise CacheBackendError(
                f"Redis cache at {redact(self.url)} failed during {action}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
            self.outage.failed(exc, "the Redis cache acts as a miss")
            return
        # An error answer (OOM at maxmemory, a read-only replica, a wrong type): the
        # server is up, so no outage; warned every 10 s at most per action and error
        # type, not on every call of a busy service.
        now = time.monotonic()
        what = (action, type(exc).__name__)
        if now - self._errors_warned.get(what, -math.inf) >= _POOL_WARN_EVERY:
            self._errors_warned[what] = now
            logger.warning(
                "opero: Redis cache at %s: %s failed (%s: %s); treated as a miss "
                "(logged every %g s at most)",
                redact(self.url),
                action,
                type(exc).__name__,
                exc,
                _POOL_WARN_EVERY,
            )

    def _pool_full(self, exc: BaseException, action: str) -> None:
        """Report a pool that stayed full: never an outage; a miss, logged every 10 s at most.

        Raises:
            CacheBackendError: In strict mode, chained from ``exc``.

        """
        if self.strict:
            raise CacheBackendError(
                f"Redis cache at {redact(self.url)}: {action} found no free connection: {exc}"
            ) from exc
        now = time.monotonic()
        if now - self._pool_warned >= _POOL_WARN_EVERY:
            self._pool_warned = now
            logger.warning(
                "opero: Redis cache at %s: %s treated as a miss: %s (logged every %g s at most)",
                redact(self.url),
                action,
                exc,
                _POOL_WARN_EVERY,
            )

    # -- CacheBackend protocol -------------------------------------------------------

    def open(
        self,
        *,
        namespace: str,
        qualname: str,
        ttl: float | None,
        max_size: int | None,
        is_async: bool,
    ) -> RedisFunctionCache:
        """Return the cache of one function; does not connect.

        ``max_size`` is not enforced per function: Redis bounds memory with its
        own ``maxmemory`` policy; use ``ttl`` to bound an entry's life.
        """
        cache = RedisFunctionCache(self, namespace, qualname, ttl)
        with _LOCK:
            self._opened.add(cache)
        if is_private(qualname):
            # No other decoration or process can ever read these entries: they go with
            # the function (a decoration per request must not grow Redis without bound).
            finalizer = weakref.finalize(
                cache, _JANITOR.clear, self, _glob_escape(cache.prefix) + "*"
            )
            finalizer.atexit = False  # at exit no thread can start, and Redis may be gone
        return cache

    def clear_namespace(self, namespace: str | None) -> None:
        """Delete every entry of ``namespace`` (SCAN + UNLINK in batches, never KEYS/FLUSHDB).

        ``None`` clears every namespace of the functions this backend opened that
        are still alive in this process. The namespace is escaped as in the keys
        (``:`` and ``%`` encoded, glob metacharacters escaped for ``MATCH``), so
        ``"prices"`` never reaches ``"prices:eu"`` or ``"prices*"``.
        """
        if namespace is None:
            with _LOCK:
                names = sorted({cache.namespace for cache in self._opened})
        else:
            names = [namespace]
        for name in names:
            self.delete_matching(_glob_escape(escape_part(name) + ":") + "*")

    def delete_matching(self, pattern: str) -> int:
        """Delete the keys matching a SCAN pattern, in batches; return how many."""
        if not self.available():
            return 0
        deleted = 0
        try:
            deleted = self.connector.run(lambda client: _delete_matching(client, pattern))
        except Exception as exc:
            self.failed(exc, "clear")
            return deleted
        self.outage.succeeded()
        return deleted

    def __repr__(self) -> str:
        """Show the server (password hidden) and the options."""
        return (
            f"RedisBackend({redact(self.url)!r}, serializer={self.codec.name!r}, "
            f"signed={self.codec.signed}, strict={self.strict})"
        )


class _Janitor:
    """Deletes the Redis entries of dropped private decorations, off the caller's thread.

    A finalizer only queues the pattern (it may run in any thread, inside an event
    loop): one daemon thread runs the SCAN + UNLINK. Restarted lazily after a fork.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[RedisBackend, str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def clear(self, backend: RedisBackend, pattern: str) -> None:
        """Queue the deletion of the keys matching ``pattern`` (never raises, never blocks)."""
        self._queue.put((backend, pattern))
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="opero-redis-janitor", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # interpreter shutdown: nothing runs any more
                    logger.debug("opero: Redis clean-up of %s skipped (%s)", pattern, exc)
                    return
                self._pid, self._thread = os.getpid(), thread

    def _run(self) -> None:
        while True:
            backend, pattern = self._queue.get()
            try:
                # Straight to the server, not through the backend's failure policy: a
                # clean-up that fails (Redis gone, often at shutdown) is no outage of
                # the cache, and strict mode has no caller to raise to here.
                backend.connector.run(functools.partial(_delete_matching, pattern=pattern))
            except Exception as exc:
                logger.debug(
                    "opero: Redis cache at %s: entries %s of a dropped private decoration "
                    "were not deleted (%s: %s)",
                    redact(backend.url),
                    pattern,
                    type(exc).__name__,
                    exc,
                )


_JANITOR = _Janitor()


class RedisFunctionCache(CodecEntries):
    """The entries of one decorated function in Redis (see :class:`RedisBackend`).

    Args:
        backend: The backend holding the clients and the failure policy.
        namespace: ``cache_namespace``.
        qualname: ``module.qualname`` of the function.
        ttl: Seconds an entry lives (Redis ``PX``), ``None`` for no expiry.

    """

    __slots__ = ("backend", "px")

    def __init__(
        self, backend: RedisBackend, namespace: str, qualname: str, ttl: float | None
    ) -> None:
        super().__init__(backend.codec, "Redis", namespace, qualname)
        self.backend = backend
        self.px = None if ttl is None else max(1, round(ttl * 1000))

    def get(self, key: str) -> Any:
        """Return the value stored under ``key`` (a stable digest), or ``MISS``."""
        full = self.prefix + key
        backend = self.backend
        if backend.outage.down and not backend.available():
            return self.miss()
        try:
            data = backend.connector.run(lambda client: client.get(full))
        except Exception as exc:
            backend.failed(exc, "GET")
            return self.miss()
        if backend.outage.down:
            backend.outage.succeeded()
        return self.decode(full, data)

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` with the TTL (not stored if it cannot be serialized)."""
        full = self.prefix + key
        data = self.encode(full, value)
        backend = self.backend
        if data is None or not backend.available():
            return
        try:
            backend.connector.run(lambda client: client.set(full, data, px=self.px))
        except Exception as exc:
            backend.failed(exc, "SET")
            return
        backend.outage.succeeded()

    def delete(self, key: str) -> bool:
        """Remove the entry under ``key``; return whether it existed."""
        backend = self.backend
        if not backend.available():
            return False
        try:
            removed = backend.connector.run(lambda client: client.delete(self.prefix + key))
        except Exception as exc:
            backend.failed(exc, "DEL")
            return False
        backend.outage.succeeded()
        return bool(removed)

    def clear(self) -> None:
        """Delete every entry of this function, and only those (SCAN + UNLINK)."""
        self.backend.delete_matching(_glob_escape(self.prefix) + "*")

    async def aget(self, key: str) -> Any:
        """Async :meth:`get` through ``redis.asyncio``."""
        full = self.prefix + key
        backend = self.backend
        if backend.outage.down and not backend.available():
            return self.miss()
        try:
            data = await backend.connector.arun(lambda client: client.get(full))
        except Exception as exc:
            backend.failed(exc, "GET")
            return self.miss()
        if backend.outage.down:
            backend.outage.succeeded()
        return self.decode(full, data)

    async def aset(self, key: str, value: Any) -> None:
        """Async :meth:`set`."""
        full = self.prefix + key
        data = self.encode(full, value)
        backend = self.backend
        if data is None or not backend.available():
            return
        try:
            await backend.connector.arun(lambda client: client.set(full, data, px=self.px))
        except Exception as exc:
            backend.failed(exc, "SET")
            return
        backend.outage.succeeded()

    async def adelete(self, key: str) -> bool:
        """Async :meth:`delete`."""
        backend = self.backend
        if not backend.available():
            return False
        try:
            removed = await backend.connector.arun(lambda client: client.delete(self.prefix + key))
        except Exception as exc:
            backend.failed(exc, "DEL")
            return False
        backend.outage.succeeded()
        return bool(removed)

    async def aclear(self) -> None:
        """Async :meth:`clear` (SCAN + UNLINK through ``redis.asyncio``)."""
        backend = self.backend
        if not backend.available():
            return
        pattern = _glob_escape(self.prefix) + "*"
        try:
            await backend.connector.arun(lambda client: _adelete_matching(client, pattern))
        except Exception as exc:
            backend.failed(exc, "clear")
            return
        backend.outage.succeeded()


def _delete_matching(client: redis.Redis, pattern: str) -> int:
    """SCAN for ``pattern`` and UNLINK the keys in batches; return how many went."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=_SCAN_COUNT):
        batch.append(key)
        if len(batch) >= _DELETE_BATCH:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


async def _adelete_matching(client: redis.asyncio.Redis, pattern: str) -> int:
    """Async :func:`_delete_matching`."""
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=_SCAN_COUNT):
        batch.append(key)
        if len(batch) >= _DELETE_BATCH:
            deleted += int(await client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(await client.unlink(*batch))
    return deleted


def _after_fork_in_child() -> None:
    """Give a forked child a fresh lock (a parent thread may have held it)."""
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
