"""Per-function counters behind ``f.stats()`` and :mod:`opero.instrumentation`.

Cost model: the hot paths do no work for the counters by default. A cache hit
and a cache miss are counted by the cache store (``cache_info()``). The runs of
the uncached pipeline (an uncached call, or a cache miss that computes) are
counted by ``count()`` (an :func:`itertools.count`'s ``__next__``, atomic
under the GIL and in C) only while :func:`set_call_counting` is on: the
generated wrappers then run a variant of their code with the increment, and
without it otherwise (a ``pass``, same lines). Every other counter (retries,
waits, fallbacks, failures, rate-limit waits) moves on a slow path, under a
lock.

Derived counts for a cached function: ``calls = hits + store misses`` (always
exact); ``coalesced`` = the store misses that did not compute (callers that
waited for another caller's computation of the same key, or found its value
on a second look), read from the native ``CachedCall``'s ``coalesced``
counter when it has one, else derived from the runs while call counting is
on (store misses since it was turned on, minus runs since then);
``cache_misses = store misses - coalesced``.

Fork: a child process inherits the counters as they were at ``fork()`` and
continues from them (the locks are recreated in the child).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from opero._opero_core import Gate

__all__ = ["Counters", "FunctionStats", "live_counters"]


@dataclass(frozen=True, slots=True)
class FunctionStats:
    """The counters of one decorated function (``f.stats()``).

    Attributes:
        function: The decorated function's ``module.qualname``.
        calls: Calls of the decorated function (cache hits included).
        failures: Calls that raised (after their retries and fallbacks).
        retries: Retries made (each new round after a failed one).
        retry_waits: Backoff waits before retries that slept (``> 0`` s).
        retry_wait_seconds: Seconds of those waits.
        fallbacks: Fallback candidates that failed and were followed by the
            next one.
        rate_limit_waits: Calls that waited for a rate-limit token.
        rate_limit_wait_seconds: Seconds of those waits.
        cache_hits: Calls answered from the cache.
        cache_misses: Calls that computed the value (cache misses that ran the
            function); ``0`` without a cache.
        coalesced: Calls that missed the cache and received another caller's
            in-flight computation instead of computing (single flight).

    """

    function: str
    calls: int = 0
    failures: int = 0
    retries: int = 0
    retry_waits: int = 0
    retry_wait_seconds: float = 0.0
    fallbacks: int = 0
    rate_limit_waits: int = 0
    rate_limit_wait_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0

    def __add__(self, other: FunctionStats) -> FunctionStats:
        """Sum two snapshots (the name of the left one is kept)."""
        if not isinstance(other, FunctionStats):
            return NotImplemented
        values = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
            if f.name != "function"
        }
        return FunctionStats(self.function, **values)


#: The slow-path counters (moved under the lock).
_SLOW = (
    "failures",
    "retries",
    "retry_waits",
    "retry_wait_seconds",
    "fallbacks",
    "rate_limit_waits",
    "rate_limit_wait_seconds",
)

_live: weakref.WeakSet[Counters] = weakref.WeakSet()
_live_lock = threading.Lock()


def _count_value(counter: itertools.count[int]) -> int:
    """Return the next value of ``counter`` without taking it (its repr is ``count(n)``)."""
    text = repr(counter)
    return int(text[text.index("(") + 1 : -1])


class Counters:
    """The mutable counters of one decoration (see the module doc for the cost model).

    Args:
        function: ``module.qualname`` of the decorated function.

    """

    __slots__ = (
        "__weakref__",
        "_base",
        "_coalesced_before",
        "_miss_base",
        "_run_base",
        "cache_info",
        "coalesced_source",
        "count",
        "failures",
        "fallbacks",
        "function",
        "lock",
        "rate_limit_wait_seconds",
        "rate_limit_waits",
        "retries",
        "retry_wait_seconds",
        "retry_waits",
        "runs",
    )

    def __init__(self, function: str) -> None:
        self.function = function
        #: The runs of the uncached pipeline (``next(runs)`` per run while counting).
        self.runs = itertools.count()
        self.count: Callable[[], int] = self.runs.__next__
        self.lock = threading.Lock()
        self.failures = self.retries = self.retry_waits = 0
        self.fallbacks = self.rate_limit_waits = 0
        self.retry_wait_seconds = self.rate_limit_wait_seconds = 0.0
        #: ``() -> CacheInfo`` of the function's store, set when it has a cache.
        self.cache_info: Callable[[], Any] | None = None
        #: The native wrapper whose ``coalesced`` attribute counts coalesced waits.
        self.coalesced_source: Any = None
        #: What ``stats(reset=True)`` subtracts from the counters it cannot zero.
        self._base = FunctionStats(function)
        #: Store misses and runs when call counting was turned on (``None``: off).
        self._miss_base: int | None = 0 if CALL_COUNTING.on else None
        self._run_base = 0
        #: Coalesced waits derived during earlier periods of call counting.
        self._coalesced_before = 0
        with _live_lock:
            _live.add(self)

    # --- slow paths ----------------------------------------------------------------

    def retried(self, wait: float) -> None:
        """Count one retry and its backoff wait."""
        with self.lock:
            self.retries += 1
            if wait > 0:
                self.retry_waits += 1
                self.retry_wait_seconds += wait

    def failed(self) -> None:
        """Count one call that raised."""
        with self.lock:
            self.failures += 1

    def fell_back(self) -> None:
        """Count one failed fallback candidate followed by the next one."""
        with self.lock:
            self.fallbacks += 1

    def rate_waited(self, wait: float) -> None:
        """Count one wait for a rate-limit token."""
        with self.lock:
            self.rate_limit_waits += 1
            self.rate_limit_wait_seconds += wait

    def watch_native(self, wrapper: Any) -> None:
        """Read ``coalesced`` from ``wrapper`` when its class counts coalesced waits natively.

        Held by a weak reference: the wrapper holds these counters (no cycle).
        """
        if not hasattr(type(wrapper), "coalesced"):
            return
        try:
            self.coalesced_source = weakref.ref(wrapper)
        except TypeError:  # not weak-referenceable: derive the count instead
            self.coalesced_source = None

    # --- reading -------------------------------------------------------------------

    def raw(self) -> FunctionStats:
        """Return the counters since decoration (no reset applied)."""
        runs = _count_value(self.runs)
        with self.lock:
            slow = {name: getattr(self, name) for name in _SLOW}
        hits = misses = coalesced = 0
        calls = runs
        info = self._info()
        if info is not None:
            hits = int(getattr(info, "hits", 0) or 0)
            lookups_missed = int(getattr(info, "misses", 0) or 0)
            source = self.coalesced_source() if self.coalesced_source is not None else None
            native = getattr(source, "coalesced", None)
            if isinstance(native, int):
                coalesced = native
            else:
                coalesced = self._coalesced_before + self._derived(lookups_missed, runs)
            misses = max(0, lookups_missed - coalesced)
            calls = hits + lookups_missed
        return FunctionStats(
            self.function,
            calls=calls,
            cache_hits=hits,
            cache_misses=misses,
            coalesced=coalesced,
            **slow,
        )

    def _derived(self, lookups_missed: int, runs: int) -> int:
        """Coalesced waits since call counting was turned on (0 while it is off)."""
        if self._miss_base is None:
            return 0
        return max(0, (lookups_missed - self._miss_base) - (runs - self._run_base))

    def _info(self) -> Any:
        """Return the store's ``CacheInfo``, or ``None`` (no cache, or a backend that failed)."""
        if self.cache_info is None:
            return None
        try:
            return self.cache_info()
        except Exception:  # a user backend's info(): a scrape must not fail for it
            logging.getLogger("opero").debug(
                "opero: cache_info() of %s raised; its cache counters are left out",
                self.function,
                exc_info=True,
            )
            return None

    def _store_misses(self) -> int:
        info = self._info()
        return int(getattr(info, "misses", 0) or 0) if info is not None else 0

    def counting_changed(self, on: bool) -> None:
        """Start (or close) a period of call counting: note the baselines of the derivation."""
        runs = _count_value(self.runs)
        misses = self._store_misses()
        if on:
            if self._miss_base is None:
                self._miss_base, self._run_base = misses, runs
        elif self._miss_base is not None:
            self._coalesced_before += self._derived(misses, runs)
            self._miss_base = None

    def snapshot(self, *, reset: bool = False) -> FunctionStats:
        """Return the counters (since the last reset); with ``reset``, start again from zero."""
        raw = self.raw()
        base = self._base
        values = {
            f.name: max(getattr(raw, f.name) - getattr(base, f.name), 0)
            for f in fields(raw)
            if f.name != "function"
        }
        if reset:
            self._base = raw
        return FunctionStats(self.function, **values)


