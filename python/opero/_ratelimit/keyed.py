"""One bucket per key: ``rate_limit_key=callable(*args, **kwargs) -> str``.

:class:`KeyedBuckets` maps each key the function returns to its own bucket (a
native ``TokenBucket``, or :class:`~opero._ratelimit.windows.Windows`). A hit is
one dict lookup and the bucket's own ``reserve``; only a new key takes the lock.

The map is bounded by ``rate_limit_max_keys`` (default :data:`MAX_KEYS`). A new
key past the bound first drops buckets that are *full* again (every token back,
nothing owed): a dropped full bucket comes back full, exactly as it was, so
this never loosens a limit. Only when every bucket is still busy (more keys
active within one refill time than the bound) is the oldest busy bucket dropped:
that key starts again with a full bucket, so each drop is one extra burst (keys
cycling through more than the bound are dropped before every call of theirs,
and so are not limited at all); a warning says so once per function, with the
fix (a larger bound).

A thread that looked a full bucket up just before another thread's eviction
dropped it books in the dropped bucket; a call made meanwhile for the same key
gets a new, full bucket. Only a full bucket is dropped that way, and only while
the map is at its bound: the key may get at most one extra burst, once.

Keys longer than :data:`MAX_KEY_LENGTH` characters are replaced by a 128-bit
digest of them, so a key function returning huge strings cannot hold more than
``rate_limit_max_keys`` short strings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_KEYS", "MAX_KEY_LENGTH", "KeyedBuckets", "bucket_key"]

#: The default bound of ``rate_limit_max_keys``: live buckets per function.
MAX_KEYS = 10_000

#: Keys longer than this are stored (and sent to Redis) as a digest.
MAX_KEY_LENGTH = 256

logger = logging.getLogger("opero")

#: Every live map, so a forked child can replace their locks.
_live: weakref.WeakSet[KeyedBuckets] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Give each map a fresh lock in a forked child (a parent thread may have held one)."""
    for keyed in list(_live):
        keyed._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def bucket_key(key: Any, qualname: str) -> str:
    """Return the stored form of what the key function returned.

    A plain ``str`` up to :data:`MAX_KEY_LENGTH` characters is itself; a ``str``
    subclass is copied to a plain ``str`` (its ``__hash__``/``__eq__`` are not
    trusted); a longer one becomes ``"#" + digest``.

    Raises:
        TypeError: ``key`` is not a ``str``, naming ``rate_limit_key``.

    """
    if not isinstance(key, str):
        raise TypeError(
            f"rate_limit_key of {qualname} returned {type(key).__name__}, not str; the key "
            "function must return the bucket's name, for example "
            "rate_limit_key=lambda user, *a, **k: f'user:{user}'"
        ) from None
    text: str = str.__str__(key)
    if len(text) > MAX_KEY_LENGTH:
        raw = text.encode("utf-8", "surrogatepass")
        text = "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    return text


class KeyedBuckets:
    """A bounded map from key to bucket, each made by ``factory()``.

    Args:
        factory: Makes a new, full bucket (with ``reserve()`` and ``is_full()``).
        max_keys: The most buckets kept.
        qualname: The function's name, for messages.

    """

    __slots__ = (
        "__weakref__",
        "_factory",
        "_lock",
        "_order",
        "_skip_sweeps",
        "_warned",
        "buckets",
        "max_keys",
        "qualname",
    )

    def __init__(self, factory: Callable[[], Any], max_keys: int, qualname: str) -> None:
        self._factory = factory
        # A plain dict (in creation order): its get is the fastest lookup there is.
        self.buckets: dict[str, Any] = {}
        # The keys in creation order, for eviction (``next(iter(dict))`` would scan the
        # holes the evictions leave at the dict's front: O(n) each). A key the sweep
        # removed stays here until it reaches the front, where it is skipped.
        self._order: deque[str] = deque()
        self.max_keys = max_keys
        self.qualname = qualname
        self._warned = False
        self._skip_sweeps = 0
        # One lock per map: a sweep of a large map never stalls another function's new keys.
        self._lock = threading.Lock()
        _live.add(self)

    def __len__(self) -> int:
        """Return the number of live buckets."""
        return len(self.buckets)

    def reserve(self, key: Any) -> float:
        """Book a token in ``key``'s bucket; return the seconds to wait before using it.

        Raises:
            TypeError: ``key`` is not a ``str``.

        """
        bucket = self.buckets.get(key) if type(key) is str else None
        if bucket is None:
            bucket = self.bucket(key)
        return bucket.reserve()  # type: ignore[no-any-return]

    def bucket(self, key: Any) -> Any:
        """Return ``key``'s bucket, creating it (and making room) when it is new."""
        key = bucket_key(key, self.qualname)
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is not None:
            return bucket
        warn = False
        with self._lock:
            bucket = buckets.get(key)
            if bucket is None:
                if len(buckets) >= self.max_keys:
                    warn = self._make_room()
                bucket = buckets[key] = self._factory()
                self._order.append(key)
        if warn:
            # Logged outside the lock: a handler may itself call a keyed function.
            logger.warning(
                "opero: %s has more than rate_limit_max_keys=%d keys busy at once; the "
                "oldest busy bucket was dropped and starts full again (each drop is an extra "
                "burst for its key: the limit no longer holds); raise rate_limit_max_keys",
                self.qualname,
                self.max_keys,
            )
        return bucket

    def _make_room(self) -> bool:
        """Drop full buckets, else the oldest busy one (called with the lock held).

        Returns:
            Whether to warn (the first busy bucket this map dropped).

        """
        buckets, order = self.buckets, self._order
        while order[0] not in buckets:  # swept earlier
            order.popleft()
        if buckets[order[0]].is_full():
            del buckets[order.popleft()]
            return False
        if self._skip_sweeps > 0:
            self._skip_sweeps -= 1
        else:
            full = [k for k, b in buckets.items() if b.is_full()]
            for k in full:
                del buckets[k]
            if full:
                if len(order) > 2 * self.max_keys:  # drop the swept keys now
                    self._order = deque(k for k in order if k in buckets)
                return False
            # Everything is busy: sweep again only after an eighth of the bound
            # more keys, so a flood of new keys costs O(1) each, not O(max_keys).
            self._skip_sweeps = self.max_keys // 8
        while order[0] not in buckets:
            order.popleft()
        del buckets[order.popleft()]
        if self._warned:
            return False
        self._warned = True
        return True
