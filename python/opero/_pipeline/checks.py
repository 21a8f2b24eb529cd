"""Value checks of ``@opero`` options: ranges, messages, and the checker factories.

Each factory returns a *checker* ``check(option, value) -> normalized value``
that raises :class:`~opero.errors.ConfigurationError` naming the option, the
value received, what it needs and an example fix. The option table
(:mod:`opero._pipeline.options`) pairs every option with one checker.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import sys
from collections.abc import Callable
from typing import Any

from opero._pipeline.callbacks import positional_arity
from opero.errors import ConfigurationError

__all__ = [
    "MAX_BURST",
    "MAX_COUNT",
    "MAX_SECONDS",
    "MIN_RATE",
    "Checker",
    "bad",
    "check_rate",
    "check_seconds",
    "flag",
    "function",
    "integer",
    "optional",
    "real",
    "show",
]

#: The longest delay, wait or TTL opero accepts, in seconds (about 31.7 years).
#: ``time.sleep`` and ``threading`` waits overflow past about 9.2e9 s on 64-bit
#: Linux (less elsewhere), and Redis refuses expiries near 2**63 ms; a bound
#: that every sleep, lock wait and backend honours keeps a wait that cannot be
#: slept from surfacing as an ``OverflowError`` on some later call.
MAX_SECONDS = 1e9

#: The slowest ``rate_limit``: one call per :data:`MAX_SECONDS` (its interval
#: ``1 / rate`` is a wait).
MIN_RATE = 1.0 / MAX_SECONDS

#: The largest ``rate_burst`` (the native bucket counts tokens in 32 bits).
MAX_BURST = 2**32 - 1

#: The largest count option (``retries``, ``cache_max_size``): a native size.
MAX_COUNT = sys.maxsize

#: ``check(option, value) -> normalized value``; raises ``ConfigurationError``.
Checker = Callable[[str, Any], Any]


def bad(option: str, value: Any, need: str, example: str) -> ConfigurationError:
    """Build the error for a bad value: option, value received, what it needs, a fix."""
    return ConfigurationError(
        f"@opero({option}={show(value)}) is invalid: {option} must be {need}; "
        f"for example {option}={example}."
    )


def show(value: Any) -> str:
    """``repr(value)`` cut to 60 characters (``10**400`` has 401 digits).

    A repr that fails (an int past Python's 4300-digit limit, a raising ``__repr__``)
    gives the type's name instead, so the error being built is the one raised.
    """
    try:
        text = repr(value)
    except Exception:  # the ConfigurationError being built is raised instead
        return f"<{type(value).__name__} object>"
    return text if len(text) <= 60 else f"{text[:40]}...{text[-10:]} ({len(text)} chars)"


def as_float(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` if it is not one.

    ``None`` for a bool, a non-number, NaN, an infinity or an int too large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except Exception:  # too large, or a number type whose __float__ raises
        return None
    return number if math.isfinite(number) else None


def check_seconds(
    what: str,
    value: Any,
    *,
    positive: bool = False,
    error: Callable[[str], Exception] = ConfigurationError,
) -> float:
    """Return ``value`` as seconds, finite, ``>= 0`` and at most :data:`MAX_SECONDS`.

    ``0`` is refused too when ``positive``. The one check of "a number of seconds"
    for values read at run time (``backoff_function``) and by the backends, so every
    caller gives the same range and message.

    Args:
        what: The message's start, followed by the value, e.g. ``"backoff_function
            returned"``.
        value: The value to check.
        positive: Refuse 0 as well.
        error: The exception type to raise (``ConfigurationError`` by default).

    Raises:
        ConfigurationError: The value is not such a number (or ``error``'s type).

    """
    number = as_float(value)
    if number is None or number < 0 or (positive and number == 0) or number > MAX_SECONDS:
        low = "> 0" if positive else ">= 0"
        raise error(
            f"{what} {show(value)}; it must be a finite number of seconds {low} and at most "
            f"{MAX_SECONDS:g} (about 31 years)"
        )
    return number


def check_rate(
    what: str, value: Any, *, error: Callable[[str], Exception] = ConfigurationError
) -> float:
    """Return ``value`` as calls per second, finite and at least :data:`MIN_RATE`.

    Args:
        what: The message's start, followed by the value, e.g. ``"the rate_limit
            callable returned"``.
        value: The value to check.
        error: The exception type to raise (``ConfigurationError`` by default).

    Raises:
        ConfigurationError: The value is not such a rate (or ``error``'s type).

    """
    number = as_float(value)
    if number is None or number < MIN_RATE:
        raise error(
            f"{what} {show(value)}; it must be a finite number of calls per second, at least "
            f"{MIN_RATE:g} (one call per {MAX_SECONDS:g} s: a longer wait cannot be slept)"
        )
    return number


# --- checker factories ---------------------------------------------------------------


def real(
    need: str,
    example: str,
    *,
    low: float,
    strict: bool = False,
    high: float = sys.float_info.max,
) -> Checker:
    """Check a finite real in ``[low, high]`` (``(low, high]`` if ``strict``), as a float."""

    def check(option: str, value: Any) -> float:
        number = as_float(value)
        if number is None or number > high or number < low or (strict and number == low):
            raise bad(option, value, need, example)
        return number

    return check


def integer(need: str, example: str, *, low: int, high: int = MAX_COUNT) -> Checker:
    """Check an integral number (``operator.index``, not a bool) in ``[low, high]``, as an int."""

    def check(option: str, value: Any) -> int:
        if isinstance(value, bool):
            raise bad(option, value, need, example)
        try:
            number = operator.index(value)
        except Exception:  # not integral, or an __index__ that raises
            raise bad(option, value, need, example) from None
        if number < low or number > high:
            raise bad(option, value, need, example)
        return number

    return check


def flag(option: str, value: Any) -> bool:
    """Check ``True`` or ``False`` (no other truthy value)."""
    if not isinstance(value, bool):
        raise bad(option, value, "True or False", "True")
    return value


def anything(option: str, value: Any) -> Any:
    """Accept any value, checked later by the component that uses it (backends, limiter)."""
    return value


def optional(check: Checker) -> Checker:
    """Accept ``None``, or a value ``check`` accepts."""

    def maybe(option: str, value: Any) -> Any:
        return None if value is None else check(option, value)

    return maybe


def function(
    need: str, example: str, *, least: int = 0, shape: str = "", sync: bool = True
) -> Checker:
    """Check a callable taking at least ``least`` positional arguments (called as ``shape``).

    With ``sync`` (the default: opero calls it and uses what it returns), an
    ``async def`` function is refused: its coroutine would never be awaited.
    """

    def check(option: str, value: Any) -> Callable[..., Any]:
        if not callable(value):
            raise bad(option, value, need, example)
        if sync and _is_async(value):
            raise ConfigurationError(
                f"@opero({option}={show(value)}) is invalid: {option} is called without "
                "await, also for async def functions, so an async def would return a "
                f"coroutine that never runs; define it as a plain def {shape or need} (a "
                "callback may schedule a coroutine with asyncio.get_running_loop().create_task)."
            )
        if least and positional_arity(value, least) < least:
            raise ConfigurationError(
                f"@opero({option}={show(value)}) is invalid: {option} is called as {shape}, "
                f"but it takes fewer positional arguments; define it as {shape}."
            )
        return value  # type: ignore[no-any-return]

    return check


def _is_async(value: Any) -> bool:
    """Return whether calling ``value`` makes a coroutine.

    True for an ``async def`` (or async generator) function, a partial of one, or
    an object whose ``__call__`` is one; a hostile object counts as not async.
    """
    try:
        if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            return True
        if inspect.isroutine(value) or isinstance(value, type):
            return False
        return inspect.iscoroutinefunction(type(value).__call__)
    except Exception:  # its call decides
        return False


def text(need: str, example: str, *, identifier: bool = False) -> Checker:
    """Check a non-empty ``str`` (a Python identifier when ``identifier``)."""

    def check(option: str, value: Any) -> str:
        if not isinstance(value, str) or not value or (identifier and not value.isidentifier()):
            raise bad(option, value, need, example)
        return value

    return check


def choice(values: tuple[str, ...], need: str, example: str) -> Checker:
    """Check one of ``values``."""

    def check(option: str, value: Any) -> str:
        if not isinstance(value, str) or value not in values:
            raise bad(option, value, need, example)
        return value

    return check


def required_positional(func: Callable[..., Any]) -> int:
    """Return how many positional parameters of ``func`` have no default (1 or 2)."""
    try:
        sig = inspect.signature(func)
    except Exception:  # unreadable (a builtin), or a __signature__ that raises
        return 1
    count = sum(
        1
        for param in sig.parameters.values()
        if param.kind
        in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and param.default is inspect.Parameter.empty
    )
    return max(1, min(count, 2))