def live_counters() -> Iterator[Counters]:
    """Yield the counters of every decorated function still alive."""
    with _live_lock:
        items = list(_live)
    yield from items


def _after_fork_in_child() -> None:
    """Recreate the locks in a forked child (it continues from the parent's counts)."""
    global _live_lock, _switch_lock
    _live_lock = threading.Lock()
    _switch_lock = threading.Lock()
    for counters in list(_live):
        counters.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------
# Call counting of uncached calls: off by default (a call costs nothing), switched at run
# time for every live wrapper.


class _Flag:
    """Whether a pipeline counts its calls (read per call by the generic wrappers)."""

    __slots__ = ("always", "on")

    def __init__(self, on: bool = False) -> None:
        self.on = self.always = on


#: Read per call by the drivers' generic wrappers (the generated ones swap code instead).
CALL_COUNTING = _Flag()


def counting_flag(policy: Any) -> _Flag:
    """Return the flag a pipeline of ``policy`` reads (one for every pipeline)."""
    return CALL_COUNTING


_switch_lock = threading.Lock()
#: Generated wrapper -> [plain source, counting source, filename, plain code, counting code].
_switchable: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def counting_calls() -> bool:
    """Return whether uncached calls are counted (see :func:`set_call_counting`)."""
    return CALL_COUNTING.on


