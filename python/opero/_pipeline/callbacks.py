"""User callbacks of ``@opero``: arity detected once, exceptions logged, never raised.

``on_retry(exc)`` or ``on_retry(exc, attempt)``, ``on_success(result)`` or
``on_success()``, ``on_failure(exc)``, ``on_cache_hit()``,
``on_fallback(exc)`` or ``on_fallback(exc, index)`` and
``on_rate_limit_wait(wait)`` or ``on_rate_limit_wait()``. Each is adapted at
decoration time into a function of a fixed arity that calls the user's
callback with the arguments it accepts and logs (``logger.exception`` on the
``opero`` logger) anything it raises: a callback never changes the outcome of a
call nor the number of attempts.

A callback may instead take one :class:`~opero.CallDetails` (the rule is
:func:`~opero._pipeline.details.wants_details`): :class:`Events` builds the
details only for such a callback, or when global hooks of
:mod:`opero.instrumentation` are registered, and only on the event's own
(slow) path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from opero._pipeline.details import CallDetails, wants_details

__all__ = ["Events", "adapt_callback", "log_extra", "positional_arity"]

logger = logging.getLogger("opero")

#: Global hooks of :mod:`opero.instrumentation` (``hook(details)``), read on slow paths.
hooks: tuple[Callable[[CallDetails], Any], ...] = ()


def log_extra(
    event: str,
    function: str,
    *,
    attempt: int | None = None,
    wait: float | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """Return the ``extra=`` of an opero log record (documented in docs/observability.md).

    Keys are prefixed ``opero_`` so they never clash with ``LogRecord``
    attributes: ``opero_event``, ``opero_function``, and when known
    ``opero_attempt``, ``opero_wait`` and ``opero_error_type``.
    """
    extra: dict[str, Any] = {"opero_event": event, "opero_function": function}
    if attempt is not None:
        extra["opero_attempt"] = attempt
    if wait is not None:
        extra["opero_wait"] = wait
    if error is not None:
        extra["opero_error_type"] = type(error).__qualname__
    return extra


#: The structured fields of docs/observability.md, present on every ``opero`` record.
LOG_FIELDS = (
    "opero_event",
    "opero_function",
    "opero_attempt",
    "opero_wait",
    "opero_error_type",
    "opero_callback",
)


class LogFields(logging.Filter):
    """Gives every record of the ``opero`` logger each documented field (``None`` if unknown).

    A format string naming a field (``"%(opero_event)s"``) then formats every
    record, not only those that know the field (a callback error, a breaker
    transition...); without it such a record is a "--- Logging error ---".
    Installed on the ``opero`` logger by ``opero/__init__.py``; never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Fill the missing fields with ``None`` and keep the record."""
        fields = record.__dict__
        for name in LOG_FIELDS:
            if name not in fields:
                fields[name] = None
        return True


def positional_arity(func: Callable[..., Any], most: int) -> int:
    """Return how many positional arguments (up to ``most``) ``func`` accepts.

    Required positional parameters count, and so do optional ones and
    ``*args``. When the signature cannot be read (some builtins), ``most`` is
    assumed.
    """
    try:
        sig = inspect.signature(func)
    except Exception:  # unreadable (a builtin), or a __signature__ that raises
        return most
    count = 0
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return most
        if param.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            count += 1
    return min(count, most)


def _name(func: Callable[..., Any]) -> str:
    """Name ``func`` in log records: its ``__qualname__``, else its class (never raises)."""
    name = getattr(func, "__qualname__", None)
    if isinstance(name, str) and name:
        return name
    kind = type(func)
    return f"<{kind.__module__}.{kind.__qualname__} object>"


def adapt_callback(
    option: str, func: Callable[..., Any] | None, arities: tuple[int, ...]
) -> Callable[..., None] | None:
    """Wrap a user callback so it is called with the arguments it accepts, safely.

    Args:
        option: The option name (``"on_retry"``...), used in log records.
        func: The user's callback, or ``None``.
        arities: The accepted positional arities, largest first; the adapted
            function always takes the largest.

    Returns:
        ``None`` when ``func`` is ``None``, else a function of
        ``max(arities)`` positional arguments that never raises an
        ``Exception``.

    """
    if func is None:
        return None
    full = arities[0]
    if full >= 1 and wants_details(func):
        # A details callback gets the first argument as is: a caller of such an
        # option passes a CallDetails there (on_circuit_open).
        return _ADAPTERS[full, 1](func, option, _name(func))
    accepted = positional_arity(func, full)
    # Pick the largest arity the callback can take among the documented ones.
    use = next((a for a in arities if a <= accepted), arities[-1])
    return _ADAPTERS[full, use](func, option, _name(func))


# One factory per (arity called with, arity the callback takes): the adapted callbacks
# run on the hot path (on_success after every call), so each is a direct closure.


def _adapt_0_0(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call0() -> None:
        try:
            user()
        except Exception:
            logger.exception(
                "opero: %s callback %s raised; ignored",
                option,
                label,
                extra={"opero_event": "callback_error", "opero_callback": option},
            )

    return call0


def _adapt_1_1(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call1(a: Any) -> None:
        try:
            user(a)
        except Exception:
            logger.exception(
                "opero: %s callback %s raised; ignored",
                option,
                label,
                extra={"opero_event": "callback_error", "opero_callback": option},
            )

    return call1


def _adapt_1_0(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call1(a: Any) -> None:
        try:
            user()
        except Exception:
            logger.exception(
                "opero: %s callback %s raised; ignored",
                option,
                label,
                extra={"opero_event": "callback_error", "opero_callback": option},
            )

    return call1


def _adapt_2_2(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call2(a: Any, b: Any) -> None:
        try:
            user(a, b)
        except Exception:
            logger.exception(
                "opero: %s callback %s raised; ignored",
                option,
                label,
                extra={"opero_event": "callback_error", "opero_callback": option},
            )

    return call2


def _adapt_2_1(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call2(a: Any, b: Any) -> None:
        try:
            user(a)
        except Exception:
            logger.exception(
                "opero: %s callback %s raised; ignored",
                option,
                label,
                extra={"opero_event": "callback_error", "opero_callback": option},
            )

    return call2


_ADAPTERS: dict[tuple[int, int], Callable[[Callable[..., Any], str, str], Callable[..., None]]] = {
    (0, 0): _adapt_0_0,
    (1, 1): _adapt_1_1,
    (1, 0): _adapt_1_0,
    (2, 2): _adapt_2_2,
    (2, 1): _adapt_2_1,
}


# ---------------------------------------------------------------------------------------
# Events: the callbacks, the counters and the global hooks of one decorated function


def _details_adapter(
    user: Callable[..., Any], option: str, label: str
) -> Callable[[CallDetails], None]:
    def call(details: CallDetails) -> None:
        try:
            user(details)
        except Exception:
            logger.exception(
                "opero: %s callback %s raised; ignored",
                option,
                label,
                extra={"opero_event": "callback_error", "opero_callback": option},
            )

    return call


def _adapt(option: str, func: Callable[..., Any] | None, arities: tuple[int, ...]) -> Any:
    """Return ``(adapted, wants_details)`` for one option (``(None, False)`` without one)."""
    if func is None:
        return None, False
    if wants_details(func):
        return _details_adapter(func, option, _name(func)), True
    return adapt_callback(option, func, arities), False


def _success_adapter(user: Callable[..., Any] | None, function: str) -> Callable[..., None] | None:
    """Return ``on_success(result, args=(), kwargs=None, attempt=1, waited=0.0)``.

    The generated first-call wrapper passes the result only; the drivers'
    loops pass the rest too. A classic callback ignores the extra arguments
    (one frame, as before); a details callback gets them in its
    :class:`CallDetails`.
    """
    if user is None:
        return None
    label = _name(user)

    def failed() -> None:
        logger.exception(
            "opero: on_success callback %s raised; ignored",
            label,
            extra={"opero_event": "callback_error", "opero_callback": "on_success"},
        )

    if wants_details(user):

        def success_details(
            result: Any, args: Any = (), kwargs: Any = None, attempt: int = 1, waited: float = 0.0
        ) -> None:
            try:
                user(
                    CallDetails(
                        function,
                        args,
                        {} if kwargs is None else dict(kwargs),  # a copy: retries use it
                        attempt,
                        0.0,
                        waited,
                        None,
                        result,
                        "success",
                    )
                )
            except Exception:
                failed()

        return success_details
    if positional_arity(user, 1) >= 1:

        def success(
            result: Any, args: Any = (), kwargs: Any = None, attempt: int = 1, waited: float = 0.0
        ) -> None:
            try:
                user(result)
            except Exception:
                failed()

        return success

    def success0(
        result: Any, args: Any = (), kwargs: Any = None, attempt: int = 1, waited: float = 0.0
    ) -> None:
        try:
            user()
        except Exception:
            failed()

    return success0


class Events:
    """The callbacks of one decoration, its counters and the global hooks, per event.

    Each slow-path event (a retry, a failure, a failed fallback candidate, a
    rate-limit wait) counts, builds a :class:`CallDetails` only when a
    details callback or a global hook wants one, fires the user's callback
    and the hooks, and logs. ``on_success`` (the hot path) is
    :attr:`on_success`, called directly by the drivers.

    Args:
        callbacks: The ``callbacks`` stage policy.
        function: ``module.qualname``.
        counters: The function's :class:`~opero._pipeline.stats.Counters`.

    """

    __slots__ = (
        "counters",
        "function",
        "on_failure",
        "on_failure_details",
        "on_fallback",
        "on_fallback_details",
        "on_rate_limit_wait",
        "on_rate_limit_wait_details",
        "on_retry",
        "on_retry_details",
        "on_success",
        "success_details",
    )

    def __init__(self, callbacks: Any, function: str, counters: Any) -> None:
        self.function = function
        self.counters = counters
        self.on_retry, self.on_retry_details = _adapt("on_retry", callbacks.on_retry, (2, 1))
        self.on_failure, self.on_failure_details = _adapt("on_failure", callbacks.on_failure, (1,))
        self.on_fallback, self.on_fallback_details = _adapt(
            "on_fallback", getattr(callbacks, "on_fallback", None), (2, 1)
        )
        self.on_rate_limit_wait, self.on_rate_limit_wait_details = _adapt(
            "on_rate_limit_wait", getattr(callbacks, "on_rate_limit_wait", None), (1, 0)
        )
        user_success = callbacks.on_success
        self.success_details = user_success is not None and wants_details(user_success)
        #: ``(result, args=(), kwargs=None, attempt=1, waited=0.0) -> None`` or ``None``.
        self.on_success = _success_adapter(user_success, function)

    @property
    def needs_arguments(self) -> bool:
        """A callback of a first-call path needs the call's arguments (no generated wrapper)."""
        return self.success_details or self.on_rate_limit_wait_details

    def _details(
        self,
        event: str,
        args: Any,
        kwargs: Any,
        attempt: int,
        wait: float,
        waited: float,
        exception: BaseException | None = None,
    ) -> CallDetails:
        return CallDetails(
            self.function,
            args if isinstance(args, tuple) else tuple(args or ()),
            {} if kwargs is None else dict(kwargs),  # a copy: the next attempts use it
            attempt,
            wait,
            waited,
            exception,
            None,
            event,
        )

    def _hooks(self, details: CallDetails) -> None:
        for hook in hooks:
            try:
                hook(details)
            except Exception:
                logger.exception(
                    "opero: instrumentation hook %s raised; ignored",
                    _name(hook),
                    extra={"opero_event": "hook_error", "opero_function": self.function},
                )

    def _fire(
        self,
        event: str,
        callback: Callable[..., Any] | None,
        detailed: bool,
        classic: tuple[Any, ...],
        args: Any,
        kwargs: Any,
        attempt: int,
        wait: float,
        waited: float,
        exc: BaseException | None = None,
    ) -> None:
        """Call ``callback`` with a :class:`CallDetails` (``detailed``) or ``classic``; then hooks.

        The details are built only when the callback or a global hook wants them.
        """
        details = None
        if detailed or hooks:
            details = self._details(event, args, kwargs, attempt, wait, waited, exc)
        if callback is not None:
            if detailed:
                callback(details)
            else:
                callback(*classic)
        if hooks and details is not None:
            self._hooks(details)

    def retry(
        self,
        exc: Exception,
        round_: int,
        wait: float,
        args: Any = (),
        kwargs: Any = None,
        attempt: int = 1,
        waited: float = 0.0,
    ) -> None:
        """Fire the retry event: retry ``round_`` (0-based) follows after ``wait`` seconds."""
        self.counters.retried(wait)
        self._fire(
            "retry", self.on_retry, self.on_retry_details, (exc, round_),
            args, kwargs, attempt, wait, waited, exc,
        )  # fmt: skip

    def failure(
        self,
        exc: Exception,
        args: Any = (),
        kwargs: Any = None,
        attempt: int = 1,
        waited: float = 0.0,
    ) -> None:
        """Fire the failure event: the call raises ``exc`` (not retryable, or all failed)."""
        self.counters.failed()
        self._fire(
            "failure", self.on_failure, self.on_failure_details, (exc,),
            args, kwargs, attempt, 0.0, waited, exc,
        )  # fmt: skip

    def fallback(
        self,
        exc: Exception,
        index: int,
        args: Any = (),
        kwargs: Any = None,
        attempt: int = 1,
        waited: float = 0.0,
    ) -> None:
        """Fallback candidate ``index`` (0-based) failed; the next one is tried."""
        self.counters.fell_back()
        self._fire(
            "fallback", self.on_fallback, self.on_fallback_details, (exc, index),
            args, kwargs, attempt, 0.0, waited, exc,
        )  # fmt: skip

    def rate_limit_wait(
        self,
        wait: float,
        args: Any = (),
        kwargs: Any = None,
        attempt: int = 1,
        waited: float = 0.0,
    ) -> None:
        """Fire the wait event: the call sleeps ``wait`` seconds for a rate-limit token."""
        self.counters.rate_waited(wait)
        self._fire(
            "rate_limit_wait", self.on_rate_limit_wait, self.on_rate_limit_wait_details, (wait,),
            args, kwargs, attempt, wait, waited,
        )  # fmt: skip
        logger.debug(
            "opero: %s waits %.3fs for a rate-limit token",
            self.function,
            wait,
            extra=log_extra("rate_limit_wait", self.function, attempt=attempt, wait=wait),
        )


def cache_hit_callback(func: Callable[..., Any] | None, function: str) -> Callable[[], None] | None:
    """Adapt ``on_cache_hit``: ``on_cache_hit()``, or one :class:`CallDetails`.

    The hit path of the native store never hands the call's arguments to
    Python, so the details of a hit carry the function and the event
    (``"cache_hit"``), with empty ``args``/``kwargs``.
    """
    if func is None or not wants_details(func):
        return adapt_callback("on_cache_hit", func, (0,))
    call = _details_adapter(func, "on_cache_hit", _name(func))

    def hit() -> None:
        call(CallDetails(function, event="cache_hit"))

    return hit
