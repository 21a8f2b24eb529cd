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

import asyncio
import contextlib
import math
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from opero.cache._entries import CodecEntries, escape_part
from opero.cache._health import Outage, logger, outage_for
from opero.cache._serializers import Codec
from opero.errors import CacheBackendError, ConfigurationError

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["PoolExhausted", "RedisBackend", "RedisFunctionCache", "pool_exhausted"]

T = TypeVar("T")

URL_ENV = "OPERO_REDIS_URL"
DEFAULT_URL = "redis://localhost:6379/0"
_SCAN_COUNT = 1000
_DELETE_BATCH = 500

_LOCK = threading.Lock()
# One sync client (one connection pool) per (url, timeouts) per process;
# redis-py's pool resets itself after a fork.
_SYNC_CLIENTS: dict[tuple[str, float, float, int, float], redis.Redis] = {}
# One async client per event loop per (url, timeouts): asyncio connections are
# bound to the loop that opened them. Entries of closed loops are dropped lazily.
_ASYNC_CLIENTS: dict[asyncio.AbstractEventLoop, dict[Any, redis.asyncio.Redis]] = {}


def _import_redis() -> Any:
    """Import redis-py, or explain how to install it."""
    try:
        import redis
        import redis.asyncio
    except ImportError as exc:  # pragma: no cover - redis is a declared extra
        raise ConfigurationError(
            "cache_backend='redis' needs redis-py: pip install 'opero[redis]'"
        ) from exc
    return redis


