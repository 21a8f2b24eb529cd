"""Native core of opero, written in Rust and built by maturin.

Kept equal to the native module (checked by ``python -m mypy.stubtest opero._opero_core``).
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, final

__all__ = [
    "__version__",
    "ManualClock",
    "coarse_monotonic",
    "Key",
    "make_key",
    "stable_digest",
    "stable_digest_call",
    "Store",
    "CachedCall",
    "Gate",
    "TimedCall",
    "FlightToken",
    "TokenBucket",
    "Backoff",
]

__version__: str

@final
class ManualClock:
    """A clock for tests that moves only when told to.

    Args:
        start: The initial reading, in seconds.
    """

    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def now(self) -> float:
        """Return the current reading, in seconds."""
    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (must be >= 0 and finite)."""

@final
class Key:
    """An exact, typed, hashable key built from call arguments.

    Two keys are equal only when the arguments are: ``1``, ``1.0`` and
    ``True`` give different keys; lists, dicts and sets are keyed by
    structure; other objects by their own ``__hash__``/``__eq__``.
    """

    def __hash__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...

def coarse_monotonic() -> float:
    """Seconds of a cheap monotonic clock: ``CLOCK_MONOTONIC_COARSE`` read from
    the vDSO on Linux (resolution one scheduler tick, 1-4 ms; same epoch as
    ``time.monotonic``), ``time.monotonic``'s clock elsewhere.

    The deadline clock of ``@opero(timeout=...)``, read once per call.
    """

