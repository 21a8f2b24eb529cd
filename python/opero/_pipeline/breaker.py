"""The circuit breaker of ``@opero(circuit_breaker=...)``: :class:`CircuitBreaker`.

A breaker guards every real call of the functions it is given to (each
attempt and each fallback candidate), inside the retry loop and before the
rate-limit token (resilience4j's and Polly's order: retry outside, breaker
inside). States:

* **closed**: calls go through; each failed call (an error in
  ``failure_on``) adds one to a count of consecutive failures, a success (or
  an error outside ``failure_on``: the dependency answered) resets it. At
  ``failures`` consecutive failures the circuit opens.
* **open**: every call fails at once with
  :class:`~opero.errors.CircuitOpenError`, without calling the function or
  taking a token, for ``reset_after`` seconds.
* **half-open**: then up to ``half_open_calls`` probe calls run at once
  (others get ``CircuitOpenError``). The first probe that succeeds closes the
  circuit; a probe that fails opens it for another ``reset_after``. A
  cancelled or interrupted probe gives its slot back (local state); one that
  has not finished after ``reset_after`` seconds (a hung call, a crashed
  process) frees its slot.

Results of calls that started in another state are ignored (a call admitted
while closed that fails after the circuit opened does not extend the wait).

Speed: a closed breaker with no failures costs the generated wrapper one
attribute read (``_check``) and a test of a local; the lock is only taken
once something failed (``_enter`` then returns :data:`RESET`, so the next
success resets the count). With ``timeout=`` the native first call reads
``_gate`` (a native copy of ``_check``, set wherever ``_check`` is) instead, and
hands the call to the generated wrapper only while it is set. ``backend="redis"`` makes one
``EVALSHA`` per call (and one more after a success that ends a failure
streak or a probe), on the server's clock (:mod:`opero._pipeline.breaker_redis`);
Redis down means the local state decides (logged once per outage), Redis back
means the shared state again.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opero._opero_core import Gate
from opero._pipeline import checks as c
from opero._pipeline.callbacks import adapt_callback
from opero._pipeline.details import CallDetails
from opero.errors import CircuitOpenError, ConfigurationError

if TYPE_CHECKING:
    from opero._pipeline.breaker_redis import RedisState

__all__ = ["BACKENDS", "BreakerGuard", "CircuitBreaker"]

logger = logging.getLogger("opero")

BACKENDS = ("memory", "redis")

#: What ``_enter`` returns: 0 (or False) for an ordinary call, :data:`RESET` for a
#: call whose success must reset a failure count, else a probe's id.
Probe = Any
#: ``_enter``'s token for a closed circuit with failures counted: a success resets them.
RESET = -1

_BREAKERS: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def _bad(option: str, value: Any, need: str, example: str) -> ConfigurationError:
    return ConfigurationError(
        f"CircuitBreaker({option}={c.show(value)}) is invalid: {option} must be {need}; "
        f"for example {option}={example}."
    )


_FAILURES = c.integer(f"an int >= 1 and <= {c.MAX_COUNT}", "5", low=1)
#: The shortest ``reset_after``: below it a probe's slot (and the open period) would
#: end within the clock's resolution (1 us in Redis), so ``half_open_calls`` would not hold.
MIN_RESET_AFTER = 0.001
_RESET_AFTER = c.real(
    f"a finite number of seconds >= {MIN_RESET_AFTER:g} and <= {c.MAX_SECONDS:g}",
    "30.0",
    low=MIN_RESET_AFTER,
    high=c.MAX_SECONDS,
)
_HALF_OPEN = c.integer(f"an int >= 1 and <= {2**31 - 1}", "1", low=1, high=2**31 - 1)


def _check(checker: c.Checker, option: str, value: Any) -> Any:
    """Run an option checker, naming ``CircuitBreaker(...)`` instead of ``@opero(...)``."""
    try:
        return checker(option, value)
    except ConfigurationError as exc:
        raise ConfigurationError(
            str(exc).replace(f"@opero({option}=", f"CircuitBreaker({option}=", 1)
        ) from None


def _utf8(name: str) -> bool:
    """Whether ``name`` encodes to UTF-8 (a lone surrogate does not: no Redis key, no log line)."""
    try:
        str.encode(name, "utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _failure_on(value: Any) -> tuple[type[BaseException], ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    example = "(ConnectionError, TimeoutError)"
    need = "an Exception subclass or a non-empty tuple/list of them"
    if not items:
        raise _bad("failure_on", value, need, example)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise _bad("failure_on", value, need, example)
    return items


class CircuitBreaker:
    """A circuit breaker, shared by every function it is given to (``circuit_breaker=``).

    After ``failures`` consecutive failed calls the circuit opens: calls fail
    at once with :class:`~opero.errors.CircuitOpenError` (not retried, no
    token taken, the function not called). After ``reset_after`` seconds it
    is half-open: up to ``half_open_calls`` probe calls run at once; the
    first success closes it, a failure opens it again. Thread-safe and
    asyncio-safe (no lock is held across an ``await``).

    Args:
        failures: Consecutive failed calls that open the circuit (>= 1).
            Default 5.
        reset_after: Seconds the circuit stays open before probe calls are
            let through (>= 0.001). Default 30.0.
        half_open_calls: Probe calls allowed at once while half-open (>= 1).
            Default 1.
        failure_on: The errors that count as failures: an ``Exception``
            subclass or a tuple/list of them. Default ``(Exception,)``. Any
            other error counts as a success (the dependency answered), like
            pybreaker's ``exclude``.
        name: Names the breaker in errors and log records, and keys its
            state in Redis. Required with ``backend="redis"`` (breakers with
            the same name on the same Redis share one state); default
            ``None``.
        backend: ``"memory"`` (this process) or ``"redis"`` (every process
            and host using ``name`` on that Redis). Default ``"memory"``.
        redis_url: ``backend="redis"`` only: a Redis URL; default
            ``OPERO_REDIS_URL``, else ``redis://localhost:6379/0`` (read at
            first use).
        redis_client: ``backend="redis"`` only: a ``redis.Redis`` or
            ``redis.asyncio.Redis`` client instead of a URL.

    Raises:
        ConfigurationError: A bad argument (the message names it and the fix).

    Example:
        >>> api = CircuitBreaker(failures=3, reset_after=10.0, name="payments")
        >>> @opero(retries=2, circuit_breaker=api)
        ... def charge(order_id): ...

    """

    __slots__ = (
        "__weakref__",
        "_cause",
        "_check",
        "_clock",
        "_failures",
        "_gate",
        "_ids",
        "_lock",
        "_open_until",
        "_probes",
        "_redis",
        "backend",
        "failure_on",
        "failure_threshold",
        "half_open_calls",
        "name",
        "reset_after",
    )

    def __init__(
        self,
        failures: int = 5,
        reset_after: float = 30.0,
        half_open_calls: int = 1,
        *,
        failure_on: type[Exception] | tuple[type[Exception], ...] = (Exception,),
        name: str | None = None,
        backend: str = "memory",
        redis_url: str | None = None,
        redis_client: Any = None,
    ) -> None:
        """Validate the arguments; nothing connects before the first call."""
        self.failure_threshold: int = _check(_FAILURES, "failures", failures)
        self.reset_after: float = _check(_RESET_AFTER, "reset_after", reset_after)
        self.half_open_calls: int = _check(_HALF_OPEN, "half_open_calls", half_open_calls)
        self.failure_on = _failure_on(failure_on)
        if name is not None and (not isinstance(name, str) or not name or not _utf8(name)):
            raise _bad("name", name, "None or a non-empty str (UTF-8 encodable)", "'payments-api'")
        self.name: str | None = None if name is None else str.__str__(name)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise _bad("backend", backend, "'memory' or 'redis'", "'redis'")
        self.backend: str = backend
        if backend != "redis":
            for option, value in (("redis_url", redis_url), ("redis_client", redis_client)):
                if value is not None:
                    raise ConfigurationError(
                        f"CircuitBreaker({option}=...) is only used with backend='redis'; "
                        "add backend='redis' (and a name=) or drop it."
                    )
        #: The local state's monotonic clock in seconds (tests replace it).
        self._clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()
        self._open_until = 0.0  # 0.0: closed; else the clock's time it half-opens at
        self._failures = 0
        self._probes: dict[int, float] = {}  # probe id -> the clock's time its slot expires
        self._ids = itertools.count(1)
        self._cause: BaseException | None = None
        #: The wrapper must call ``_enter``: not closed, failures counted, or shared in Redis.
        self._check = False
        #: ``_check`` for native first calls (``TimedCall(gate=...)``): set wherever it is.
        self._gate = Gate(False)
        self._redis: RedisState | None = None
        if backend == "redis":
            if name is None:
                raise ConfigurationError(
                    "CircuitBreaker(backend='redis') needs name=: the key of the state shared "
                    "through Redis (breakers with one name share it); for example "
                    "name='payments-api'."
                )
            from opero._pipeline.breaker_redis import RedisState

            self._redis = RedisState(self, redis_url, redis_client)
            self._check = True
            self._gate.set(True)
        _BREAKERS.add(self)

    # --- reading the state ----------------------------------------------------------

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (read from Redis when shared)."""
        if self._redis is not None:
            shared = self._redis.read()
            if shared is not None:
                return shared[0]
        with self._lock:
            return self._state(self._clock())

    @property
    def failures(self) -> int:
        """The current count of consecutive failures (read from Redis when shared)."""
        if self._redis is not None:
            shared = self._redis.read()
            if shared is not None:
                return shared[1]
        return self._failures

    @property
    def retry_after(self) -> float:
        """Seconds until an open circuit lets probe calls through (0.0 otherwise)."""
        if self._redis is not None:
            shared = self._redis.read()
            if shared is not None:
                return shared[2]
        with self._lock:
            return max(0.0, self._open_until - self._clock()) if self._open_until else 0.0

    def reset(self) -> None:
        """Close the circuit and forget the failures (in Redis too when shared)."""
        if self._redis is not None:
            self._redis.reset()
        with self._lock:
            dropped = self._cause  # freed after the lock: its __del__ may call us
            self._close()
        del dropped

    def __repr__(self) -> str:
        """Show the configuration (not the state: reading it may need Redis)."""
        name = "" if self.name is None else f", name={self.name!r}"
        backend = "" if self.backend == "memory" else f", backend={self.backend!r}"
        return (
            f"CircuitBreaker(failures={self.failure_threshold}, reset_after={self.reset_after:g}, "
            f"half_open_calls={self.half_open_calls}{name}{backend})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by configuration: a copy has its own state, unless it is shared in Redis."""
        redis = self._redis
        if redis is not None and redis.connector._client is not None:
            raise TypeError(
                "a CircuitBreaker built on redis_client= cannot be pickled; use redis_url= "
                "to share it with worker processes"
            )
        return (
            _rebuild,
            (
                self.failure_threshold,
                self.reset_after,
                self.half_open_calls,
                self.failure_on,
                self.name,
                self.backend,
                None if redis is None else redis.url,
            ),
        )

    # --- the local state machine (called with the lock held) ------------------------

    def _state(self, now: float) -> str:
        if not self._open_until:
            return "closed"
        return "open" if now < self._open_until else "half_open"

    def _close(self) -> None:
        self._open_until = 0.0
        self._failures = 0
        self._probes.clear()
        self._cause = None
        self._check = self._redis is not None
        self._gate.set(self._check)

    def _open(self, now: float, cause: BaseException | None) -> None:
        self._open_until = now + self.reset_after
        self._probes.clear()
        self._cause = cause
        self._check = True
        self._gate.set(True)

    def _label(self) -> str:
        name = self.name
        if name is None:
            return "circuit breaker"
        if len(name) > 80:  # a refusal storm must not build megabyte messages
            name = name[:77] + "..."
        return f"circuit breaker {name!r}"

    def _refusal(self, function: str, retry_after: float, cause: BaseException | None) -> Exception:
        """Build the ``CircuitOpenError`` of a refused call (raised by the caller)."""
        state = (
            f"is open (it half-opens in {retry_after:.3g} s)"
            if retry_after > 0
            else f"is half-open and its {self.half_open_calls} probe call(s) are running"
        )
        error = CircuitOpenError(
            f"{self._label()} {state}; {function} was not called",
            name=self.name,
            retry_after=retry_after,
        )
        if cause is not None:
            error.__cause__ = cause
            error.__suppress_context__ = True
        return error

    def _local_enter(self, function: str) -> Probe:
        """Admit a call (``0``) or a probe (its id), or raise ``CircuitOpenError``."""
        now = self._clock()
        with self._lock:
            until = self._open_until
            if not until:
                return RESET if self._failures else 0
            cause = self._cause
            if now < until:
                wait = until - now
            else:
                probes = self._probes
                if probes:
                    for probe, expires in list(probes.items()):
                        if expires <= now:  # a probe that never finished frees its slot
                            del probes[probe]
                if len(probes) < self.half_open_calls:
                    probe = next(self._ids)
                    probes[probe] = now + self.reset_after
                    return probe
                wait = 0.0
        raise self._refusal(function, wait, cause)

    def _local_ok(self, probe: Probe) -> bool:
        """Record a success; return whether it closed the circuit."""
        # The replaced cause is freed after the lock: its __del__ (or a finalizer of
        # something its traceback holds) may call a function this breaker guards.
        with self._lock:
            dropped = self._cause
            if self._open_until:
                # Only a probe of the current half-open period closes the circuit; a call
                # that started before the circuit opened says nothing about it now.
                if not (probe and probe in self._probes):
                    return False
                self._close()
                closed = True
            else:
                if probe and probe != RESET:
                    return False  # a probe of a half-open period that another probe closed
                self._failures = 0
                self._check = self._redis is not None
                self._gate.set(self._check)
                return False
        del dropped
        if closed:
            logger.info("opero: %s closed: a probe call succeeded", self._label())
            _transition(self._label(), "closed")
        return closed

    def _local_failed(self, exc: BaseException, probe: Probe) -> bool:
        """Record a failure; return whether it opened the circuit."""
        now = self._clock()
        with self._lock:
            dropped = self._cause  # freed after the lock (see _local_ok)
            if self._open_until:
                if not (probe and probe in self._probes):
                    return False  # a late result, or a probe of an earlier period
                self._open(now, exc)
                count = 0  # a probe failed: reopened
            else:
                if probe and probe != RESET:
                    return False  # a probe of a half-open period that another probe closed
                self._failures = count = self._failures + 1
                self._check = True
                self._gate.set(True)
                if count < self.failure_threshold:
                    return False
                self._open(now, exc)
        del dropped
        self._log_open(count, exc, self.reset_after)
        return True

    def _log_open(self, count: int, exc: BaseException, seconds: float) -> None:
        """Log a WARNING: opened after ``count`` failures (0: a probe failed, reopened)."""
        why = f"opened after {count} consecutive failures" if count else "reopened: a probe failed"
        logger.warning(
            "opero: %s %s (last: %s); calls fail with CircuitOpenError for %.3g s",
            self._label(),
            why,
            _short(exc),
            seconds,
        )
        _transition(self._label(), "open")


def _transition(name: str, state: str) -> None:
    """Count a transition in ``opero.instrumentation`` (metrics and global hooks)."""
    from opero import instrumentation

    instrumentation._emit_breaker(name, state)


def _short(exc: BaseException, limit: int = 120) -> str:
    try:
        text = repr(exc)
    except Exception:  # a raising __repr__: the type names it
        text = f"<{type(exc).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rebuild(
    failures: int,
    reset_after: float,
    half_open_calls: int,
    failure_on: tuple[type[Exception], ...],
    name: str | None,
    backend: str,
    redis_url: str | None,
) -> CircuitBreaker:
    """Unpickle a :class:`CircuitBreaker` (fresh local state)."""
    return CircuitBreaker(
        failures,
        reset_after,
        half_open_calls,
        failure_on=failure_on,
        name=name,
        backend=backend,
        redis_url=redis_url,
    )


