"""The decisions of ``@opero``'s retry and fallback loop, written once for both drivers.

:class:`Engine` holds every decision (is this error retryable, which call comes
next, how long to wait before it, what to raise when every call failed, how
long to wait for a rate-limit token) and fires the callbacks. The drivers,
:mod:`opero._pipeline.sync` and :mod:`opero._pipeline.aio`, are short loops
over :meth:`Engine.after_failure`: they only differ in how they call the
function and how they wait.

Pipeline inside one round (outside in): fallback candidates, then one
rate-limit token per real call, then the function. Rounds are
``0..retries``; the wait before retry ``k`` (0-based) is
``min(max_delay, min_delay * backoff_factor**k)`` jittered into ``[d/2, d]``
(the native :class:`~opero._opero_core.Backoff`), or ``backoff_function(k)``;
zero while :func:`opero.set_testing` is on. A zero wait never sleeps.

A server's wait (``retry_after``, :mod:`opero._pipeline.retry_after`) replaces
the backoff wait of that retry, exactly (no jitter), even when it is shorter;
a demand longer than ``max_delay`` stops retrying. With ``timeout`` the driver
reads the clock once when the call starts; on a failure the engine gives up
when the next wait would end at or past the deadline (or when the deadline has
passed before the next fallback candidate). A give-up raises the error it
would have raised on exhaustion, with the reason in its note.

``retry_on_result``: a rejected result becomes a
:class:`~opero.errors.RetryResultError` (made by :meth:`Engine.rejected`) that
the loop handles as a failed call; it is always retryable by the layer that
made it.

An error that is not retryable (outside ``retry_on``, refused by
``retry_predicate``, or a ``RecursionError``) propagates at once, unchanged,
even inside a fallback chain. ``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit`` and
``asyncio.CancelledError`` are never caught (they are not ``Exception``
subclasses).

Exhaustion: when every call failed and no ``arg_fallback`` is configured, the
function's own last exception propagates (the same object, so callers'
``except`` clauses keep working), with a PEP 678 note saying how many calls
were made; the earlier errors are kept on it as a tuple (attribute
``__opero_errors__``, read through :func:`opero.errors.attempt_errors`). When an
``arg_fallback`` chain is exhausted, :class:`~opero.errors.AllFailedError` is
raised from the last error with every error in call order.

Stacking: an ``@opero`` applied over a function that is already
opero-decorated retries only when its own ``retries`` is given explicitly
(else its ``retries`` is 0), so stacked layers do not multiply attempts.

No cycles: an attempt's traceback references the driver's frame, which holds
the list of errors; the engine returns the give-up or exhaustion error instead
of raising it, so only the driver's frame is in that traceback, and every
driver clears those locals in ``finally``: a dropped error is freed by
reference counting, with the cyclic collector off.
"""

from __future__ import annotations

import asyncio
import logging
import reprlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opero import _testing
from opero._opero_core import Backoff, coarse_monotonic
from opero._pipeline.callbacks import Events, log_extra
from opero._pipeline.codegen import _signature
from opero._pipeline.fallback import Call, Fallback
from opero._pipeline.policy import Policy, check_seconds
from opero._pipeline.retry_after import server_wait
from opero._pipeline.stats import Counters
from opero._ratelimit import MIN_WAIT, Limiter
from opero.errors import (
    EARLIER_ERRORS,
    AllFailedError,
    CircuitOpenError,
    ConfigurationError,
    RateLimitTimeout,
    RetryResultError,
)

__all__ = ["ATTEMPT_TIMEOUT", "NOTE_PREFIX", "Engine", "Step"]

logger = logging.getLogger("opero")

#: Every note opero adds to a re-raised error starts with this (a re-raised
#: instance keeps one opero note, not one per call).
NOTE_PREFIX = "opero: "
#: Key set in the ``__dict__`` of the ``TimeoutError`` of an attempt that
#: ``attempt_timeout`` cut, to the engine that cut it (always retryable by that
#: engine only; removed when the error leaves it).
ATTEMPT_TIMEOUT = "__opero_attempt_timeout__"
#: How many earlier errors the note shows (``attempt_errors`` has them all).
NOTE_ERRORS = 3

#: What follows a failed call: ``(round, index, wait, error)``. With ``error``
#: set the driver raises it; else it waits ``wait`` seconds and makes call
#: ``index`` (a fallback candidate, 0 without fallback) of round ``round``.
Step = tuple[int, int, float, Exception | None]