def make_key(args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Key:
    """Build the in-process key of a call; keyword order does not matter.

    Positional and keyword arguments are distinct (``f(1)`` and ``f(x=1)``
    give different keys: the signature is not consulted). ``-0.0`` and
    ``0.0`` give one key (they are equal), and every NaN gives one key.
    Subclasses of builtins (``IntEnum``, ``str`` subclasses) are keyed by
    their own ``__hash__``/``__eq__``, never as the builtin. Dicts and sets
    give one key whatever their order, objects inside included.

    Raises:
        TypeError: An argument is unhashable and not a built-in container; the
            message names the argument (``args[1]`` or ``kwargs['x']``) and
            points to ``cache_key=``.
        RuntimeError: A dict, list or set changed size while it was keyed (an
            item's ``__hash__`` changed it).
        RecursionError: Containers nested deeper than 200 levels, or a
            ``__hash__`` that keys its argument again.
    """

def stable_digest(value: Any) -> str:
    """Return the stable hex digest (SHA-256 of the canonical encoding) of one value.

    Identical across processes, runs and machines. Raises ``TypeError`` for a
    value outside None/bool/int/float/str/bytes/tuple/list/dict/set/frozenset.
    """

def stable_digest_call(args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> str:
    """Return the stable hex digest of a call's arguments (keyword order ignored)."""

@final
class Store:
    """A bounded store with optional per-entry TTL; thread-safe.

    Keys are any value ``make_key`` accepts as a single argument, or a
    :class:`Key` (a plain value ``v`` and ``make_key((v,))`` are different
    keys). TTLs are measured with a monotonic timestamp that a background
    thread refreshes every millisecond (started at the first TTL check, again
    in a forked child), so an expiry may be late by about 1 ms, more when that
    thread waits for a CPU on a loaded machine.

    Args:
        max_size: The bound on entries (>= 1), ``None`` for unbounded. Default 1024.
        ttl: Seconds an entry lives (> 0, finite), ``None`` for no expiry.
        policy: What a full store evicts: ``"lru"`` (least recently used,
            the default) or ``"tinylfu"`` (W-TinyLFU: a recency window in
            front of a frequency-gated main region; needs ``max_size``).
        clock: A :class:`ManualClock` for tests; the monotonic clock by default.
    """

    def __new__(
        cls,
        max_size: int | None = 1024,
        ttl: float | None = None,
        *,
        policy: Literal["lru", "tinylfu"] = "lru",
        clock: ManualClock | None = None,
    ) -> Store: ...
    @property
    def max_size(self) -> int | None:
        """The bound on entries, ``None`` when unbounded."""
    @property
    def ttl(self) -> float | None:
        """The default time to live of an entry in seconds, ``None`` for no expiry."""
    @property
    def policy(self) -> Literal["lru", "tinylfu"]:
        """The eviction policy: ``"lru"`` or ``"tinylfu"``."""
    def get(self, key: Any, /) -> Any:
        """Return the value stored under ``key``; raise ``KeyError`` on a miss."""
    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store ``value``; ``ttl`` overrides the store's for this entry."""
    def delete(self, key: Any) -> bool:
        """Remove ``key``; return whether a live (unexpired) entry was present."""
    def clear(self) -> None:
        """Remove every entry (counters are kept)."""
    def get_call(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        """``get(make_key(args, kwargs))`` without building the Key object."""
    def set_call(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None, value: Any) -> None:
        """``set(make_key(args, kwargs), value)``."""
    def delete_call(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> bool:
        """``delete(make_key(args, kwargs))``."""
    def get_many_items(self, items: Iterable[Any], default: Any = None) -> tuple[list[Any], int]:
        """Look up many one-argument calls at once, without an exception per miss.

        Item ``x`` is looked up under ``make_key((x,))``, the key of the call
        ``f(x)``: results are shared with ``get_call((x,))`` and ``set_call``.
        Each lookup counts one hit or one miss, as a single ``get_call`` does.

        Args:
            items: An iterable of single arguments.
            default: The value put in place of a miss. Default ``None``.

        Returns:
            ``(values, hits)``: one value per item, in order (``default`` for a
            miss), and the number of hits.

        Raises:
            TypeError: An item cannot be keyed (the message names it).
        """
    def set_many_items(
        self, items: Sequence[Any], values: Sequence[Any], ttl: float | None = None
    ) -> None:
        """Store many one-argument call results at once.

        ``set_call((x,), None, v)`` for each pair ``(x, v)`` of ``zip(items, values)``.

        Args:
            items: A sized iterable of single arguments (a list or tuple).
            values: One value per item, same length.
            ttl: Seconds each entry lives, overriding the store's; ``None``
                (default) for the store's TTL.

        Raises:
            ValueError: ``items`` and ``values`` differ in length, or a bad ``ttl``.
            TypeError: An item cannot be keyed (the items before it are stored).
        """
    def info(self) -> tuple[int, int, int, int, int, int | None]:
        """Return ``(hits, misses, evictions, expirations, size, max_size)``."""
    def __getitem__(self, key: Any, /) -> Any: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: Any, /) -> bool: ...

@final
class CachedCall:
    """The native hot path of a memory-cached function.

    Calling it builds the key from the arguments (or calls ``key_func``), looks
    it up in ``store`` and returns a hit without leaving native code (calling
    ``on_hit()`` first when given). On a miss it calls ``func`` with the same
    arguments and stores a successful result; exceptions are never stored.
    Concurrent misses on one key from several threads call ``func`` once: the
    others wait (without the GIL) and get the same result or exception. If the
    computing thread is stopped by a ``BaseException`` that is not an
    ``Exception`` (``KeyboardInterrupt``...), one waiter computes instead. A
    call whose wait would deadlock (its own thread computes the key, or the
    computing thread waits on it through other threads) calls ``func`` directly.
    With ``on_error``, an ``Exception`` raised by ``func`` is handed to
    ``on_error(exc, args, kwargs)`` (as the exception being handled), whose
    result or exception is the call's: ``@opero`` passes its retry loop, so
    the first call runs ``func`` without a Python frame of opero around it.
    An exception raised binding the arguments of a Python ``func`` (it has no
    traceback: none of the function's code ran) propagates unchanged.
    ``coalesced`` counts the calls that waited on another call's computation.

    Instances have a ``__dict__`` (so ``functools.update_wrapper`` works), bind
    as methods through ``__get__``, and pickle by reference (``__reduce__``
    returns ``__qualname__``).

    Args:
        store: Where results live.
        func: Called on a miss with the call's arguments.
        key_func: Optional; called with the call's arguments, its result is the key.
        on_hit: Optional zero-argument callable called on every hit.
        on_error: Optional; called as ``on_error(exc, args, kwargs)`` when
            ``func`` raises an ``Exception``.
    """

    def __new__(
        cls,
        store: Store,
        func: Callable[..., Any],
        *,
        key_func: Callable[..., Any] | None = None,
        on_hit: Callable[[], Any] | None = None,
        on_error: Callable[[Exception, tuple[Any, ...], dict[str, Any]], Any] | None = None,
    ) -> CachedCall: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: Any, owner: type | None = None, /) -> Any: ...
    def __reduce__(self) -> str: ...
    @property
    def store(self) -> Store:
        """Where results live."""
    @property
    def func(self) -> Callable[..., Any]:
        """The wrapped function, called on a miss."""
    @property
    def coalesced(self) -> int:
        """Calls that waited on another call's computation of their key (single
        flight) and got its result or exception, since creation."""
    @property
    def bypass(self) -> bool:
        """Whether every call bypasses the store (calls ``func``, no lookup, no store)."""
    def set_bypass(self, on: bool) -> None:
        """Turn the bypass on or off (``opero.set_testing(cache=False)`` does)."""
    __dict__: dict[str, Any]

@final
class Gate:
    """A boolean flag shared between Python code and native calls.

    Args:
        value: The initial value.
    """

    def __new__(cls, value: bool = False) -> Gate: ...
    def set(self, value: bool) -> None:
        """Set the flag to ``value``."""
    def get(self) -> bool:
        """Return the flag's value (not forced: see ``set_forced``)."""
    @staticmethod
    def set_forced(value: bool) -> None:
        """Make every gate read as set for the native calls (``True``), or as its flag."""
    @staticmethod
    def forced() -> bool:
        """Return whether every gate is forced (``set_forced``)."""

@final
class TimedCall:
    """The first call of a function decorated with ``timeout=``.

    Calling it reads a coarse monotonic clock, then calls ``func`` with the
    same arguments and returns its result. If ``func`` raises an
    ``Exception``, it returns ``on_fail(exc, start, *args, **kwargs)``
    instead (``start`` is the clock reading in seconds). Other
    ``BaseException`` subclasses propagate.

    With ``gate``, a call made while the gate is set returns
    ``slow(*args, **kwargs)`` instead (no clock read, no ``on_fail``).

    Instances have a ``__dict__``, bind as methods through ``__get__`` and
    pickle by reference (``__reduce__`` returns ``__qualname__``).

    Args:
        func: The function to call.
        on_fail: Called as ``on_fail(exc, start, *args, **kwargs)`` after an
            ``Exception``.
        gate: A ``Gate``; while it is set, calls go to ``slow``.
        slow: The callable taking the calls while ``gate`` is set (required
            with ``gate``).
    """

    def __new__(
        cls,
        func: Callable[..., Any],
        on_fail: Callable[..., Any],
        *,
        gate: Gate | None = None,
        slow: Callable[..., Any] | None = None,
    ) -> TimedCall: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: Any, owner: type | None = None, /) -> Any: ...
    def __reduce__(self) -> str: ...
    @property
    def func(self) -> Callable[..., Any]:
        """The wrapped function."""
    __dict__: dict[str, Any]

@final
class FlightToken:
    """One computation in progress of a Python-level single flight (the Redis,
    disk and custom backends).

    Created by the thread that computes; the threads that wait on it go
    through :meth:`wait_begin` / :meth:`wait_end`, so a wait that would close
    a cycle of threads waiting on each other (native flights included) is
    refused and the caller computes directly.
    """

    def __new__(cls) -> FlightToken: ...
    @property
    def owner(self) -> int:
        """The ident of the thread computing (``threading.get_ident()``)."""
    @property
    def done(self) -> bool:
        """Whether :meth:`finish` was called."""
    @property
    def forked(self) -> bool:
        """Whether the token was made before a ``fork()`` (its owner thread is
        not in this process)."""
    def wait_begin(self) -> bool:
        """Start waiting on this computation from the current thread.

        Returns:
            True when the thread may wait (call :meth:`wait_end` afterwards);
            False when waiting would deadlock (the current thread computes this
            itself, or its owner waits, directly or not, on the current thread):
            compute directly instead.
        """
    def wait_end(self) -> None:
        """Stop waiting (after a True :meth:`wait_begin`)."""
    def finish(self) -> None:
        """Mark the computation finished (waits on it no longer count)."""

@final
class TokenBucket:
    """A token bucket (GCRA): ``rate`` calls per second sustained, ``burst`` at once.

    Over any window of T seconds at most ``burst + rate * T`` reservations are
    granted without delay. The bucket never sleeps: :meth:`reserve` returns how
    long the caller must wait before using the token it reserved.

    Args:
        rate: Tokens per second (finite, at least 1e-9: one per 1e9 s).
        burst: Tokens available at once (>= 1). Default 1.
        clock: A :class:`ManualClock` for tests; the monotonic clock by default.
    """

    def __new__(
        cls, rate: float, burst: int = 1, *, clock: ManualClock | None = None
    ) -> TokenBucket: ...
    @property
    def rate(self) -> float:
        """Tokens per second."""
    @property
    def burst(self) -> int:
        """Tokens available at once."""
    def set_rate(self, rate: float) -> None:
        """Change the rate from now on (at least 1e-9); waiting calls keep their start."""
    def reserve(self) -> float:
        """Reserve one token; return the seconds to wait before using it (0.0 if free now)."""
    def is_full(self) -> bool:
        """Whether every token is free now (nothing owed): such a bucket can be
        dropped and recreated full without loosening the limit."""
    def try_acquire(self) -> bool:
        """Take a token only if one is free now; return whether it was taken."""

@final
class Backoff:
    """The jittered exponential backoff schedule.

    Delay before retry ``k`` (0-based) is ``min(max_delay, min_delay * factor**k)``;
    with jitter it is drawn uniformly from ``[d/2, d]`` ("equal jitter"), never
    below 0 nor above ``max_delay``.

    Args:
        min_delay: Seconds before the first retry (>= 0, finite). Default 0.1.
        max_delay: Upper bound in seconds (>= min_delay). Default 30.0.
        factor: Growth per retry (>= 1, finite). Default 1.5.
        jitter: Whether to randomize. Default True.
        seed: Seed of the RNG for reproducible schedules; random by default.
    """

    def __new__(
        cls,
        min_delay: float = 0.1,
        max_delay: float = 30.0,
        factor: float = 1.5,
        jitter: bool = True,
        seed: int | None = None,
    ) -> Backoff: ...
    def delay(self, attempt: int) -> float:
        """Return the delay in seconds before retry ``attempt`` (0-based, >= 0)."""
    def base_delay(self, attempt: int) -> float:
        """Return the un-jittered delay ``min(max_delay, min_delay * factor**attempt)``."""
