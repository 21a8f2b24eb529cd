"""The persistent disk cache backend (``cache_backend="disk"``, ``cache_dir=``), on diskcache.

Entries live in SQLite databases (WAL mode) managed by `diskcache`_, one per
namespace under ``cache_dir`` (``<cache_dir>/ns-<namespace>/``). They survive
restarts and are shared safely by every process and thread of the host that uses the
same directory. Keys are ``{namespace}:{function identity}:{stable digest}`` (``:``
and ``%`` escaped inside the parts, see :func:`~opero.cache._entries.entry_prefix`),
identical across processes and runs; each entry is tagged with its function, so
``cache_clear()`` removes one function's entries only.

Values go through the same serializer and optional HMAC signing as the Redis backend
(:mod:`opero.cache._serializers`); diskcache stores the resulting bytes as they are.
The stores are opened with :class:`OpaqueDisk`, which hands opero raw bytes only: a
row that diskcache would unpickle (a pickled key or value, written by someone else
through diskcache's own pickle mode) is refused before any byte of it is loaded, and
a value file named outside the store's directory is neither read nor deleted. So
with a secret or the JSON serializer, nothing in the directory is unpickled before
opero has verified it. TTL is enforced on read (an expired entry is a miss) and
expired entries are culled as new ones are written; ``size_limit`` bounds the
directory's size in bytes per namespace (oldest stored entries are evicted first).
The async methods run in a worker thread (``asyncio.to_thread``) so the event loop
never waits on SQLite.

Security: an unsigned pickle cache must only be used with a directory nobody
else can write to (pickle runs code chosen by whoever wrote the bytes); set
``secret=`` (or ``OPERO_CACHE_SECRET``) or ``serializer="json"`` otherwise.

.. _diskcache: https://grantjenks.com/docs/diskcache/
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from opero._connections.health import Outage, logger, outage_for
from opero.cache._entries import CodecEntries
from opero.cache._serializers import Codec
from opero.errors import CacheBackendError, ConfigurationError

__all__ = ["DiskBackend", "DiskFunctionCache", "default_directory"]

T = TypeVar("T")

DIR_ENV = "OPERO_CACHE_DIR"
_SQLITE_TIMEOUT = 10.0  # seconds an operation waits for the SQLite lock before it is a busy miss
_BUSY_WARN_EVERY = 10.0  # seconds between two warnings about a busy store, per backend
_FIRST_PAUSE = 0.001  # seconds before the first retry of a busy store; doubles up to _MAX_PAUSE
_MAX_PAUSE = 0.05
_CHECK_EVERY = 1.0  # seconds between two looks at whether a store's database file was replaced
_PREFIX = "ns-"
_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
_LOCK = threading.Lock()
# Open stores by (directory, namespace, size limit), weakly: a namespace's SQLite
# connections are closed once its last function (and any clear in progress) is gone.
_CACHES: weakref.WeakValueDictionary[tuple[str, str, int], Any] = weakref.WeakValueDictionary()


class ForeignEntry:
    """Stands for a row opero did not write (diskcache pickle or text mode); never loaded.

    Args:
        mode: diskcache's storage mode of the row.

    """

    __slots__ = ("mode",)

    def __init__(self, mode: int) -> None:
        self.mode = mode

    def __repr__(self) -> str:
        """Name the refused mode."""
        return f"<foreign diskcache row, mode {self.mode}>"


def _opaque_disk() -> type[Any]:
    """Return :class:`OpaqueDisk`, built at first use so diskcache is imported lazily."""
    global _OPAQUE
    if _OPAQUE is not None:
        return _OPAQUE
    import diskcache  # type: ignore[import-untyped]

    class OpaqueDisk(diskcache.Disk):  # type: ignore[misc]
        """A ``diskcache.Disk`` that never unpickles and never leaves its directory.

        opero stores ``str`` keys and ``bytes`` values, which diskcache keeps
        raw (in the row, or in a value file for large ones). Anything else in
        the database was written by someone else: a pickled key raises, a
        pickled or text value becomes a :class:`ForeignEntry` (a logged miss),
        and a value file whose name points outside the directory is refused.
        """

        def get(self, key: Any, raw: bool) -> Any:
            """Return a raw key; refuse a pickled one (it is never loaded)."""
            if not raw:
                raise ValueError("opero's disk cache refuses a pickled diskcache key")
            return super().get(key, raw)

        def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
            """Return the stored bytes of a raw or binary row; anything else is foreign."""
            if mode == diskcache.core.MODE_RAW:
                return super().fetch(mode, filename, value, read)
            if mode == diskcache.core.MODE_BINARY and self._inside(filename):
                return super().fetch(mode, filename, value, read)
            return ForeignEntry(mode)

        def remove(self, file_path: Any) -> None:
            """Delete a value file, only if it lies inside the store's directory."""
            if self._inside(file_path):
                super().remove(file_path)

        def _inside(self, filename: Any) -> bool:
            """Return whether ``filename`` names a file under the store's directory."""
            if not isinstance(filename, str) or not filename:
                return False
            root = os.path.realpath(self._directory)
            full = os.path.realpath(os.path.join(root, filename))
            return full.startswith(root + os.sep)

    _OPAQUE = OpaqueDisk
    return OpaqueDisk


