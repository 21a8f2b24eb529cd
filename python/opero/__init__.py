"""opero: resilient and parallel Python functions with two decorators.

``@opero`` adds a cache, retries with jittered backoff, argument fallbacks and a
rate limit to one function (sync or ``async def``); ``@opmap`` maps a one-item
function over many items on threads, processes, asyncio, aiomultiprocess or
Dask. The hot paths (cache keys, the LRU/TTL store, the token bucket and the
backoff schedule) run in Rust.

The ``opero`` logger has a :class:`logging.NullHandler`: an application that
configures no logging prints nothing from opero (see docs/observability.md).
"""

import logging as _logging

from opero._map import MappedFunction, opmap
from opero._opero_core import __version__
from opero._pipeline.breaker import CircuitBreaker
from opero._pipeline.callbacks import LogFields as _LogFields
from opero._pipeline.decorate import BoundOperoFunction, OperoFunction, clear_cache, opero
from opero._pipeline.details import CallDetails
from opero._pipeline.stats import FunctionStats
from opero._testing import is_testing, set_testing
from opero.cache import CacheInfo
from opero.errors import (
    AllFailedError,
    CacheBackendError,
    CircuitOpenError,
    ConfigurationError,
    MapError,
    OperoError,
    OpmapFailureWarning,
    RateLimitTimeout,
    RemoteTraceback,
    RetryResultError,
    WorkerDiedError,
    WorkerStartError,
    attempt_errors,
)

__all__ = [
    "AllFailedError",
    "BoundOperoFunction",
    "CacheBackendError",
    "CacheInfo",
    "CallDetails",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "FunctionStats",
    "MapError",
    "MappedFunction",
    "OperoError",
    "OperoFunction",
    "OpmapFailureWarning",
    "RateLimitTimeout",
    "RemoteTraceback",
    "RetryResultError",
    "WorkerDiedError",
    "WorkerStartError",
    "__version__",
    "attempt_errors",
    "clear_cache",
    "is_testing",
    "opero",
    "opmap",
    "set_testing",
]

_logging.getLogger("opero").addHandler(_logging.NullHandler())
_logging.getLogger("opero").addFilter(_LogFields())