def _after_fork_in_child() -> None:
    """Give every breaker a fresh lock and no running probes (the parent's threads are gone).

    A lock held by another parent thread would stay held; a probe slot taken by
    one would keep the child's circuit half-open and refusing for ``reset_after``.
    """
    for breaker in list(_BREAKERS):
        breaker._lock = threading.Lock()
        breaker._probes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- the per-function guard the drivers call -----------------------------------------


class BreakerGuard:
    """One decorated function's view of its breaker: admit, record, fire ``on_circuit_open``.

    Args:
        breaker: The breaker.
        function: The decorated function's ``module.qualname``.
        on_circuit_open: The user's hook, or ``None``.

    """

    __slots__ = ("breaker", "function", "on_open", "shared")

    def __init__(
        self, breaker: CircuitBreaker, function: str, on_circuit_open: Callable[..., Any] | None
    ) -> None:
        self.breaker = breaker
        self.function = function
        self.on_open = adapt_callback("on_circuit_open", on_circuit_open, (1, 0))
        #: State in Redis: the async driver awaits ``aenter``/``aok``/``afailed``.
        self.shared = breaker._redis is not None

    def enter(self) -> Probe:
        """Admit one call (return its probe token) or raise ``CircuitOpenError``."""
        redis = self.breaker._redis
        if redis is not None:
            return redis.enter(self.function)
        return self.breaker._local_enter(self.function)

    def ok(self, probe: Probe) -> None:
        """Record a success of a call admitted with ``probe``."""
        redis = self.breaker._redis
        if redis is not None:
            redis.ok(probe)
        else:
            self.breaker._local_ok(probe)

    def failed(
        self,
        exc: BaseException,
        probe: Probe,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attempt: int = 1,
    ) -> None:
        """Record a failed call (an error outside ``failure_on`` counts as a success)."""
        breaker = self.breaker
        if not self._counts(exc, probe):
            self.ok(probe)
            return
        redis = breaker._redis
        opened = (
            redis.failed(exc, probe) if redis is not None else breaker._local_failed(exc, probe)
        )
        if opened:
            self.opened(exc, args, kwargs, attempt)

    def _counts(self, exc: BaseException, probe: Probe) -> bool:
        """Return whether ``exc`` is a failure (``failure_on``); a raising check frees the probe."""
        try:
            return isinstance(exc, self.breaker.failure_on)
        except BaseException:  # a failure_on class whose __instancecheck__ raises
            self.release(probe)
            raise

    def release(self, probe: Probe) -> None:
        """Give back the slot of a probe that was cancelled or interrupted (it decided nothing).

        A probe admitted through Redis is removed there without blocking an
        event loop: in one, by a task of its own (a cancelled task cannot
        reliably await the round trip); if that fails, the slot expires.
        """
        if isinstance(probe, int) and probe > 0:
            breaker = self.breaker
            with breaker._lock:
                breaker._probes.pop(probe, None)
        elif isinstance(probe, str) and self.breaker._redis is not None:
            self.breaker._redis.release(probe)

    async def aenter(self) -> Probe:
        """Async :meth:`enter` (through ``redis.asyncio`` when shared)."""
        redis = self.breaker._redis
        if redis is not None:
            return await redis.aenter(self.function)
        return self.breaker._local_enter(self.function)

    async def aok(self, probe: Probe) -> None:
        """Async :meth:`ok`."""
        redis = self.breaker._redis
        if redis is not None:
            await redis.aok(probe)
        else:
            self.breaker._local_ok(probe)

    async def afailed(
        self,
        exc: BaseException,
        probe: Probe,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attempt: int = 1,
    ) -> None:
        """Async :meth:`failed`."""
        breaker = self.breaker
        if not self._counts(exc, probe):
            await self.aok(probe)
            return
        redis = breaker._redis
        if redis is not None:
            opened = await redis.afailed(exc, probe)
        else:
            opened = breaker._local_failed(exc, probe)
        if opened:
            self.opened(exc, args, kwargs, attempt)

    def opened(
        self, exc: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any], attempt: int
    ) -> None:
        """Fire ``on_circuit_open`` (a raising hook is logged by its adapter)."""
        if self.on_open is not None:
            self.on_open(
                CallDetails(
                    function=self.function,
                    args=args,
                    kwargs=kwargs,
                    attempt=attempt,
                    exception=exc,
                    wait=self.breaker.reset_after,
                    event="circuit_open",
                )
            )


def breaker_guard(policy: Any, function: str, inner: Any = None) -> BreakerGuard | None:
    """Return the guard of a decorated function, or ``None`` without ``circuit_breaker``.

    Raises:
        ConfigurationError: ``inner`` (the function being decorated) is an
            ``@opero`` function guarded by the same breaker: each failure
            would count twice.

    """
    breaker = policy.breaker.circuit_breaker
    if breaker is None:
        return None
    try:
        inner_breaker = inner.__opero__.policy.breaker.circuit_breaker
    except Exception:  # not opero-decorated (or a hostile __getattr__)
        inner_breaker = None
    if inner_breaker is breaker:
        raise ConfigurationError(
            f"@opero(circuit_breaker=...) on {function}: the function it decorates is "
            "already guarded by the same CircuitBreaker, so each failure would count "
            "twice; keep circuit_breaker on one of the two layers."
        )
    return BreakerGuard(breaker, function, policy.callbacks.on_circuit_open)