_OPAQUE: type[Any] | None = None


def default_directory() -> Path:
    """Return ``$OPERO_CACHE_DIR``, else ``$XDG_CACHE_HOME/opero``, else ``~/.cache/opero``."""
    explicit = os.environ.get(DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opero"


def _failure_types() -> tuple[type[BaseException], ...]:
    """Errors that mean the disk store failed (not a bug in the caller)."""
    import diskcache

    return (OSError, sqlite3.Error, diskcache.Timeout)


def busy(exc: BaseException) -> bool:
    """Return whether ``exc`` means "another connection holds the SQLite lock", not a failure.

    That is diskcache's ``Timeout`` (its ``BEGIN IMMEDIATE`` waited the whole
    SQLite timeout) or an ``OperationalError`` with SQLite's ``SQLITE_BUSY`` or
    ``SQLITE_LOCKED`` code ("database is locked", raised at once by statements
    diskcache runs without a busy timeout while it opens a store).
    """
    import diskcache

    if isinstance(exc, diskcache.Timeout):
        return True
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _database_file(cache: Any) -> tuple[int, int] | None:
    """Return the (device, inode) of a store's database file; ``None`` when it is gone."""
    try:
        stat = os.stat(os.path.join(cache.directory, "cache.db"))
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _mark_opened(cache: Any) -> None:
    """Remember which database file ``cache`` opened (see :func:`replaced`)."""
    cache.opero_file = _database_file(cache)
    cache.opero_check = time.monotonic() + _CHECK_EVERY
    cache.opero_replaced = False


def replaced(cache: Any) -> bool:
    """Return whether ``cache``'s database file was deleted or replaced since it was opened.

    Looks at the file at most every ``_CHECK_EVERY`` seconds; once replaced, stays so.
    """
    if cache.opero_replaced:
        return True
    now = time.monotonic()
    if now < cache.opero_check:
        return False
    cache.opero_check = now + _CHECK_EVERY
    try:
        current = _database_file(cache)
    except OSError:  # unreadable for now: the operation itself will say why
        return False
    if current != cache.opero_file:
        cache.opero_replaced = True
        logger.info(
            "opero: disk cache store %s was deleted or replaced; opening it afresh",
            cache.directory,
        )
    return bool(cache.opero_replaced)


class DiskBackend:
    """Cache results on disk (SQLite via diskcache), persistent and shared by local processes.

    Security: with the default pickle serializer and no secret, whoever can
    write to ``directory`` can make this process run arbitrary code. Use an
    unsigned pickle cache only in a directory nobody else can write to;
    otherwise set ``secret`` or ``serializer="json"``.

    Args:
        directory: Where the databases live (``cache_dir``); created if missing.
            ``None`` uses ``$OPERO_CACHE_DIR``, ``$XDG_CACHE_HOME/opero`` or
            ``~/.cache/opero``.
        serializer: ``"pickle"`` (default), ``"json"`` or a ``(dumps, loads)`` pair.
        secret: HMAC key (``str``/``bytes``); ``None`` reads ``OPERO_CACHE_SECRET``
            at first use; unset means values are not signed.
        strict: Raise :class:`~opero.errors.CacheBackendError` when the store
            fails (disk full, database locked too long) instead of a miss.
        size_limit: Bytes each namespace's store may use before the oldest
            entries are evicted. Default 1 GiB.
        retry_interval: Seconds between retries of a store that failed.
            Default 1.0.

    Raises:
        ConfigurationError: The directory cannot be created or written, an
            unknown serializer, or a size limit that is not a positive int.

    """

    stable_keys = True

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        serializer: Any = "pickle",
        secret: str | bytes | None = None,
        strict: bool = False,
        size_limit: int = 2**30,
        retry_interval: float = 1.0,
    ) -> None:
        self.codec = Codec(serializer, secret)
        self.strict = bool(strict)
        if isinstance(size_limit, bool) or not isinstance(size_limit, int) or size_limit <= 0:
            raise ConfigurationError(
                f"size_limit={size_limit!r} must be a positive number of bytes (int)"
            )
        self.size_limit = size_limit
        if (
            isinstance(retry_interval, bool)
            or not isinstance(retry_interval, int | float)
            or not math.isfinite(retry_interval)
            or retry_interval < 0
        ):
            raise ConfigurationError(
                f"retry_interval={retry_interval!r} must be a number of seconds >= 0"
            )
        self.retry_interval = float(retry_interval)
        if directory is not None and not isinstance(directory, str | os.PathLike):
            raise ConfigurationError(f"cache_dir={directory!r} must be a path (str or os.PathLike)")
        if directory is not None and not os.fspath(directory):
            # An unset variable (os.environ.get("CACHE_DIR", "")) would mean the current
            # directory: SQLite files wherever the process happens to run.
            raise ConfigurationError(
                "cache_dir='' is empty; pass a directory, or None for $OPERO_CACHE_DIR "
                "(else ~/.cache/opero)"
            )
        path = default_directory() if directory is None else Path(directory).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cache_dir={str(path)!r} cannot be created ({exc.strerror or exc}); "
                "pass a directory this process can create and write to"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigurationError(
                f"cache_dir={str(path)!r} is not writable; pass a directory this process "
                "can write to"
            )
        self.directory = path.resolve()
        self.outage: Outage = outage_for(f"disk cache at {self.directory}", self.retry_interval)
        self._busy_warned = -math.inf

    def store(self, namespace: str) -> Any:
        """Return the ``diskcache.Cache`` of ``namespace`` (opened at first use, then shared).

        A store whose database file was deleted or replaced since it was opened
        (``rm -rf`` of the cache directory) is opened afresh, so this process
        never keeps serving, or writing to, a database no other process sees.
        """
        key = (str(self.directory), namespace, self.size_limit)
        cache = _CACHES.get(key)
        if cache is None or replaced(cache):
            import diskcache

            with _LOCK:
                cache = _CACHES.get(key)
                if cache is None or replaced(cache):
                    cache = diskcache.Cache(
                        str(self.directory / (_PREFIX + quote(namespace, safe=""))),
                        disk=_opaque_disk(),
                        timeout=_SQLITE_TIMEOUT,
                        size_limit=self.size_limit,
                        tag_index=True,
                        eviction_policy="least-recently-stored",
                    )
                    _mark_opened(cache)
                    _CACHES[key] = cache
        return cache

    def namespaces(self) -> list[str]:
        """Return every namespace that has a store in the directory (from any process)."""
        try:
            names = [
                unquote(entry.name[len(_PREFIX) :])
                for entry in self.directory.iterdir()
                if entry.is_dir() and entry.name.startswith(_PREFIX)
            ]
        except OSError as exc:
            self.failed(exc, "listing namespaces")
            return []
        return sorted(names)

    def available(self) -> bool:
        """Return whether to use the store now (``False`` between retries of a failure)."""
        outage = self.outage
        return self.strict or not outage.down or outage.should_try()

    def run(self, operation: Callable[[], T]) -> T:
        """Run ``operation()``; retry it while the SQLite lock is busy.

        A busy lock is contention from other writers of a healthy store: the
        operation is retried (pauses of 1 ms doubling to 50 ms) until
        ``_SQLITE_TIMEOUT`` seconds have passed since the first try. Other
        errors, and a lock still busy then, propagate.
        """
        start = time.monotonic()
        pause = _FIRST_PAUSE
        while True:
            try:
                with _ForkGate.current:
                    return operation()
            except Exception as exc:
                if not busy(exc):
                    raise
                left = start + _SQLITE_TIMEOUT - time.monotonic()
                if left <= 0:
                    raise
            time.sleep(min(pause, left))
            pause = min(pause * 2, _MAX_PAUSE)

    def failed(self, exc: BaseException, action: str) -> None:
        """Handle a store error: raise in strict mode, else log once per outage.

        A lock that stayed busy (other processes writing) is never an outage:
        that call is a miss (its value is not stored), logged every 10 s at
        most, and the next call uses the store again.

        Raises:
            CacheBackendError: In strict mode, chained from ``exc``.
            BaseException: ``exc`` itself when it is not a storage error.

        """
        if not isinstance(exc, _failure_types()):
            raise exc
        if busy(exc):
            self._lock_busy(exc, action)
            return
        if self.strict:
            raise CacheBackendError(
                f"disk cache at {self.directory} failed during {action}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.outage.failed(exc, "the disk cache acts as a miss")

    def _lock_busy(self, exc: BaseException, action: str) -> None:
        """Report a lock that stayed busy: never an outage; a miss, logged every 10 s at most.

        Raises:
            CacheBackendError: In strict mode, chained from ``exc``.

        """
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.strict:
            raise CacheBackendError(
                f"disk cache at {self.directory}: {action} found the SQLite lock busy for "
                f"{_SQLITE_TIMEOUT:g} s ({detail})"
            ) from exc
        now = time.monotonic()
        if now - self._busy_warned >= _BUSY_WARN_EVERY:
            self._busy_warned = now
            logger.warning(
                "opero: disk cache at %s: %s treated as a miss: the SQLite lock stayed busy "
                "for %g s (%s; other processes are writing; logged every %g s at most)",
                self.directory,
                action,
                _SQLITE_TIMEOUT,
                detail,
                _BUSY_WARN_EVERY,
            )

    def open(
        self,
        *,
        namespace: str,
        qualname: str,
        ttl: float | None,
        max_size: int | None,
        is_async: bool,
    ) -> DiskFunctionCache:
        """Return the cache of one function; opens no database yet.

        ``max_size`` is not enforced per function: the store is bounded in
        bytes by ``size_limit``; use ``ttl`` to bound an entry's life.

        Raises:
            ConfigurationError: The namespace is too long to name its directory.

        """
        folder = _PREFIX + quote(namespace, safe="")
        if len(folder.encode()) > _NAME_MAX:
            raise ConfigurationError(
                f"cache_namespace={namespace[:40]!r}... is too long for the disk cache: its "
                f"directory name would be {len(folder.encode())} bytes (at most {_NAME_MAX}); "
                "use a shorter namespace"
            )
        return DiskFunctionCache(self, namespace, qualname, ttl)

    def clear_namespace(self, namespace: str | None) -> None:
        """Delete every entry of ``namespace``; ``None`` clears every namespace in the directory."""
        names = self.namespaces() if namespace is None else [namespace]
        for name in names:
            if not self.available():
                return
            try:
                self.run(functools.partial(self._clear_store, name))
            except Exception as exc:
                self.failed(exc, "clear")
                return
            self.outage.succeeded()

    def _clear_store(self, namespace: str) -> None:
        """Delete every entry of ``namespace``'s store."""
        self.store(namespace).clear()

    def __repr__(self) -> str:
        """Show the directory and options."""
        return (
            f"DiskBackend({str(self.directory)!r}, serializer={self.codec.name!r}, "
            f"signed={self.codec.signed}, strict={self.strict}, size_limit={self.size_limit})"
        )


class DiskFunctionCache(CodecEntries):
    """The entries of one decorated function in the disk store (see :class:`DiskBackend`).

    Args:
        backend: The backend holding the directory, codec and failure policy.
        namespace: ``cache_namespace``.
        qualname: ``module.qualname`` of the function.
        ttl: Seconds an entry lives, ``None`` for no expiry.

    """

    __slots__ = ("_store", "backend", "tag", "ttl")

    def __init__(
        self, backend: DiskBackend, namespace: str, qualname: str, ttl: float | None
    ) -> None:
        super().__init__(backend.codec, "disk", namespace, qualname)
        self.tag = self.prefix[:-1]
        self.backend = backend
        self.ttl = ttl
        self._store: Any = None

    def _get_store(self) -> Any:
        """Return the namespace's diskcache, opened at first use."""
        store = self._store
        if store is None or replaced(store):
            store = self._store = self.backend.store(self.namespace)
        return store

    def get(self, key: str) -> Any:
        """Return the value stored under ``key`` (a stable digest), or ``MISS``."""
        full = self.prefix + key
        backend = self.backend
        if backend.outage.down and not backend.available():
            return self.miss()
        try:
            data = backend.run(lambda: self._get_store().get(full))
        except Exception as exc:
            backend.failed(exc, "get")
            return self.miss()
        if backend.outage.down:
            backend.outage.succeeded()
        return self.decode(full, data)

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` with the TTL (not stored if it cannot be serialized)."""
        full = self.prefix + key
        backend = self.backend
        data = self.encode(full, value)
        if data is None:
            return
        if not backend.available():
            return
        try:
            backend.run(lambda: self._get_store().set(full, data, expire=self.ttl, tag=self.tag))
        except Exception as exc:
            backend.failed(exc, "set")
            return
        if backend.outage.down:
            backend.outage.succeeded()

    def delete(self, key: str) -> bool:
        """Remove the entry under ``key``; return whether it existed."""
        backend = self.backend
        if not backend.available():
            return False
        try:
            removed = bool(backend.run(lambda: self._get_store().delete(self.prefix + key)))
        except Exception as exc:
            backend.failed(exc, "delete")
            return False
        backend.outage.succeeded()
        return removed

    def clear(self) -> None:
        """Delete every entry of this function, and only those (by tag)."""
        backend = self.backend
        if not backend.available():
            return
        try:
            backend.run(lambda: self._get_store().evict(self.tag))
        except Exception as exc:
            backend.failed(exc, "clear")
            return
        backend.outage.succeeded()

    async def aget(self, key: str) -> Any:
        """Async :meth:`get`, in a worker thread."""
        return await asyncio.to_thread(self.get, key)

    async def aset(self, key: str, value: Any) -> None:
        """Async :meth:`set`, in a worker thread."""
        await asyncio.to_thread(self.set, key, value)

    async def adelete(self, key: str) -> bool:
        """Async :meth:`delete`, in a worker thread."""
        return await asyncio.to_thread(self.delete, key)

    async def aclear(self) -> None:
        """Async :meth:`clear`, in a worker thread."""
        await asyncio.to_thread(self.clear)


class _ForkGate:
    """Keeps ``fork()`` out of SQLite operations of this process's disk stores.

    SQLite keeps its locks' state in process memory: a child forked while
    another thread was inside a write transaction inherits a lock nobody in the
    child will ever release, so every write of the child would wait the whole
    SQLite timeout and fail. Each operation holds the gate (shared); a fork
    waits until none is running (at most ``_SQLITE_TIMEOUT`` seconds, and never
    for the forking thread's own operation) and holds new ones back meanwhile.
    """

    current: _ForkGate  # the gate of this process (a child gets a fresh one)

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._running = 0
        self._forking = False
        self._depth = threading.local()

    def __enter__(self) -> None:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            deadline = time.monotonic() + _SQLITE_TIMEOUT
            with self._cond:
                # Bounded: a signal handler of the forking thread may land here.
                while self._forking and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                # Depth first: an interrupt between the two lines must not leave the
                # count raised for good (every later fork would wait its full bound).
                self._depth.n = 1
                self._running += 1
            return
        self._depth.n = depth + 1

    def __exit__(self, *exc_info: object) -> None:
        depth = getattr(self._depth, "n", 0) - 1
        self._depth.n = depth
        if depth == 0:
            with self._cond:
                self._running -= 1
                if self._running == 0:
                    self._cond.notify_all()

    def before_fork(self) -> None:
        """Wait (bounded) until no other thread is inside an operation; hold new ones."""
        own = getattr(self._depth, "n", 0) > 0  # forking from inside an operation
        deadline = time.monotonic() + _SQLITE_TIMEOUT
        with self._cond:
            self._forking = True
            while self._running > own and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def after_fork_in_parent(self) -> None:
        """Let operations run again."""
        with self._cond:
            self._forking = False
            self._cond.notify_all()


_ForkGate.current = _ForkGate()


def _before_fork() -> None:
    _ForkGate.current.before_fork()


def _after_fork_in_parent() -> None:
    _ForkGate.current.after_fork_in_parent()


def _after_fork_in_child() -> None:
    """Give the child a fresh lock and gate (other parent threads' holds stay held).

    The diskcache stores themselves notice the new process id and open their
    own SQLite connections in the child.
    """
    global _LOCK
    _LOCK = threading.Lock()
    _ForkGate.current = _ForkGate()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
