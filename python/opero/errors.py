"""The opero error tree.

Every error opero raises derives from :class:`OperoError`, itself a
``RuntimeError``; ``@opmap``'s one warning is :class:`OpmapFailureWarning`.
This module is their only home (``opero`` re-exports them). All of them
pickle, with their fields, so they cross process pools and Dask.

When retries run out without an ``arg_fallback``, opero re-raises the
function's own last exception (not an opero error) with a note, and
:func:`attempt_errors` returns every error of that call in call order.
``opero.exceptions`` is an alias of this module for code written for opero 2.x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Attribute of a re-raised last error holding the earlier attempts' errors (a tuple).
EARLIER_ERRORS = "__opero_errors__"

__all__ = [
    "AllFailedError",
    "CacheBackendError",
    "CircuitOpenError",
    "ConfigurationError",
    "MapError",
    "OperoError",
    "OpmapFailureWarning",
    "RateLimitTimeout",
    "RemoteTraceback",
    "RetryResultError",
    "WorkerDiedError",
    "WorkerStartError",
    "attempt_errors",
]


class OperoError(RuntimeError):
    """Base class of every error opero raises itself."""


class ConfigurationError(OperoError, ValueError, TypeError):
    """A decorator option has a bad value.

    Raised at decoration time. The message names the option, the value
    received and the fix. It is also a ``ValueError`` and a ``TypeError`` so
    code that catches either of those for bad arguments keeps working.
    """


class CacheBackendError(OperoError):
    """A cache backend (Redis, disk) failed and the cache is in strict mode."""


class RateLimitTimeout(OperoError):
    """Waiting for a rate-limit token would exceed the configured maximum wait."""


class CircuitOpenError(OperoError):
    """A circuit breaker is open: the call was refused without calling the function.

    Raised by a function decorated with ``@opero(circuit_breaker=...)`` while
    its :class:`~opero.CircuitBreaker` is open (or half-open with every probe
    slot taken). It is never retried. When this process saw the failure that
    opened the circuit, that failure is the ``__cause__``.

    Args:
        message: Human-readable summary.
        name: The breaker's ``name`` (``None`` for an unnamed breaker).
        retry_after: Seconds until the breaker lets a probe call through
            (``0.0`` when it is half-open and its probe slots are taken).

    Attributes:
        name: The breaker's ``name``.
        retry_after: Seconds to wait before calling again (a float, as
            stamina and ``retry_after=`` detection expect).

    """

    def __init__(self, message: str, *, name: str | None = None, retry_after: float = 0.0) -> None:
        """Store the message, the breaker's name and the wait."""
        super().__init__(message)
        self.name = name
        self.retry_after = retry_after


