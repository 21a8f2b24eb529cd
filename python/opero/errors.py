"""The opero error tree.

Every error opero raises derives from :class:`OperoError`, itself a
``RuntimeError``. All of them pickle, so they cross process pools and Dask.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AllFailedError",
    "CacheBackendError",
    "ConfigurationError",
    "OperoError",
    "RateLimitTimeout",
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


class AllFailedError(ExceptionGroup, OperoError):
    """Every call made for one invocation failed.

    Raised when more than one call was made (retries) or a fallback was
    configured, and none succeeded. ``errors`` holds every underlying
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