def redact(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (for log messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def validate_url(url: Any, option: str = "cache_redis_url") -> str:
    """Check a Redis URL without connecting; return it.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` or
            ``unix:///path/to.sock[?db=N]``.
        option: The option name used in the error message.

    Raises:
        ConfigurationError: Not a string, unknown scheme, bad port or bad db.

    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"{option} must be a redis:// URL string or a redis client, got {type(url).__name__}"
        )
    _import_redis()
    from redis.connection import parse_url

    fix = "use redis://host:6379/0, rediss://host:6380/0 or unix:///path/redis.sock"
    try:
        parts = urlsplit(url)
        parse_url(url)  # type: ignore[no-untyped-call]
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise ConfigurationError(f"{option}={redact(url)!r} is malformed ({exc}); {fix}") from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigurationError(f"{option}={redact(url)!r} has no host; {fix}")
        if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
            raise ConfigurationError(
                f"{option}={redact(url)!r}: the path must be a database number like /0; {fix}"
            )
    elif not parts.path:
        raise ConfigurationError(f"{option}={redact(url)!r} has no socket path; {fix}")
    return url


def _check_timeout(name: str, value: Any) -> float:
    """Return a positive finite timeout in seconds, or raise ConfigurationError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name}={value!r} must be a positive number of seconds")
    return float(value)


class PoolExhausted(Exception):
    """No connection of the client's pool became free within ``pool_timeout``.

    Redis itself is healthy (it is answering the commands that hold the
    connections): this is back-pressure, never an outage. The cache treats it
    as a miss (logged), the Redis rate limiter raises
    :class:`~opero.errors.RateLimitTimeout` rather than admit a call unchecked.
    """


def pool_exhausted(exc: BaseException) -> bool:
    """Return whether ``exc`` means "the connection pool is full", not "Redis is down".

    redis-py raises ``MaxConnectionsError`` from a plain pool at its
    ``max_connections``, and ``ConnectionError("No connection available.")`` from
    a ``BlockingConnectionPool`` whose wait timed out.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import MaxConnectionsError

    if isinstance(exc, MaxConnectionsError):
        return True
    return type(exc) is RedisConnectionError and str(exc) == "No connection available."


_POOL_WARN_EVERY = 10.0  # seconds between two warnings about a full pool (or an error answer)
_FIRST_PAUSE = 0.001  # seconds before the first retry of a full pool; doubles up to _MAX_PAUSE
_MAX_PAUSE = 0.05


def _no_retry() -> dict[str, Any]:
    """Client options: one immediate retry (a stale pooled socket after a restart), no backoff.

    redis-py's default retries 10 times with backoff, which would turn a dead
    Redis into seconds of waiting per call.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {"retry": Retry(NoBackoff(), 1)}


def _async_no_retry() -> dict[str, Any]:
    """Async twin of :func:`_no_retry`."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return {"retry": Retry(NoBackoff(), 1)}


def _is_async_client(client: Any) -> bool:
    """Return whether ``client`` is a ``redis.asyncio`` client."""
    module = type(client).__module__
    return module.startswith("redis.asyncio")


_TWIN_KWARGS = (
    "host",
    "port",
    "db",
    "username",
    "password",
    "path",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "client_name",
    "health_check_interval",
    "protocol",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
)


def _twin(client: Any, want_async: bool) -> Any:
    """Build a client of the other flavour (sync/async) that talks to the same server.

    Raises:
        ConfigurationError: The client is not a plain ``Redis`` (a cluster client,
            a custom class) so no twin can be built.

    """
    redis = _import_redis()
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        flavour = "redis.asyncio.Redis" if want_async else "redis.Redis"
        raise ConfigurationError(
            f"cache_redis_url got a {type(client).__name__} client, which cannot serve "
            f"{'async' if want_async else 'sync'} functions; pass a {flavour} (or a URL)"
        )
    options = {k: kwargs[k] for k in _TWIN_KWARGS if k in kwargs}
    kind = getattr(pool, "connection_class", None)
    kind_name = kind.__name__ if kind is not None else "Connection"
    namespace = redis.asyncio.connection if want_async else redis.connection
    connection_class = getattr(namespace, kind_name, namespace.Connection)
    if want_async:
        apool = redis.asyncio.ConnectionPool(
            connection_class=connection_class, **options, **_async_no_retry()
        )
        return redis.asyncio.Redis(connection_pool=apool)
    spool = redis.ConnectionPool(connection_class=connection_class, **options, **_no_retry())
    return redis.Redis(connection_pool=spool)


def _glob_escape(text: str) -> str:
    r"""Escape Redis glob metacharacters (``*?[]\``) for SCAN MATCH."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def check_interval(value: Any, name: str = "retry_interval") -> float:
    """Return a finite number of seconds >= 0, or raise ConfigurationError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(f"{name}={value!r} must be a number of seconds >= 0")
    return float(value)


async def _closer(
    loop: asyncio.AbstractEventLoop, key: Any, client: redis.asyncio.Redis
) -> AsyncIterator[None]:
    """Suspend until the loop shuts its async generators down, then close ``client``."""
    try:
        yield
    finally:
        with _LOCK:
            _CLOSERS.pop((loop, key), None)
            per_loop = _ASYNC_CLIENTS.get(loop)
            if per_loop is not None and per_loop.get(key) is client:
                del per_loop[key]
        try:
            await client.aclose(close_connection_pool=True)
        except Exception as exc:  # the loop is going away; report, never raise
            logger.debug("opero: closing a Redis client at loop shutdown failed: %r", exc)


# Strong references to the closers: the loop keeps only weak ones.
_CLOSERS: dict[tuple[asyncio.AbstractEventLoop, Any], AsyncIterator[None]] = {}


def _close_with_loop(loop: asyncio.AbstractEventLoop, key: Any, client: Any) -> None:
    """Close ``client``'s connections when ``loop`` shuts down (``asyncio.run`` does).

    An async generator started on ``loop`` is registered by its first-iteration
    hook; ``loop.shutdown_asyncgens()`` then closes it, which runs its
    ``finally`` inside the loop, where the client can still be awaited. Without
    this, the pooled connections of a finished loop are only dropped by the
    garbage collector, with ``ResourceWarning``s. Called with ``_LOCK`` held.
    """
    gen = _closer(loop, key, client)
    step: Any = gen.__anext__()  # registers ``gen`` with the running loop
    with contextlib.suppress(StopIteration):
        step.send(None)  # runs the body up to ``yield``, which awaits nothing
    _CLOSERS[(loop, key)] = gen


class RedisConnector:
    """Where a Redis user connects: a URL (pooled per process and loop) or a client object.

    Nothing connects at construction; clients are made at first use and shared
    by every backend and limiter using the same URL and timeouts.

    Args:
        url: A Redis URL; ``None`` reads ``OPERO_REDIS_URL`` at first use, else
            ``redis://localhost:6379/0``.
        client: A ``redis.Redis`` or ``redis.asyncio.Redis`` instead of a URL.
        socket_timeout: Seconds a command may take. Default 0.5.
        connect_timeout: Seconds a connection attempt may take. Default 0.5.
        option: The user-facing option name for error messages.
        max_connections: Connections of the pools opero builds from a URL (per
            process, and per event loop for asyncio). Default 100.
        pool_timeout: Seconds a command waits for a free connection when the
            pool is full (any client) before :class:`PoolExhausted`. Default 5.0.

    Raises:
        ConfigurationError: Malformed URL, both url and client, a client that
            is not a Redis client or decodes responses, a bad timeout or pool size.

    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        option: str = "cache_redis_url",
        max_connections: int = 100,
        pool_timeout: float = 5.0,
    ) -> None:
        self.socket_timeout = _check_timeout("socket_timeout", socket_timeout)
        self.connect_timeout = _check_timeout("connect_timeout", connect_timeout)
        self.pool_timeout = _check_timeout("pool_timeout", pool_timeout)
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise ConfigurationError(
                f"max_connections={max_connections!r} must be an int >= 1 (connections per pool)"
            )
        self.max_connections = max_connections
        if url is not None and client is not None:
            raise ConfigurationError(
                f"got both url and client; pass one ({option} takes either a URL or a client)"
            )
        self._client = client
        self._url: str | None = None
        self._sync: redis.Redis | None = None
        self._async_last: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None
        if client is not None:
            if not callable(getattr(client, "get", None)):
                raise ConfigurationError(
                    f"{option}={client!r} is neither a URL string nor a redis client"
                )
            pool = getattr(client, "connection_pool", None)
            kwargs = getattr(pool, "connection_kwargs", {})
            if isinstance(kwargs, dict) and kwargs.get("decode_responses"):
                raise ConfigurationError(
                    f"the redis client given to {option} has decode_responses=True; "
                    "opero needs bytes, so pass a client created with decode_responses=False"
                )
        elif url is not None:
            self._url = validate_url(url, option)

    @property
    def url(self) -> str:
        """The server's URL (``OPERO_REDIS_URL`` or the default, resolved at first use)."""
        if self._url is None:
            if self._client is not None:
                pool = getattr(self._client, "connection_pool", None)
                kwargs = getattr(pool, "connection_kwargs", None)
                if not isinstance(kwargs, dict):  # a cluster or custom client
                    return f"<{type(self._client).__name__} client>"
                if "path" in kwargs:
                    return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
                return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/" + str(
                    kwargs.get("db", 0)
                )
            self._url = validate_url(os.environ.get(URL_ENV) or DEFAULT_URL, URL_ENV)
        return self._url

    def sync_client(self) -> redis.Redis:
        """Return the sync client, creating (or sharing) it at first use."""
        client = self._sync
        if client is not None:
            return client
        if self._client is not None:
            client = _twin(self._client, False) if _is_async_client(self._client) else self._client
        else:
            redis = _import_redis()
            key = self._pool_key()
            with _LOCK:
                client = _SYNC_CLIENTS.get(key)
                if client is None:
                    # A blocking pool: a full pool makes callers wait for a connection
                    # (back-pressure) instead of failing with MaxConnectionsError.
                    pool = redis.BlockingConnectionPool.from_url(
                        self.url,
                        max_connections=self.max_connections,
                        timeout=self.pool_timeout,
                        socket_timeout=self.socket_timeout,
                        socket_connect_timeout=self.connect_timeout,
                        **_no_retry(),
                    )
                    client = redis.Redis(connection_pool=pool)
                    _SYNC_CLIENTS[key] = client
        self._sync = client
        return client

    def async_client(self) -> redis.asyncio.Redis:
        """Return the asyncio client of the running event loop, creating it at first use."""
        loop = asyncio.get_running_loop()
        last = self._async_last
        if last is not None and last[0] is loop:
            return last[1]
        if self._client is not None and _is_async_client(self._client):
            client = self._client
        else:
            key: Any = (
                ("client", id(self._client)) if self._client is not None else self._pool_key()
            )
            with _LOCK:
                for old in [old for old in _ASYNC_CLIENTS if old.is_closed()]:
                    del _ASYNC_CLIENTS[old]
                for closer in [c for c in _CLOSERS if c[0].is_closed()]:
                    del _CLOSERS[closer]
                per_loop = _ASYNC_CLIENTS.setdefault(loop, {})
                client = per_loop.get(key)
                if client is None:
                    if self._client is not None:
                        client = _twin(self._client, True)
                    else:
                        redis = _import_redis()
                        apool = redis.asyncio.BlockingConnectionPool.from_url(
                            self.url,
                            max_connections=self.max_connections,
                            timeout=self.pool_timeout,
                            socket_timeout=self.socket_timeout,
                            socket_connect_timeout=self.connect_timeout,
                            **_async_no_retry(),
                        )
                        client = redis.asyncio.Redis(connection_pool=apool)
                    per_loop[key] = client
                    _close_with_loop(loop, key, client)
        self._async_last = (loop, client)
        return client  # type: ignore[no-any-return]

    def _pool_key(self) -> tuple[str, float, float, int, float]:
        """Return what makes two URL-built clients interchangeable."""
        return (
            self.url,
            self.socket_timeout,
            self.connect_timeout,
            self.max_connections,
            self.pool_timeout,
        )

    def run(self, command: Callable[[redis.Redis], T]) -> T:
        """Run ``command(client)``; wait for a connection while the pool is full.

        A full pool is back-pressure from a healthy server: the command is
        retried (pauses of 1 ms doubling to 50 ms) until ``pool_timeout``
        seconds have passed since the first try. Other errors propagate.

        Raises:
            PoolExhausted: Still no free connection after ``pool_timeout``.

        """
        start = time.monotonic()
        pause = _FIRST_PAUSE
        while True:
            try:
                return command(self.sync_client())
            except Exception as exc:
                if not pool_exhausted(exc):
                    raise
                left = start + self.pool_timeout - time.monotonic()
                if left <= 0:
                    raise self._exhausted() from exc
            time.sleep(min(pause, left))
            pause = min(pause * 2, _MAX_PAUSE)

    async def arun(self, command: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """Async :meth:`run` (waits with ``asyncio.sleep``).

        Raises:
            PoolExhausted: Still no free connection after ``pool_timeout``.

        """
        start = time.monotonic()
        pause = _FIRST_PAUSE
        while True:
            try:
                return await command(self.async_client())
            except Exception as exc:
                if not pool_exhausted(exc):
                    raise
                left = start + self.pool_timeout - time.monotonic()
                if left <= 0:
                    raise self._exhausted() from exc
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _MAX_PAUSE)

    def _exhausted(self) -> PoolExhausted:
        return PoolExhausted(
            f"no connection to {redact(self.url)} became free within {self.pool_timeout:g} s "
            "(the client's connection pool is full; Redis itself answers): raise the pool's "
            "max_connections or pool_timeout"
        )


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
        redis = _import_redis()
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


# Async clients inherited through fork(): they belong to the parent's event loops and
# share its sockets, so the child never uses or closes them (kept, not collected).
_INHERITED: list[Any] = []


def _after_fork_in_child() -> None:
    """Reset what a forked child must not share: the lock and the async clients.

    Sync clients stay: redis-py's pools see the new process id and open new
    connections in the child.
    """
    global _LOCK
    _LOCK = threading.Lock()
    _INHERITED.append((dict(_ASYNC_CLIENTS), dict(_CLOSERS)))
    _ASYNC_CLIENTS.clear()
    _CLOSERS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
