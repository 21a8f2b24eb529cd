"""A token bucket shared by every process of one host, for ``@opmap``.

``@opmap`` makes a rate limit global across the map's workers. Threads and
asyncio tasks share the decorated function's own bucket; worker processes
(``mode="process"``, ``"async_process"``, ``"dask"`` and process executors)
share this one instead: the GCRA state (three doubles: the theoretical arrival
time, the interval between tokens it was booked at, the last booked start) lives in a small file
mapped into memory (``/dev/shm`` when present), and every decision holds an
exclusive lock on that file: ``flock`` on POSIX, ``msvcrt.locking`` on a byte
past the state on Windows (which has no ``fcntl``). Both are released by the
system when a process dies, so a worker killed mid-decision never leaves the
bucket locked. ``time.monotonic()`` reads ``CLOCK_MONOTONIC``, which is
system-wide on Linux and macOS, so readings from different processes compare.

The limiter pickles as its path, rate and burst: a worker that unpickles it
opens the same file. It is global for the processes of one host; Dask workers
on other hosts each get their own file (a per-host bucket); use
``rate_limit_backend="redis"`` for a cluster-wide limit.

A decision costs two lock calls and a few bytes of shared memory, about
2 us here, against 5 ms or more per call for the rate limits people configure.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

#: The shared state: the theoretical arrival time, the emission interval (seconds per
#: token) of the last decision (0.0 until the first one) and the start of the latest
#: reservation that had to wait. Knowing the interval the booked tokens were spaced at
#: lets a decision at another rate rescale the debt instead of reading it at the new
#: interval (a lowered rate would otherwise turn the old debt into ``burst - 1`` extra
#: free tokens); the last booked start keeps a raised rate from slotting new calls
#: between the booked ones. The rules are those of the native bucket (rust/ratelimit.rs).
_TAT = struct.Struct("ddd")

_log = logging.getLogger("opero")

if sys.platform == "win32":
    import msvcrt

    def _lock(fd: int) -> None:
        """Take the exclusive lock on ``fd``'s lock byte, waiting for it."""
        os.lseek(fd, _TAT.size, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:  # held by another process, for microseconds: poll
                time.sleep(0.0001)  # (LK_LOCK would wait a whole second between tries)

    def _unlock(fd: int) -> None:
        """Release the lock taken by :func:`_lock`."""
        os.lseek(fd, _TAT.size, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fd: int) -> None:
        """Take the exclusive lock on ``fd``, waiting for it."""
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        """Release the lock taken by :func:`_lock`."""
        fcntl.flock(fd, fcntl.LOCK_UN)


__all__ = ["SharedTokenBucket"]


def _shm_dir() -> str | None:
    """Return a RAM-backed folder when the system has one (Linux), else the default tmp."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


#: Every live bucket of this process, so a forked child can replace their locks.
_live: weakref.WeakSet[SharedTokenBucket] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Give each bucket a fresh lock in a forked child.

    A parent thread may have held a bucket's lock at the fork (it is held around
    ``flock``, which releases the GIL); the child would inherit it locked and hang
    on its first ``reserve``. The child reopens the state file anyway (see ``_attach``).
    """
    for bucket in list(_live):
        bucket._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _rescale(tat: float, old: float, new: float, now: float) -> float:
    """Return the arrival time ``tat`` (booked at ``old`` s per token) at ``new`` s per token.

    The tokens still owed keep their number (the rule of the native bucket's
    ``set_rate``, rust/ratelimit.rs), so a rate that goes down and up again owes
    what it owed; the booked starts are kept by :meth:`SharedTokenBucket.reserve`.
    """
    if tat <= now or old <= 0.0 or old == new:
        return tat
    return now + (tat - now) / old * new


def _close_fd(fd: int, pid: int) -> None:
    """Close the state file ``fd`` opened by process ``pid`` (a collected bucket's)."""
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unlink(path: str) -> None:
    """Remove the state file, ignoring a file that is already gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class SharedTokenBucket:
    """A GCRA token bucket whose state is shared by every process of the host.

    Over any window of T seconds at most ``burst + rate * T`` reservations are
    granted without delay, whichever process makes them. It satisfies the
    ``_limiter=`` contract of ``@opero``: :meth:`reserve` returns the seconds
    the caller must wait before using the token it reserved; it never sleeps.

    Args:
        rate: Tokens per second (> 0, finite), used when ``reserve`` is given none.
        burst: Tokens available at once (>= 1). Default 1.
        path: The state file to attach to; a new one is created when ``None``
            (and removed when this object is collected or the process exits).

    """

    def __init__(self, rate: float, burst: int = 1, path: str | None = None) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        if path is None:
            fd, path = tempfile.mkstemp(prefix="opero-ratelimit-", dir=_shm_dir())
            os.write(fd, _TAT.pack(0.0, 0.0, 0.0))
            os.close(fd)
            self._finalizer: Any = weakref.finalize(self, _unlink, path)
        else:
            self._finalizer = None
        self.path = path
        self._lock = threading.Lock()
        self._pid = -1
        self._fd = -1
        self._fd_closer: Any = None  # closes _fd when the bucket is collected
        self._map: mmap.mmap | None = None
        _live.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as (rate, burst, path): the receiver attaches to the same file."""
        return (SharedTokenBucket, (self.rate, self.burst, self.path))

    def _attach(self) -> mmap.mmap:
        """Open and map the state file once per process (a forked child reopens it).

        ``flock`` locks belong to an open file description, which a forked child
        shares with its parent; each process therefore needs its own ``open``.
        """
        pid = os.getpid()
        if self._pid != pid or self._map is None:
            flags = os.O_RDWR | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                # Removed under us (a /dev/shm or tmp clean-up): start a new, full
                # bucket at the same path rather than failing every call from now on.
                # Processes still attached to the old file keep deciding on it until
                # they are replaced, so the limit may be exceeded once, by one burst.
                fd = os.open(self.path, flags | os.O_CREAT, 0o600)
                _log.warning(
                    "opero: the shared rate-limit state %s had been removed; "
                    "a new one starts with a full bucket",
                    self.path,
                )
            try:
                if os.fstat(fd).st_size < _TAT.size:  # new (or cut short): zeros are a full bucket
                    os.ftruncate(fd, _TAT.size)
                self._map = mmap.mmap(fd, _TAT.size)
            except BaseException:
                os.close(fd)
                raise
            if self._fd_closer is not None:
                self._fd_closer.detach()  # a forked parent's descriptor: not this one's
            # A bucket collected without close() (each map's, in every worker) must
            # not keep its descriptor open: one leaked per map, forever. Not at exit,
            # where a daemon thread may still be using it.
            self._fd_closer = weakref.finalize(self, _close_fd, fd, pid)
            self._fd_closer.atexit = False
            self._fd = fd
            self._pid = pid
        return self._map

    def reserve(self, rate: float | None = None) -> float:
        """Reserve one token; return the seconds to wait before using it.

        Args:
            rate: The rate to apply to this decision (tokens per second); the
                constructor's when ``None`` (a callable ``rate_limit`` passes
                its current value here).

        Returns:
            0.0 when a token is free now, else the delay in seconds.

        Raises:
            ValueError: ``rate`` is not a finite number > 0 (NaN, 0 or negative
                would otherwise poison the shared state or lift the limit).

        """
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        emission = 1.0 / (self.rate if rate is None else rate)
        if not math.isfinite(emission):
            raise ValueError(f"rate {rate!r} is too small: its interval is not finite")
        tolerance = (self.burst - 1) * emission
        with self._lock:
            shared = self._attach()
            _lock(self._fd)
            try:
                now = time.monotonic()
                stored, booked_at, last_start = _TAT.unpack_from(shared, 0)
                if booked_at <= 0.0:  # a new state (all zeros): nothing booked yet
                    last_start = -math.inf
                tat: float = max(_rescale(stored, booked_at, emission, now), now)
                # Never before one interval after the last booked start (a raised
                # rate must not slot new calls between the booked ones).
                start: float = max(tat - tolerance, last_start + emission)
                if start > now:
                    last_start = start
                _TAT.pack_into(shared, 0, tat + emission, emission, last_start)
            finally:
                _unlock(self._fd)
        return max(0.0, start - now)

    def close(self) -> None:
        """Unmap the file in this process and, in its creator, remove it."""
        with self._lock:
            if self._map is not None and self._pid == os.getpid():
                self._map.close()
                if self._fd_closer is not None:
                    self._fd_closer()  # closes self._fd, once
                    self._fd_closer = None
            self._map = None
            self._pid = -1
        if self._finalizer is not None:
            self._finalizer()
