"""Alias of :mod:`opero.errors`, kept for code written for opero 2.x.

``from opero.exceptions import OperoError`` gives the very same classes as
``from opero.errors import OperoError``.
"""

from opero.errors import (
    AllFailedError,
    CacheBackendError,
    ConfigurationError,
    OperoError,
    RateLimitTimeout,
    attempt_errors,
)

__all__ = [
    "AllFailedError",
    "CacheBackendError",
    "ConfigurationError",
    "OperoError",
    "RateLimitTimeout",
    "attempt_errors",
]