class Engine:
    """The policy of one decorated function, compiled for both drivers.

    Args:
        policy: The validated options.
        func: The decorated function (the inner one, called on each attempt).
        qualname: ``module.qualname`` used in messages and log records.
        stacked: ``func`` is itself opero-decorated: without an explicit
            ``retries`` option this layer makes a single round.

    """

    __slots__ = (
        "__weakref__",
        "asleep",
        "async_source",
        "attempt_timeout",
        "backoff",
        "backoff_function",
        "check_wait",
        "clock",
        "counters",
        "events",
        "fallback",
        "func",
        "key_function",
        "key_map",
        "limiter",
        "limiter_check",
        "max_delay",
        "on_failure",
        "on_retry",
        "on_success",
        "policy",
        "predicate",
        "predicate_arity",
        "qualname",
        "rejects",
        "reserve",
        "retries",
        "retry_after",
        "retry_on",
        "sleep",
        "timeout",
    )

    def __init__(
        self, policy: Policy, func: Callable[..., Any], qualname: str, *, stacked: bool = False
    ) -> None:
        retry = policy.retry
        self.policy = policy
        self.func = func
        self.qualname = qualname
        # The inner layer already retries: an implicit default here would multiply
        # the calls ((3 + 1) * (3 + 1) = 16 for two default layers).
        self.retries = 0 if stacked and "retries" not in policy.options else retry.retries
        self.retry_on = retry.retry_on
        self.predicate = retry.retry_predicate
        self.predicate_arity = retry.retry_predicate_arity
        self.backoff_function = retry.backoff_function
        self.backoff = Backoff(
            retry.min_delay, retry.max_delay, retry.backoff_factor, retry.jitter, retry.backoff_seed
        )
        self.max_delay = retry.max_delay
        self.retry_after = retry.retry_after
        self.rejects = retry.retry_on_result
        self.timeout = retry.timeout
        self.attempt_timeout = retry.attempt_timeout
        if self.timeout is not None and not (
            self.retries or policy.fallback.arg_fallback or policy.has_rate_limit
        ):
            raise _inert_timeout(qualname, self.timeout, stacked)
        # A native coarse clock (a few ns, 1-4 ms resolution): read once per call.
        self.clock: Callable[[], float] = policy.wait.clock or coarse_monotonic
        arg_fallback = policy.fallback.arg_fallback
        self.fallback = Fallback(func, arg_fallback) if arg_fallback else None
        # The key function's fit is checked against the parameters a generated wrapper passes.
        generated = func if _signature(func) is not None else None
        self.limiter = Limiter(policy, qualname, generated) if policy.has_rate_limit else None
        limiter = self.limiter
        #: The native bucket's (or the source's) ``reserve() -> seconds`` (never
        #: called without a limiter).
        self.reserve: Callable[..., float] = (
            limiter.reserve_function() if limiter is not None else _no_token
        )
        self.counters = Counters(qualname)
        self.events = events = Events(policy.callbacks, qualname, self.counters)
        self.limiter_check = limiter.check_wait if limiter is not None else _no_wait
        #: ``check_wait(delay)`` of the generated wrapper: the limit's check, then the
        #: ``rate_limit_wait`` event (counted, on_rate_limit_wait, hooks).
        self.check_wait = self._check_wait if limiter is not None else _no_wait
        #: Booking a token needs an ``await`` (a Redis limiter).
        self.async_source = limiter is not None and limiter.has_async_source
        #: A callable ``rate_limit_key``: ``self.reserve`` then takes the key it returns.
        self.key_function = limiter.key_function if limiter is not None else None
        #: The key -> native bucket dict a generated wrapper may read inline, or None.
        self.key_map = limiter.key_map() if limiter is not None else None
        self.sleep: Callable[[float], Any] = policy.wait.sleep or time.sleep
        self.asleep: Callable[[float], Awaitable[Any]] = policy.wait.asleep or asyncio.sleep
        self.on_retry = events.on_retry
        self.on_success = events.on_success
        self.on_failure = events.on_failure

    @property
    def guarded(self) -> bool:
        """Whether a failed first call needs the engine: always, it is counted as a failure.

        A ``try`` costs nothing until an error is raised (CPython 3.11+).
        """
        return True

    def deadline(self, start: float | None = None) -> float | None:
        """Return the deadline of a call that started at ``start`` (now when ``None``)."""
        if self.timeout is None:
            return None
        return (self.clock() if start is None else start) + self.timeout

    # --- decisions -----------------------------------------------------------------

    def is_retryable(self, exc: Exception) -> bool:
        """Return whether another call may follow ``exc`` (``retry_on``, then the predicate).

        A ``RecursionError`` is never retried: the same call at the same depth
        fails the same way, and in a recursive decorated function every level
        retrying its subtree would make ``(retries + 1) ** depth`` calls.
        """
        if isinstance(exc, RetryResultError) and exc.__dict__.get(_OWNER) is self:
            return True
        if type(exc) is TimeoutError and exc.__dict__.get(ATTEMPT_TIMEOUT) is self:
            return True
        if not isinstance(exc, self.retry_on) or isinstance(exc, RecursionError | CircuitOpenError):
            return False
        predicate = self.predicate
        if predicate is None:
            return True
        try:
            if self.predicate_arity >= 2:
                return bool(predicate(exc, None))
            return bool(predicate(exc))
        except Exception:
            logger.exception(
                "opero: retry_predicate of %s raised on %r; the error is not retried",
                self.qualname,
                exc,
            )
            return False

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait before retry ``attempt`` (0-based)."""
        if _testing._enabled:
            return 0.0
        if self.backoff_function is None:
            return self.backoff.delay(attempt)
        return check_seconds(
            f"backoff_function of {self.qualname}, for attempt {attempt}, returned",
            self.backoff_function(attempt),
        )

    def plan_wait(self, exc: Exception, attempt: int) -> tuple[float, str | None]:
        """Return the wait before retry ``attempt`` and, to stop instead, the reason.

        A server's demand (``retry_after``) replaces the backoff wait, exactly;
        one longer than ``max_delay`` stops. Every wait is zero under
        :func:`opero.set_testing` (the ``max_delay`` rule still applies).
        """
        demand = self.server_wait(exc)
        if demand is None:
            return self.delay(attempt), None
        if demand > self.max_delay:
            return 0.0, (
                f"server asked to wait {demand:g} s, more than max_delay={self.max_delay:g} s"
            )
        return (0.0 if _testing._enabled else demand), None

    def server_wait(self, exc: Exception) -> float | None:
        """Return the seconds the server asked for in ``exc`` (``None``: no demand)."""
        source = self.retry_after
        if source is False:
            return None
        if source is True:
            return server_wait(exc)
        value = source(exc)
        if value is None:
            return None
        return check_seconds(
            f"retry_after of {self.qualname}, for {_short_repr(exc)}, returned", value
        )

    def rejected(self, result: Any, attempt: int) -> RetryResultError | None:
        """Return the error standing for a ``result`` that ``retry_on_result`` rejects, or ``None``.

        A raising predicate is logged and the result accepted (the rule of
        ``retry_predicate``: an error of the check never makes more calls).
        """
        assert self.rejects is not None
        try:
            if not self.rejects(result):
                return None
        except Exception:
            logger.exception(
                "opero: retry_on_result of %s raised on a result; the result is accepted",
                self.qualname,
            )
            return None
        error = RetryResultError(
            f"{self.qualname} returned a result that retry_on_result rejected, on call "
            f"{attempt}: {_result_repr(result)}",
            result,
            attempt,
        )
        error.__dict__[_OWNER] = self
        return error

    def before_retry(
        self,
        exc: Exception,
        attempt: int,
        wait: float,
        args: Any = (),
        kwargs: Any = None,
        calls: int = 1,
        waited: float = 0.0,
    ) -> float:
        """Fire ``on_retry``, log, and return ``wait``, the wait before retry ``attempt``.

        ``calls`` is the number of calls made so far, ``waited`` the seconds
        waited so far (both for :class:`~opero.CallDetails`).
        """
        self.events.retry(exc, attempt, wait, args, kwargs, calls, waited)
        logger.info(
            "opero: %s failed with %s; retry %d of %d in %.3fs",
            self.qualname,
            _short_repr(exc),
            attempt + 1,
            self.retries,
            wait,
            extra=log_extra("retry", self.qualname, attempt=calls, wait=wait, error=exc),
        )
        return wait

    def give_up(
        self,
        exc: Exception,
        args: Any = (),
        kwargs: Any = None,
        calls: int = 1,
        waited: float = 0.0,
    ) -> Exception:
        """Fire ``on_failure`` for the error the call raises (counted), and return it."""
        self.events.failure(exc, args, kwargs, calls, waited)
        return exc

    def exhausted(
        self,
        errors: list[Exception],
        reason: str | None = None,
        args: Any = (),
        kwargs: Any = None,
        waited: float = 0.0,
    ) -> Exception:
        """Return the error to raise when every call failed (and fire ``on_failure``).

        With a fallback configured: ``AllFailedError`` with every error,
        chained from the last one (as ``raise ... from`` would). Without: the
        function's own last exception, unchanged in type and identity; after
        more than one call it gets a note and the earlier errors (see
        :func:`opero.errors.attempt_errors`). ``reason`` says why retrying
        stopped early (a deadline, a server's wait); it is in the note or message.
        """
        last = errors[-1]
        for error in errors:
            if isinstance(error, RetryResultError):
                error.__dict__.pop(_OWNER, None)
            elif type(error) is TimeoutError:
                error.__dict__.pop(ATTEMPT_TIMEOUT, None)
        why = f"; {reason}" if reason else ""
        if self.fallback is None:
            if len(errors) > 1 or reason:
                self._annotate(last, errors, why)
                logger.info(
                    "opero: %s failed on %s%s; raising the last error, %s",
                    self.qualname,
                    _calls(len(errors)),
                    why,
                    _short_repr(last),
                    extra=log_extra("exhausted", self.qualname, attempt=len(errors), error=last),
                )
            return self.give_up(last, args, kwargs, len(errors), waited)
        error = AllFailedError(
            f"{self.qualname} failed on {_calls(len(errors))}{why}; "
            f"last error: {_short_repr(last)}",
            errors,
        )
        error.__cause__ = last
        error.__suppress_context__ = True
        logger.info(
            "opero: %s",
            error.message,
            extra=log_extra("exhausted", self.qualname, attempt=len(errors), error=last),
        )
        return self.give_up(error, args, kwargs, len(errors), waited)

    def _annotate(self, last: Exception, errors: list[Exception], why: str = "") -> None:
        """Note the number of calls on ``last`` and keep the earlier errors on it.

        The earlier errors never include ``last`` itself (a function raising one
        shared instance would otherwise make ``last`` reference itself: a cycle).
        """
        earlier = tuple(e for e in errors[:-1] if e is not last)
        shown = ", ".join(_short_repr(e) for e in earlier[-NOTE_ERRORS:])
        if len(earlier) > NOTE_ERRORS:
            shown = f"..., {shown}"
        note = (
            f"{NOTE_PREFIX}{self.qualname} failed on {_calls(len(errors))}"
            + (f" (1 + {len(errors) - 1} retries)" if len(errors) > 1 else "")
            + why
            + (f"; earlier errors: {shown}" if shown else "")
            + "; opero.errors.attempt_errors(exc) lists them all"
        )
        try:
            last.__dict__[EARLIER_ERRORS] = earlier
            notes = last.__dict__.get("__notes__")
            if isinstance(notes, list):
                notes[:] = [
                    n for n in notes if not (isinstance(n, str) and n.startswith(NOTE_PREFIX))
                ]
            last.add_note(note)
        except Exception:  # a non-list __notes__, a __dict__ property: raise it without ours
            logger.debug("opero: could not add a note to %s's error", self.qualname, exc_info=True)

    def log_fallback(
        self,
        exc: Exception,
        index: int,
        total: int,
        args: Any = (),
        kwargs: Any = None,
        calls: int = 1,
        waited: float = 0.0,
    ) -> None:
        """Fire ``on_fallback`` and log a failed candidate before the next one is tried."""
        self.events.fallback(exc, index, args, kwargs, calls, waited)
        logger.info(
            "opero: %s candidate %d of %d (%s) failed with %s; trying the next one",
            self.qualname,
            index + 1,
            total,
            self.policy.fallback.arg_fallback,
            _short_repr(exc),
            extra=log_extra("fallback", self.qualname, attempt=calls, error=exc),
        )

    def calls(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Sequence[Call]:
        """Return the calls of one round: the fallback candidates, or the call itself."""
        if self.fallback is None:
            return [(args, kwargs)]
        return self.fallback.candidates(args, kwargs)

    def after_failure(
        self,
        errors: list[Exception],
        round_: int,
        index: int,
        total: int,
        deadline: float | None = None,
        args: Any = (),
        kwargs: Any = None,
        waited: float = 0.0,
    ) -> Step:
        """Decide what follows the failure of call ``index`` of round ``round_`` (0-based).

        ``errors[-1]`` is the error of that call. In order: an error that is not
        retryable is raised at once (``on_failure`` fired); the next fallback
        candidate is tried without waiting (unless ``deadline`` has passed);
        after the last candidate of the last round the exhaustion error is
        raised; a server's wait past ``max_delay`` or a wait ending at or past
        ``deadline`` raises it too, with the reason; else the next round starts
        after the wait (``on_retry`` fired). The engine returns the error to
        raise rather than raising it, so its frame never holds ``errors`` in a
        traceback. ``args``, ``kwargs`` (the caller's) and ``waited`` feed
        :class:`~opero.CallDetails`.
        """
        exc = errors[-1]
        calls = len(errors)
        if not self.is_retryable(exc):
            return round_, index, 0.0, self.give_up(exc, args, kwargs, calls, waited)
        if index + 1 < total:
            if deadline is not None and self.clock() >= deadline:
                late = self.exhausted(errors, self._late(), args, kwargs, waited)
                return round_, index, 0.0, late
            self.log_fallback(exc, index, total, args, kwargs, calls, waited)
            return round_, index + 1, 0.0, None
        attempts = _testing._attempts
        if round_ >= self.retries or (attempts is not None and round_ + 1 >= attempts):
            return round_, index, 0.0, self.exhausted(errors, None, args, kwargs, waited)
        wait, reason = self.plan_wait(exc, round_)
        if reason is None and deadline is not None and self.clock() + wait >= deadline:
            reason = self._late(wait)
        if reason is not None:
            return round_, index, 0.0, self.exhausted(errors, reason, args, kwargs, waited)
        wait = self.before_retry(exc, round_, wait, args, kwargs, calls, waited)
        return round_ + 1, 0, wait, None

    def _late(self, wait: float = 0.0) -> str:
        """Return the reason of a give-up at the deadline (after a planned ``wait``)."""
        after = f" (after a wait of {wait:g} s)" if wait > 0 else ""
        return f"gave up: the next retry{after} would end past timeout={self.timeout:g} s"

    def token_late(
        self,
        wait: float,
        deadline: float,
        errors: list[Exception],
        args: Any = (),
        kwargs: Any = None,
        waited: float = 0.0,
    ) -> Exception:
        """Return the error for a token ``wait`` ending past ``deadline``.

        Before any call: :class:`~opero.errors.RateLimitTimeout`; after a failed
        call: the exhaustion error of ``errors`` with the reason. ``args``,
        ``kwargs`` (the caller's) and ``waited`` feed ``on_failure``'s details.
        """
        reason = (
            f"gave up: the rate-limit token is {wait:.3f} s away, past timeout={self.timeout:g} s"
        )
        if not errors:
            return self.give_up(
                RateLimitTimeout(f"{self.qualname}: {reason}"), args, kwargs, 1, waited
            )
        return self.exhausted(errors, reason, args, kwargs, waited)

    def _check_wait(self, delay: float, start: float | None = None) -> None:
        """Check a token wait against ``rate_max_wait``, then fire the wait event.

        With ``start`` (the call's start, under ``timeout``), a wait ending at or
        past the deadline fires no event: the caller refuses it (never waited).
        """
        self.limiter_check(delay)
        if (
            start is not None
            and self.timeout is not None
            and self._refused(delay, start + self.timeout)
        ):
            return
        self.events.rate_limit_wait(delay)

    def _refused(self, delay: float, deadline: float | None) -> bool:
        """Return whether a token wait of ``delay`` ends at or past ``deadline`` (refused)."""
        return deadline is not None and self.clock() + delay >= deadline

    def _waiting(
        self,
        delay: float,
        args: Any,
        kwargs: Any,
        calls: int,
        waited: float,
        deadline: float | None = None,
    ) -> float:
        """Return the wait for a booked ``delay`` (0 for none); check it and fire the event.

        A wait ending at or past ``deadline`` fires no event (the caller refuses it).
        """
        if delay > MIN_WAIT:
            self.limiter_check(delay)
            if not self._refused(delay, deadline):
                self.events.rate_limit_wait(delay, args, kwargs, calls, waited)
            return delay
        return 0.0

    def token_wait(
        self,
        args: Any = (),
        kwargs: Any = None,
        calls: int = 1,
        waited: float = 0.0,
        deadline: float | None = None,
    ) -> float:
        """Book a rate-limit token; return the seconds to sleep first (0 for none).

        A wait fires ``on_rate_limit_wait`` (the arguments feed its details).

        Raises:
            RateLimitTimeout: The wait exceeds ``rate_max_wait``.

        """
        if not _testing._rate_limit:
            return 0.0
        return self._waiting(self.reserve(), args, kwargs, calls, waited, deadline)

    def keyed_token_wait(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        calls: int = 1,
        waited: float = 0.0,
        given: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        deadline: float | None = None,
    ) -> float:
        """:meth:`token_wait` in the bucket of the key ``rate_limit_key(*args, **kwargs)``.

        ``given``: the caller's arguments for the event's details when ``args``
        are a fallback candidate's (default: ``args`` and ``kwargs``). The key
        function's own error propagates (the call fails at once: not retried).
        """
        assert self.key_function is not None
        if not _testing._rate_limit:
            return 0.0
        delay = self.reserve(self.key_function(*args, **kwargs))
        if given is not None:
            args, kwargs = given
        return self._waiting(delay, args, kwargs, calls, waited, deadline)

    async def akey_token_wait(
        self,
        key: Any,
        args: Any = (),
        kwargs: Any = None,
        calls: int = 1,
        waited: float = 0.0,
        deadline: float | None = None,
    ) -> float:
        """Async token wait in the bucket of ``key`` (what ``rate_limit_key`` returned)."""
        assert self.limiter is not None
        if not _testing._rate_limit:
            return 0.0
        delay = await self.limiter.areserve_key(key) if self.async_source else self.reserve(key)
        return self._waiting(delay, args, kwargs, calls, waited, deadline)

    async def atoken_wait(
        self,
        args: Any = (),
        kwargs: Any = None,
        calls: int = 1,
        waited: float = 0.0,
        deadline: float | None = None,
    ) -> float:
        """Async :meth:`token_wait` (a Redis limiter books through ``areserve``)."""
        if not self.async_source or not _testing._rate_limit:
            return self.token_wait(args, kwargs, calls, waited, deadline)
        assert self.limiter is not None
        delay = await self.limiter.areserve()
        return self._waiting(delay, args, kwargs, calls, waited, deadline)


#: Key of the engine that made a :class:`RetryResultError` (dropped when it is raised).
_OWNER = "_opero_owner"


def _no_token(*_key: Any) -> float:
    """Stand-in ``reserve`` without a rate limit, or while tokens are bypassed (any key)."""
    return 0.0


def _no_wait(delay: float, start: float | None = None) -> None:
    """Stand-in ``check_wait`` without a rate limit."""


def _inert_timeout(qualname: str, timeout: float, stacked: bool) -> ConfigurationError:
    """Return the error for a ``timeout`` on a layer that makes one call and never waits."""
    why = (
        "it is stacked over an opero-decorated function, so its retries default to 0"
        if stacked
        else "it has retries=0"
    )
    return ConfigurationError(
        f"@opero(timeout={timeout:g}) has no effect on {qualname}: the deadline is checked "
        f"before each retry, rate-limit wait and fallback candidate (a running call is never "
        f"cut), and this layer makes one call and never waits ({why}); put timeout= on the "
        "layer that retries, or set retries= here (for async functions, attempt_timeout= "
        "cuts each attempt)."
    )


def _calls(count: int) -> str:
    """Return "all 3 calls", or "its only call" for one."""
    return "its only call" if count == 1 else f"all {count} calls"


#: Shows a rejected result: containers by their first items, so a result of
#: millions of items does not cost a full ``repr`` on each rejected call.
_RESULT_REPR = reprlib.Repr()
_RESULT_REPR.maxother = _RESULT_REPR.maxstring = 120


def _result_repr(result: Any) -> str:
    """Return a short repr of a rejected ``result`` (bounded work for big containers)."""
    try:
        text = _RESULT_REPR.repr(result)
    except Exception:
        text = f"<{type(result).__qualname__}>"
    return text if len(text) <= 120 else text[:117] + "..."


def _short_repr(exc: BaseException, limit: int = 120) -> str:
    """Return ``repr(exc)`` cut to ``limit`` characters (a failing ``__repr__`` gives the type)."""
    try:
        text = repr(exc)
    except Exception:
        text = f"<{type(exc).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