def register_switch(wrapper: Any, plain: str, counting: str, filename: str) -> None:
    """Note a generated wrapper whose call counter :func:`set_call_counting` switches."""
    with _switch_lock:
        _switchable[wrapper] = [plain, counting, filename, None, None]


def _code(source: str, filename: str) -> Any:
    """Compile ``source`` and return the code of the function it defines."""
    module = compile(source, filename, "exec")
    return next(c for c in module.co_consts if hasattr(c, "co_code"))


def set_call_counting(on: bool) -> None:
    """Count (or stop counting) the calls of uncached functions, in every live decoration.

    A cached function's calls are always counted (by its store). An uncached
    call costs one C-level increment while this is on, nothing while it is off:
    the generated wrappers get the other variant of their code (same lines).
    """
    with _switch_lock:
        CALL_COUNTING.on = bool(on)
        # A gated native first call (timeout= with a breaker) counts nothing itself:
        # while counting, every call goes to its generated wrapper, which does.
        Gate.set_forced(bool(on))
        for counters in live_counters():
            counters.counting_changed(bool(on))
        for wrapper, entry in list(_switchable.items()):
            plain, counting, filename, plain_code, counting_code = entry
            if on:
                if counting_code is None:
                    counting_code = entry[4] = _code(counting, filename)
                wrapper.__code__ = counting_code
            else:
                if plain_code is None:
                    plain_code = entry[3] = _code(plain, filename)
                wrapper.__code__ = plain_code
