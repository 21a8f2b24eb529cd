"""Validation of ``@opero`` options into a frozen :class:`Policy`, once per decoration.

Every option is checked here, at decoration time: an unknown name is a
``TypeError`` naming the closest valid one (``difflib``), a bad value is a
:class:`~opero.errors.ConfigurationError` naming the option, the value received
and the fix. The call path never re-validates: it reads the frozen policy.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import operator
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from opero._pipeline.callbacks import positional_arity
from opero.errors import ConfigurationError

__all__ = [
    "MAX_BURST",
    "MAX_SECONDS",
    "MIN_RATE",
    "OPTION_NAMES",
    "Policy",
    "build_policy",
    "check_rate",
    "check_seconds",
    "fallback_parameter",
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

#: Public options with their defaults, in documentation order.
DEFAULTS: dict[str, Any] = {
    # retries
    "retries": 3,
    "backoff_factor": 1.5,
    "min_delay": 0.1,
    "max_delay": 30.0,
    "jitter": True,
    "retry_on": (Exception,),
    "retry_predicate": None,
    "backoff_function": None,
    # fallback
    "arg_fallback": None,
    # rate limit
    "rate_limit": None,
    "rate_burst": 1,
    "rate_limit_key": None,
    "rate_max_wait": None,
    "rate_limit_backend": "memory",
    "rate_limit_redis_url": None,
    # callbacks
    "on_retry": None,
    "on_success": None,
    "on_failure": None,
    "on_cache_hit": None,
    # cache
    "cache": False,
    "cache_ttl": None,
    "cache_max_size": 1024,
    "cache_namespace": "opero",
    "cache_key": None,
    "cache_backend": "memory",
    "cache_redis_url": None,
    "cache_serializer": "pickle",
    "cache_secret": None,
    "cache_strict": False,
    "cache_dir": None,
}

#: Private options, for opero's own layers and tests (not part of the public API).
PRIVATE_DEFAULTS: dict[str, Any] = {
    "_limiter": None,  # an object with reserve(rate=None) -> float; replaces the bucket
    "_sleep": None,  # sync sleep(seconds) used for retry and rate-limit waits
    "_asleep": None,  # async sleep(seconds)
    "_backoff_seed": None,  # seed of the jitter RNG, for reproducible schedules
}

OPTION_NAMES: frozenset[str] = frozenset(DEFAULTS)
_ALL_NAMES = frozenset(DEFAULTS) | frozenset(PRIVATE_DEFAULTS)

_RATE_BACKENDS = ("memory", "redis")
_CACHE_BACKENDS = ("memory", "redis", "disk")
_NEVER_RETRIED = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass(frozen=True, slots=True)
class Policy:
    """The validated options of one ``@opero`` decoration (immutable).

    Attributes mirror the options of the same name (see :func:`opero.opero`);
    ``options`` is the read-only mapping of the options the user passed, after
    normalization (``retry_on`` as a tuple), without the private ``_limiter``:
    ``opero(**policy.options)`` rebuilds an equivalent decorator.
    """

    retries: int
    backoff_factor: float
    min_delay: float
    max_delay: float
    jitter: bool
    retry_on: tuple[type[BaseException], ...]
    retry_predicate: Callable[..., Any] | None
    retry_predicate_arity: int
    backoff_function: Callable[[int], float] | None
    arg_fallback: str | None
    rate_limit: float | Callable[[], float] | None
    rate_burst: int
    rate_limit_key: str | None
    rate_max_wait: float | None
    rate_limit_backend: str
    rate_limit_redis_url: Any
    on_retry: Callable[..., Any] | None
    on_success: Callable[..., Any] | None
    on_failure: Callable[..., Any] | None
    on_cache_hit: Callable[..., Any] | None
    cache: bool
    cache_ttl: float | None
    cache_max_size: int | None
    cache_namespace: str
    cache_key: Callable[..., Any] | None
    cache_backend: Any
    cache_redis_url: Any
    cache_serializer: Any
    cache_secret: Any
    cache_strict: bool
    cache_dir: Any
    limiter: Any = None
    sleep: Callable[[float], Any] | None = None
    asleep: Callable[[float], Any] | None = None
    backoff_seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def has_rate_limit(self) -> bool:
        """Whether every real call takes a token (``rate_limit`` or ``_limiter``)."""
        return self.rate_limit is not None or self.limiter is not None

    @property
    def has_fallback(self) -> bool:
        """Whether ``arg_fallback`` is configured."""
        return self.arg_fallback is not None


def _bad(option: str, value: Any, need: str, example: str) -> ConfigurationError:
    """Build the error for a bad value: option, value received, what it needs, a fix."""
    return ConfigurationError(
        f"@opero({option}={_show(value)}) is invalid: {option} must be {need}; "
        f"for example {option}={example}."
    )


def _show(value: Any) -> str:
    """``repr(value)`` cut to 60 characters (``10**400`` has 401 digits).

    A repr that fails (an int past Python's 4300-digit limit, a raising ``__repr__``)
    gives the type's name instead, so the error being built is the one raised.
    """
    try:
        text = repr(value)
    except Exception:  # the ConfigurationError being built is raised instead
        return f"<{type(value).__name__} object>"
    return text if len(text) <= 60 else f"{text[:40]}...{text[-10:]} ({len(text)} chars)"


def _as_float(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` if it is not one.

    ``None`` for a bool, a non-number, NaN, an infinity or an int too large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
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
    number = _as_float(value)
    if number is None or number < 0 or (positive and number == 0) or number > MAX_SECONDS:
        low = "> 0" if positive else ">= 0"
        raise error(
            f"{what} {_show(value)}; it must be a finite number of seconds {low} and at most "
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
    number = _as_float(value)
    if number is None or number < MIN_RATE:
        raise error(
            f"{what} {_show(value)}; it must be a finite number of calls per second, at least "
            f"{MIN_RATE:g} (one call per {MAX_SECONDS:g} s: a longer wait cannot be slept)"
        )
    return number


def _check_real(
    option: str,
    value: Any,
    *,
    low: float,
    strict: bool,
    need: str,
    example: str,
    high: float = sys.float_info.max,
) -> float:
    number = _as_float(value)
    if number is None or number > high:
        raise _bad(option, value, need, example)
    if (strict and number <= low) or (not strict and number < low):
        raise _bad(option, value, need, example)
    return number


def _check_int(
    option: str, value: Any, *, low: int, need: str, example: str, high: int = MAX_COUNT
) -> int:
    if isinstance(value, bool):
        raise _bad(option, value, need, example)
    try:
        number = operator.index(value)
    except TypeError:
        raise _bad(option, value, need, example) from None
    if number < low or number > high:
        raise _bad(option, value, need, example)
    return number


def _check_callable(option: str, value: Any, need: str, example: str) -> Callable[..., Any]:
    if not callable(value):
        raise _bad(option, value, need, example)
    return value  # type: ignore[no-any-return]


def _check_arity(option: str, value: Callable[..., Any], least: int, shape: str) -> None:
    if positional_arity(value, least) < least:
        raise ConfigurationError(
            f"@opero({option}={value!r}) is invalid: {option} is called as {shape}, "
            f"but it takes fewer positional arguments; define it as {shape}."
        )


def _check_retry_on(value: Any) -> tuple[type[BaseException], ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise _bad(
            "retry_on",
            value,
            "an exception type or a non-empty tuple/list of them",
            "(ConnectionError, TimeoutError)",
        )
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise _bad(
                "retry_on",
                value,
                "an exception type or a tuple/list of exception types",
                "(ConnectionError, TimeoutError)",
            )
        if not issubclass(item, Exception):
            raise ConfigurationError(
                f"@opero(retry_on={value!r}) is invalid: {item.__name__} is not an "
                "Exception subclass; KeyboardInterrupt, SystemExit, GeneratorExit and "
                "asyncio.CancelledError are never retried. Use Exception subclasses, "
                "for example retry_on=(ConnectionError, TimeoutError)."
            )
    return items


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(OPTION_NAMES), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; see help(opero.opero) for the options"


def fallback_parameter(func: Callable[..., Any], name: str) -> inspect.Parameter:
    """Return the parameter ``name`` of ``func`` for ``arg_fallback``, or raise.

    Raises:
        ConfigurationError: ``name`` is not a named parameter of ``func``.

    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"@opero(arg_fallback={name!r}) needs the signature of {func!r}, which "
            "cannot be read; decorate a Python function."
        ) from exc
    param = sig.parameters.get(name)
    if param is None or param.kind in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ):
        names = [
            p.name
            for p in sig.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        qualname = getattr(func, "__qualname__", repr(func))
        raise ConfigurationError(
            f"@opero(arg_fallback={name!r}) is invalid: {qualname}{sig} has no "
            f"parameter named {name!r}; arg_fallback must name one of {names}."
        )
    return param


def build_policy(func: Callable[..., Any] | None, options: Mapping[str, Any]) -> Policy:
    """Validate ``options`` (for ``func`` when known) and return the frozen policy.

    Args:
        func: The function being decorated; ``None`` validates everything that
            does not depend on it (``arg_fallback`` is then checked later).
        options: The keyword arguments given to ``opero(...)``.

    Raises:
        TypeError: An unknown option (the message names the closest valid one).
        ConfigurationError: A bad value (the message names the option, the
            value received and the fix).

    """
    for name in options:
        if name not in _ALL_NAMES:
            raise TypeError(f"opero() got an unexpected option {name!r}{_suggest(name)}")

    o = {**DEFAULTS, **PRIVATE_DEFAULTS, **options}

    retries = _check_int(
        "retries",
        o["retries"],
        low=0,
        need=f"an int >= 0 and <= {MAX_COUNT} (retries after the first call)",
        example="3",
    )
    backoff_factor = _check_real(
        "backoff_factor",
        o["backoff_factor"],
        low=1.0,
        strict=False,
        need="a finite number >= 1 (growth of the delay per retry)",
        example="2.0",
    )
    min_delay = _check_real(
        "min_delay",
        o["min_delay"],
        low=0.0,
        strict=False,
        high=MAX_SECONDS,
        need=f"a finite number of seconds >= 0 and <= {MAX_SECONDS:g}",
        example="0.1",
    )
    max_delay = _check_real(
        "max_delay",
        o["max_delay"],
        low=0.0,
        strict=False,
        high=MAX_SECONDS,
        need=f"a finite number of seconds >= 0 and <= {MAX_SECONDS:g}",
        example="30.0",
    )
    if max_delay < min_delay:
        raise ConfigurationError(
            f"@opero(min_delay={o['min_delay']!r}, max_delay={o['max_delay']!r}) is invalid: "
            f"max_delay must be >= min_delay; for example max_delay={max(30.0, min_delay)!r}."
        )
    if not isinstance(o["jitter"], bool):
        raise _bad("jitter", o["jitter"], "True or False", "True")
    retry_on = _check_retry_on(o["retry_on"])

    retry_predicate = o["retry_predicate"]
    predicate_arity = 1
    if retry_predicate is not None:
        _check_callable(
            "retry_predicate",
            retry_predicate,
            "a callable predicate(exception) -> bool",
            "lambda exc: getattr(exc, 'status', 500) >= 500",
        )
        _check_arity("retry_predicate", retry_predicate, 1, "predicate(exception)")
        predicate_arity = _required_positional(retry_predicate)
    backoff_function = o["backoff_function"]
    if backoff_function is not None:
        _check_callable(
            "backoff_function",
            backoff_function,
            "a callable backoff_function(attempt) -> seconds (attempt is 0-based)",
            "lambda attempt: 0.5 * 2**attempt",
        )
        _check_arity("backoff_function", backoff_function, 1, "backoff_function(attempt)")

    arg_fallback = o["arg_fallback"]
    if arg_fallback is not None:
        if not isinstance(arg_fallback, str) or not arg_fallback.isidentifier():
            raise _bad(
                "arg_fallback",
                arg_fallback,
                "the name of a parameter of the decorated function (a str)",
                "'endpoint'",
            )
        if func is not None:
            fallback_parameter(func, arg_fallback)

    rate_limit = o["rate_limit"]
    if rate_limit is not None and not callable(rate_limit):
        rate_limit = _check_real(
            "rate_limit",
            rate_limit,
            low=MIN_RATE,
            strict=False,
            need=(
                f"calls per second (a finite number >= {MIN_RATE:g}: one call per "
                f"{MAX_SECONDS:g} s at the slowest, as a longer wait cannot be slept) "
                "or a zero-argument callable returning one"
            ),
            example="10.0",
        )
    elif rate_limit is not None:
        _check_zero_arg("rate_limit", rate_limit)
    rate_burst = _check_int(
        "rate_burst",
        o["rate_burst"],
        low=1,
        high=MAX_BURST,
        need=f"an int >= 1 and <= {MAX_BURST} (calls allowed at once)",
        example="5",
    )
    rate_limit_key = o["rate_limit_key"]
    if rate_limit_key is not None and (not isinstance(rate_limit_key, str) or not rate_limit_key):
        raise _bad(
            "rate_limit_key",
            rate_limit_key,
            "a non-empty str naming a bucket shared by every function using it",
            "'github-api'",
        )
    rate_max_wait = o["rate_max_wait"]
    if rate_max_wait is not None:
        rate_max_wait = _check_real(
            "rate_max_wait",
            rate_max_wait,
            low=0.0,
            strict=False,
            high=MAX_SECONDS,
            need=(
                f"None (no limit) or seconds >= 0 and <= {MAX_SECONDS:g} (the longest wait "
                "for a token before RateLimitTimeout)"
            ),
            example="5.0",
        )
    rate_limit_backend = o["rate_limit_backend"]
    if rate_limit_backend not in _RATE_BACKENDS:
        raise _bad(
            "rate_limit_backend",
            rate_limit_backend,
            "'memory' (this process) or 'redis' (shared by processes and hosts)",
            "'redis'",
        )
    if rate_limit is None:
        extra = [
            n
            for n in (
                "rate_burst",
                "rate_limit_key",
                "rate_max_wait",
                "rate_limit_backend",
                "rate_limit_redis_url",
            )
            if n in options
        ]
        if extra:
            raise ConfigurationError(
                f"@opero({extra[0]}={options[extra[0]]!r}) has no effect without rate_limit; "
                "set rate_limit=<calls per second>, for example rate_limit=10.0."
            )

    if rate_limit_backend == "redis" and rate_limit_key is None:
        raise ConfigurationError(
            "@opero(rate_limit_backend='redis') needs rate_limit_key: the name of the bucket "
            "shared through Redis; for example rate_limit_key='github-api'."
        )
    rate_limit_redis_url = o["rate_limit_redis_url"]
    if rate_limit_redis_url is not None and rate_limit_backend != "redis":
        raise ConfigurationError(
            f"@opero(rate_limit_redis_url={rate_limit_redis_url!r}) is only used with "
            "rate_limit_backend='redis'; add rate_limit_backend='redis' or drop it."
        )
    callbacks: dict[str, Callable[..., Any] | None] = {}
    for name, shape, least in (
        ("on_retry", "on_retry(exception) or on_retry(exception, attempt)", 1),
        ("on_success", "on_success(result) or on_success()", 0),
        ("on_failure", "on_failure(exception)", 1),
        ("on_cache_hit", "on_cache_hit()", 0),
    ):
        cb = o[name]
        if cb is not None:
            _check_callable(name, cb, f"a callable {shape}", "lambda *a: None")
            if least:
                _check_arity(name, cb, least, shape)
        callbacks[name] = cb

    cache = o["cache"]
    if not isinstance(cache, bool):
        raise _bad("cache", cache, "True or False", "True")
    cache_ttl = o["cache_ttl"]
    if cache_ttl is not None:
        cache_ttl = _check_real(
            "cache_ttl",
            cache_ttl,
            low=0.0,
            strict=True,
            high=MAX_SECONDS,
            need=f"None (no expiry) or seconds > 0 and <= {MAX_SECONDS:g}",
            example="3600",
        )
    cache_max_size = o["cache_max_size"]
    if cache_max_size is not None:
        cache_max_size = _check_int(
            "cache_max_size",
            cache_max_size,
            low=1,
            need=f"None (unbounded) or an int >= 1 and <= {MAX_COUNT}",
            example="1024",
        )
    cache_namespace = o["cache_namespace"]
    if not isinstance(cache_namespace, str) or not cache_namespace:
        raise _bad("cache_namespace", cache_namespace, "a non-empty str", "'myapp'")
    cache_key = o["cache_key"]
    if cache_key is not None:
        _check_callable(
            "cache_key",
            cache_key,
            "a callable cache_key(func, *args, **kwargs) returning the key",
            "lambda func, *a, **k: (func.__qualname__, a)",
        )
    cache_backend = o["cache_backend"]
    if isinstance(cache_backend, str):
        if cache_backend not in _CACHE_BACKENDS:
            raise _bad(
                "cache_backend",
                cache_backend,
                "'memory', 'redis', 'disk' or a backend object (with open() and stable_keys)",
                "'redis'",
            )
        backend_name: str | None = cache_backend
    elif callable(getattr(cache_backend, "open", None)) and hasattr(cache_backend, "stable_keys"):
        backend_name = None
    else:
        raise _bad(
            "cache_backend",
            cache_backend,
            "'memory', 'redis', 'disk' or a backend object (with open() and stable_keys)",
            "'redis'",
        )
    if not isinstance(o["cache_strict"], bool):
        raise _bad("cache_strict", o["cache_strict"], "True or False", "True")
    for name, only in (
        ("cache_redis_url", ("redis",)),
        ("cache_dir", ("disk",)),
        ("cache_serializer", ("redis", "disk")),
        ("cache_secret", ("redis", "disk")),
        ("cache_strict", ("redis", "disk")),
        # Redis and disk have no per-function entry bound (Redis: maxmemory policy and
        # cache_ttl; disk: a size limit in bytes), so a bound there would be a silent no-op.
        ("cache_max_size", ("memory",)),
    ):
        if name in options and backend_name is not None and backend_name not in only:
            wanted = " or ".join(repr(b) for b in only)
            raise ConfigurationError(
                f"@opero({name}={options[name]!r}) is only used with cache_backend={wanted}, "
                f"not {backend_name!r}; set cache_backend={only[0]!r} or drop {name}."
            )
    if not cache:
        given = [n for n in options if n.startswith("cache_")]
        if given:
            raise ConfigurationError(
                f"@opero({given[0]}={options[given[0]]!r}) has no effect without cache=True; "
                "add cache=True to cache results."
            )

    limiter = o["_limiter"]
    if limiter is not None and not callable(getattr(limiter, "reserve", None)):
        raise _bad("_limiter", limiter, "an object with reserve(rate=None) -> seconds", "...")
    sleep = o["_sleep"]
    if sleep is not None:
        _check_callable("_sleep", sleep, "a callable sleep(seconds)", "time.sleep")
    asleep = o["_asleep"]
    if asleep is not None:
        _check_callable("_asleep", asleep, "an async callable sleep(seconds)", "asyncio.sleep")
    seed = o["_backoff_seed"]
    if seed is not None:
        _check_int(
            "_backoff_seed", seed, low=0, high=2**64 - 1, need="an int in [0, 2**64)", example="42"
        )

    normalized = {k: v for k, v in options.items() if k != "_limiter"}
    if "retry_on" in normalized:
        normalized["retry_on"] = retry_on
    for name, value in (
        ("backoff_factor", backoff_factor),
        ("min_delay", min_delay),
        ("max_delay", max_delay),
    ):
        if name in normalized:
            normalized[name] = value

    return Policy(
        retries=retries,
        backoff_factor=backoff_factor,
        min_delay=min_delay,
        max_delay=max_delay,
        jitter=o["jitter"],
        retry_on=retry_on,
        retry_predicate=retry_predicate,
        retry_predicate_arity=predicate_arity,
        backoff_function=backoff_function,
        arg_fallback=arg_fallback,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        rate_limit_key=rate_limit_key,
        rate_max_wait=rate_max_wait,
        rate_limit_backend=rate_limit_backend,
        rate_limit_redis_url=rate_limit_redis_url,
        on_retry=callbacks["on_retry"],
        on_success=callbacks["on_success"],
        on_failure=callbacks["on_failure"],
        on_cache_hit=callbacks["on_cache_hit"],
        cache=cache,
        cache_ttl=cache_ttl,
        cache_max_size=cache_max_size,
        cache_namespace=cache_namespace,
        cache_key=cache_key,
        cache_backend=cache_backend,
        cache_redis_url=o["cache_redis_url"],
        cache_serializer=o["cache_serializer"],
        cache_secret=o["cache_secret"],
        cache_strict=o["cache_strict"],
        cache_dir=o["cache_dir"],
        limiter=limiter,
        sleep=sleep,
        asleep=asleep,
        backoff_seed=seed,
        options=MappingProxyType(normalized),
    )


def _required_positional(func: Callable[..., Any]) -> int:
    """Return how many positional parameters of ``func`` have no default (at least 1)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return 1
    count = 0
    for param in sig.parameters.values():
        if (
            param.kind
            in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
            and param.default is inspect.Parameter.empty
        ):
            count += 1
    return max(1, min(count, 2))


def _check_zero_arg(option: str, value: Callable[..., Any]) -> None:
    try:
        sig = inspect.signature(value)
    except (TypeError, ValueError):
        return
    required = [
        p
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise ConfigurationError(
            f"@opero({option}={value!r}) is invalid: a callable {option} is read on every "
            "call with no arguments, but it requires "
            f"{', '.join(p.name for p in required)}; for example {option}=lambda: 10.0."
        )
