"""The rate-limit layer of ``@opero``: one token before every real call.

A :class:`Limiter` is built once per decorated function. Its source of tokens
is, in order of precedence:

* the private ``_limiter=`` object (``@opmap`` shares one across its workers):
  anything with ``reserve(rate=None) -> seconds`` (and optionally ``async
  areserve(rate=None)``);
* a :class:`opero._ratelimit.redis.RedisRateLimiter` when
  ``rate_limit_backend="redis"`` (shared by processes and hosts);
* with a callable ``rate_limit_key``, a :class:`~opero._ratelimit.keyed.KeyedBuckets`:
  one bucket per key the callable returns, bounded by ``rate_limit_max_keys``;
* with windows (``rate_limit=[(calls, seconds), ...]``), a
  :class:`~opero._ratelimit.windows.Windows` (shared by name like a bucket);
* a native :class:`opero._opero_core.TokenBucket`, shared process-wide by every
  function with the same ``rate_limit_key`` (the first decoration's rate and
  burst win; a later one that disagrees is logged).

A token source never sleeps: ``reserve()`` books a token and returns how long
to wait before using it; the sync driver then calls ``time.sleep`` and the
async driver awaits ``asyncio.sleep`` (a zero delay never sleeps). A callable
``rate_limit`` is read on every call; the bucket's rate changes only when the
value does. A wait longer than ``rate_max_wait`` raises
:class:`~opero.errors.RateLimitTimeout` (the token stays booked).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from opero._opero_core import TokenBucket
from opero._pipeline.checks import MAX_SECONDS, show
from opero._pipeline.policy import Policy, check_rate
from opero._ratelimit.keyed import KeyedBuckets, bucket_key
from opero._ratelimit.windows import Windows
from opero.errors import ConfigurationError, RateLimitTimeout

__all__ = ["MIN_WAIT", "Limiter", "shared_bucket"]

#: Waits shorter than this are not slept: they can only be floating-point noise
#: of the bucket arithmetic (an early native build answered 6.7e-15 s for the
#: first token of a 0.001/s bucket), far below any sleep's resolution.
MIN_WAIT = 1e-6

logger = logging.getLogger("opero")

#: The live shared buckets by ``rate_limit_key``. Weak: each limiter using a key holds
#: its bucket, so the bucket (and its entry here) goes with the last function using the
#: key, and a service that makes one key per tenant does not keep every tenant's bucket.
_buckets: weakref.WeakValueDictionary[str, TokenBucket] = weakref.WeakValueDictionary()
_buckets_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """Give a forked child a fresh registry lock (a parent thread may have held it)."""
    global _buckets_lock
    _buckets_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def shared_bucket(key: str, rate: float, burst: int) -> TokenBucket:
    """Return the process-wide bucket named ``key``, creating it on first use.

    Every live function using ``key`` shares the one bucket; once none is left, the
    bucket is freed, and a later function with that key starts a full bucket.

    Args:
        key: The ``rate_limit_key``.
        rate: Calls per second for a new bucket.
        burst: Calls allowed at once for a new bucket.

    """
    with _buckets_lock:
        bucket = _buckets.get(key)
        if bucket is None:
            bucket = _buckets[key] = TokenBucket(rate, burst)
            return bucket
    # Logged outside the lock: a handler may itself decorate a rate-limited function.
    if bucket.burst != burst or bucket.rate != rate:
        logger.warning(
            "opero: rate_limit_key=%r is already used with rate_limit=%s, rate_burst=%d; "
            "keeping those for this function too (asked for %s, %d)",
            key,
            bucket.rate,
            bucket.burst,
            rate,
            burst,
        )
    return bucket


#: The live shared window sets by ``rate_limit_key`` (weak, as :data:`_buckets`).
_window_sets: weakref.WeakValueDictionary[str, Windows] = weakref.WeakValueDictionary()


def shared_windows(key: str, windows: tuple[tuple[int, float], ...]) -> Windows:
    """Return the process-wide window set named ``key``, creating it on first use.

    The first decoration's windows win; a later one that disagrees is logged.
    """
    with _buckets_lock:
        found = _window_sets.get(key)
        if found is None:
            found = _window_sets[key] = Windows(windows)
            return found
    if found.windows != windows:  # logged outside the lock, as in shared_bucket
        logger.warning(
            "opero: rate_limit_key=%r is already used with rate_limit=%r; keeping those "
            "for this function too (asked for %r)",
            key,
            list(found.windows),
            list(windows),
        )
    return found


def _check_rate(value: Any) -> float:
    return check_rate("the rate_limit callable returned", value, error=ConfigurationError)


class Limiter:
    """Books one token before every real call of one decorated function.

    Args:
        policy: The validated options (``rate_limit``, ``rate_burst``,
            ``rate_limit_key``, ``rate_max_wait``, ``rate_limit_backend``,
            ``rate_limit_redis_url``, ``rate_limit_max_keys``, ``_limiter``).
        qualname: ``module.qualname`` of the function, for log records.

    With a callable ``rate_limit_key`` the limiter is *keyed*: :attr:`key_function`
    is that callable and :meth:`reserve_key` books a token in the bucket of the
    key it returned (the drivers call it with each call's arguments).

    """

    __slots__ = (
        "_last_rate",
        "_rate_fn",
        "bucket",
        "is_native",
        "key_function",
        "keyed",
        "max_wait",
        "qualname",
        "source",
    )

    def __init__(self, policy: Policy, qualname: str, func: Any = None) -> None:
        self.qualname = qualname
        key = policy.rate_limit_key
        # The fallback loop passes each call's arguments as given: known only per call.
        checkable = func is not None and policy.limiter is None and not policy.has_fallback
        if checkable and callable(key):
            check_key_function(key, func, qualname)
        self.max_wait = policy.rate_max_wait
        rate = policy.rate.rate_limit
        windows = rate if isinstance(rate, tuple) else None
        self._rate_fn: Callable[[], Any] | None = (
            rate if windows is None and callable(rate) else None
        )
        static_rate = (
            None
            if self._rate_fn is not None or rate is None or windows is not None
            else float(rate)  # type: ignore[arg-type]
        )
        self._last_rate: float | None = static_rate
        self.bucket: TokenBucket | None = None
        key = policy.rate_limit_key
        self.key_function: Callable[..., Any] | None = None
        self.keyed: Any = None
        # A callable rate is read on the first call; 1.0 is a placeholder until then.
        initial = static_rate if static_rate is not None else 1.0
        clock = policy.rate_clock
        if policy.limiter is not None:
            self.source: Any = policy.limiter
            self.is_native = isinstance(policy.limiter, TokenBucket)
            if self.is_native:
                self.bucket = policy.limiter
        elif policy.rate_limit_backend == "redis":
            module = importlib.import_module("opero._ratelimit.redis")
            url = policy.rate_limit_redis_url
            kwargs: dict[str, Any] = (
                {"url": url} if url is None or isinstance(url, str) else {"client": url}
            )
            if callable(key):
                self.key_function = key
            self.source = module.RedisRateLimiter(
                None if callable(key) else key,
                initial,
                policy.rate_burst,
                windows=windows,
                max_keys=policy.rate_limit_max_keys,
                **kwargs,
            )
            self.is_native = False
        elif callable(key):
            self.key_function = key
            self.keyed = KeyedBuckets(
                _factory(windows, initial, policy.rate_burst, clock),
                policy.rate_limit_max_keys,
                qualname,
            )
            self.source = self.keyed
            self.is_native = False
        elif windows is not None:
            self.source = (
                shared_windows(key, windows)
                if isinstance(key, str)
                else Windows(windows, _clock_function(clock))
            )
            self.is_native = False
        else:
            kw: dict[str, Any] = {} if clock is None else {"clock": clock}
            if key is not None:
                self.bucket = shared_bucket(key, initial, policy.rate_burst)
            else:
                self.bucket = TokenBucket(initial, policy.rate_burst, **kw)
            self.source = self.bucket
            self.is_native = True

    def reserve_function(self) -> Callable[..., float]:
        """Return the cheapest function that books a token.

        A static rate on a native bucket gives the bucket's own bound
        ``reserve`` (no Python frame on the hot path). A keyed limiter gives
        ``reserve(key) -> seconds``: with a static rate the map's own method.
        """
        if self.key_function is not None:
            if self._rate_fn is None and self.keyed is not None:
                return self.keyed.reserve  # type: ignore[no-any-return]
            return self.reserve_key
        if self._rate_fn is None and self.is_native:
            assert self.bucket is not None
            return self.bucket.reserve
        if self._rate_fn is None and isinstance(self.source, Windows):
            return self.source.reserve
        return self.reserve

    def key_map(self) -> dict[str, Any] | None:
        """Return the live key -> bucket dict when a wrapper may book in it directly.

        Only for a keyed in-memory limiter with a static rate: the bucket's own
        ``reserve()`` is then the whole booking of a known key.
        """
        if self.keyed is not None and self._rate_fn is None:
            buckets: dict[str, Any] = self.keyed.buckets
            return buckets
        return None

    def current_rate(self) -> float | None:
        """Read the callable ``rate_limit`` (validated); ``None`` for a static rate."""
        if self._rate_fn is None:
            return None
        rate = _check_rate(self._rate_fn())
        if rate != self._last_rate:
            # No lock: setting the same rate twice changes nothing (the bucket keeps
            # its schedule), and a Python lock held here could be inherited locked
            # by a child forked meanwhile, hanging its first call.
            if self.bucket is not None:
                self.bucket.set_rate(rate)
            self._last_rate = rate
        return rate

    def reserve(self) -> float:
        """Book one token and return the seconds to wait before using it."""
        rate = self.current_rate()
        if self.is_native:
            assert self.bucket is not None
            return self.bucket.reserve()
        return float(self.source.reserve(rate))

    def reserve_key(self, key: Any) -> float:
        """Book one token in the bucket of ``key`` (what the key function returned)."""
        rate = self.current_rate()
        if self.keyed is None:
            return float(self.source.reserve_key(bucket_key(key, self.qualname), rate))
        bucket = self.keyed.bucket(key)
        if rate is not None and bucket.rate != rate:
            bucket.set_rate(rate)
        return float(bucket.reserve())

    async def areserve_key(self, key: Any) -> float:
        """Async :meth:`reserve_key` (a Redis limiter books through ``areserve_key``)."""
        if self.keyed is not None:
            return self.reserve_key(key)
        rate = self.current_rate()
        return float(await self.source.areserve_key(bucket_key(key, self.qualname), rate))

    async def areserve(self) -> float:
        """Async :meth:`reserve`: uses the source's ``areserve`` when it has one."""
        rate = self.current_rate()
        if self.is_native:
            assert self.bucket is not None
            return self.bucket.reserve()
        areserve = getattr(self.source, "areserve", None)
        if areserve is not None:
            return float(await areserve(rate))
        return float(self.source.reserve(rate))

    @property
    def has_async_source(self) -> bool:
        """Whether booking a token needs an ``await`` (a Redis limiter)."""
        return (
            not self.is_native
            and self.keyed is None
            and getattr(self.source, "areserve", None) is not None
        )

    def check_wait(self, delay: float) -> None:
        """Raise :class:`RateLimitTimeout` past ``rate_max_wait`` or 1e9 s.

        The wait itself is logged once, with its fields, by the ``rate_limit_wait`` event.
        """
        if self.max_wait is not None and delay > self.max_wait:
            raise RateLimitTimeout(
                f"{self.qualname}: the next rate-limit token is {delay:.3f}s away, more than "
                f"rate_max_wait={self.max_wait}s; raise rate_max_wait or lower the call rate"
            )
        if delay > MAX_SECONDS:
            # time.sleep raises OverflowError past about 9.2e9 s: refuse, as rate_max_wait.
            raise RateLimitTimeout(
                f"{self.qualname}: the next rate-limit token is {delay:.3g}s away, more than "
                f"the longest wait opero sleeps ({MAX_SECONDS:g}s); calls refused by "
                "rate_max_wait stay booked, so this bucket owes that much"
            )


def check_key_function(key: Callable[..., Any], func: Callable[..., Any], qualname: str) -> None:
    """Raise unless ``key`` accepts the arguments a generated wrapper of ``func`` passes it.

    The caller passes ``func`` only when its first-call wrapper is generated.

    A wrapper generated with ``func``'s own parameters (no ``*args``/``**kwargs``)
    calls the key function with every parameter, positional ones by position and
    keyword-only ones by name, whatever form the caller used; a key function that
    cannot take that would fail every call. Other wrappers pass each call's
    arguments as given: nothing is known until the call.

    Raises:
        ConfigurationError: Naming ``rate_limit_key``, the parameters and the fix.

    """
    try:
        key_signature = inspect.signature(key)
        params = list(inspect.signature(func, follow_wrapped=False).parameters.values())
    except Exception:  # unreadable (a builtin): called as it is
        return
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    positional = [p.name for p in params if p.kind is not keyword_only]
    keywords = [p.name for p in params if p.kind is keyword_only]
    try:
        key_signature.bind(*positional, **{name: name for name in keywords})
    except TypeError as exc:
        shown = ", ".join(positional + [f"{name}=" for name in keywords])
        first = positional[0] if positional else "*args"
        raise ConfigurationError(
            f"@opero(rate_limit_key={show(key)}) cannot take the arguments of {qualname}"
            f"({shown}): {exc}; the key function gets every parameter of each call, "
            f"positional ones by position, for example rate_limit_key=lambda {first}, *args, "
            f"**kwargs: f'user:{{{first}}}'"
        ) from None


def _clock_function(clock: Any) -> Callable[[], float]:
    """Return the ``() -> seconds`` of a ``ManualClock`` (``time.monotonic`` without one)."""
    return time.monotonic if clock is None else clock.now


def _factory(
    windows: tuple[tuple[int, float], ...] | None, rate: float, burst: int, clock: Any
) -> Callable[[], Any]:
    """Return the maker of one new, full bucket of a keyed limiter."""
    if windows is not None:
        now = _clock_function(clock)
        return lambda: Windows(windows, now)
    if clock is None:
        return lambda: TokenBucket(rate, burst)
    return lambda: TokenBucket(rate, burst, clock=clock)