class RetryResultError(OperoError):
    """Every call returned a result that ``retry_on_result`` rejected.

    Raised when retries run out (or a ``timeout`` stops them) after the
    ``retry_on_result`` predicate returned True for the last call's result, like
    tenacity's ``RetryError``. Inside an ``arg_fallback`` chain it is one of the
    :class:`AllFailedError`'s errors.

    Args:
        message: Names the function and shows a short repr of the result.
        result: The last result returned (and rejected).
        attempts: How many calls were made.

    """

    def __init__(self, message: str, result: Any = None, attempts: int = 1) -> None:
        """Store the message, the last rejected result and the number of calls."""
        super().__init__(message)
        self.message = message
        self.result = result
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the result and the number of calls."""
        state = {k: v for k, v in self.__dict__.items() if k != "_opero_owner"}
        return (type(self), (self.message, self.result, self.attempts), state)


class AllFailedError(ExceptionGroup, OperoError):
    """Every call made for one invocation failed.

    Raised when an ``arg_fallback`` chain is exhausted: every candidate of
    every round failed. (Retries alone re-raise the function's own last
    exception instead; see :func:`attempt_errors`.) ``errors`` holds every underlying
    exception in call order; the error is raised ``from`` the last one, and as
    an ``ExceptionGroup`` it shows every attempt in tracebacks and works with
    ``except*``.

    Args:
        message: Human-readable summary.
        errors: The underlying exceptions, in call order (at least one).

    """

    def __new__(cls, message: str, errors: Sequence[Exception]) -> AllFailedError:
        """Build the group; ``errors`` must hold at least one exception."""
        return super().__new__(cls, message, list(errors))

    def __init__(self, message: str, errors: Sequence[Exception]) -> None:
        """Store the message and the underlying errors."""
        super().__init__(message, list(errors))

    @property
    def errors(self) -> list[Exception]:
        """Every underlying exception, in call order."""
        return list(self.exceptions)

    @property
    def last(self) -> Exception:
        """The exception of the last call made."""
        return self.exceptions[-1]

    def derive(self, excs: Sequence[Exception]) -> AllFailedError:  # type: ignore[override]
        """Build a group of the same type for ``except*`` and ``split``."""
        return AllFailedError(self.message, excs)


class MapError(ExceptionGroup, OperoError):
    """Raised by ``@opmap(strict=True)`` after every item finished, when some failed.

    It is an ``ExceptionGroup`` of the items' exceptions (in input order), so
    ``except*`` works on it.

    Attributes:
        results: The full result list, exceptions in the failed items' places.
        indices: The positions of the failed items in ``results``.

    """

    results: list[Any]
    indices: list[int]

    def __new__(
        cls,
        message: str,
        errors: Sequence[Exception],
        results: list[Any] | None = None,
        indices: list[int] | None = None,
    ) -> MapError:
        """Build the group; ``errors`` must hold at least one exception."""
        self = super().__new__(cls, message, list(errors))
        self.results = [] if results is None else results
        self.indices = [] if indices is None else indices
        return self

    def __init__(
        self,
        message: str,
        errors: Sequence[Exception],
        results: list[Any] | None = None,
        indices: list[int] | None = None,
    ) -> None:
        """Store the message and the failures."""
        super().__init__(message, list(errors))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the partial results and the notes (``__notes__``)."""
        args = (self.message, list(self.exceptions), self.results, self.indices)
        notes = self.__dict__.get("__notes__")
        return (MapError, args) if notes is None else (MapError, args, {"__notes__": notes})

    def derive(self, excs: Sequence[Exception]) -> MapError:  # type: ignore[override]
        """Build a group of the same type for ``except*`` and ``split``."""
        return MapError(self.message, excs, self.results, self.indices)


class OpmapFailureWarning(UserWarning):
    """Some items of an ``@opmap`` call failed; their exceptions are in the results."""


class WorkerDiedError(OperoError):
    """A worker process died (``os._exit``, a signal, a segfault) while running this item.

    The pool replaced the worker and the other items of the map ran; this
    item's result is lost.
    """


class WorkerStartError(OperoError):
    """A worker of an ``@opmap`` could not start, so the map stopped.

    Either a worker process died before its first job, or the map's
    ``initializer=`` raised in a worker (that error is then the ``__cause__``).
    """


class RemoteTraceback(Exception):
    """The formatted traceback of an item that failed in a worker process or on Dask.

    ``@opmap`` sets it as the ``__cause__`` of such an item's exception, the
    way ``concurrent.futures`` does, so ``traceback.print_exception(exc)``
    shows the lines of the worker that raised. Its ``str()`` is that text;
    ``.tb`` holds it too.
    """

    def __init__(self, tb: str) -> None:
        """Keep the traceback text."""
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        """Return the traceback text."""
        return self.tb


def attempt_errors(exc: BaseException) -> list[BaseException]:
    """Return every error of the failed ``@opero`` call that raised ``exc``, in call order.

    When retries run out without an ``arg_fallback``, opero raises the
    function's own last exception and keeps the earlier attempts' errors on
    it; for an :class:`AllFailedError` these are its ``errors``. Any other
    exception gives ``[exc]``.

    Args:
        exc: The exception caught from a decorated function.

    Returns:
        The errors of every call made, the last one being ``exc`` itself (or,
        for an ``AllFailedError``, its last underlying error).

    Example:
        >>> try:
        ...     fetch(url)
        ... except ConnectionError as exc:
        ...     print(len(attempt_errors(exc)), "calls failed")

    """
    if isinstance(exc, AllFailedError):
        return list(exc.exceptions)
    try:
        earlier = tuple(vars(exc).get(EARLIER_ERRORS, ()))
    except Exception:  # a __dict__ property that raises: no earlier errors were kept
        earlier = ()
    return [*earlier, exc]
