"""Every ``@opero`` option, declared once: name, stage, default, check and doc.

:data:`OPTIONS` is the single source of truth. The frozen per-stage policies
(:mod:`opero._pipeline.policy`) are built from it, unknown names are refused
against it, and a test keeps the typed ``opero()`` signature and the option
tables of ``docs/opero.md`` equal to it (names and defaults). Adding an option
is one row here, one field in its stage's policy, one parameter in the typed
``opero()`` overload and one row in the docs.

Rules that involve several options live in :data:`RULES`, a short list of
functions run after every value passed its own check.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opero._pipeline import checks as c
from opero._pipeline.fallback import fallback_parameter
from opero.cache._memory import MemoryBackend
from opero.errors import ConfigurationError

__all__ = ["OPTIONS", "OPTION_NAMES", "RULES", "STAGES", "Option"]

#: The stages, in pipeline order (outside in), then the waits (private test hooks).
STAGES = ("cache", "retry", "fallback", "breaker", "rate_limit", "callbacks", "wait")


@dataclass(frozen=True, slots=True)
class Option:
    """One ``@opero`` option.

    Attributes:
        name: The keyword, as users write it.
        stage: The pipeline stage (and per-stage policy) it belongs to.
        default: The value when not given.
        check: ``check(name, value) -> normalized value``; raises ``ConfigurationError``.
        doc: One line saying what it does.
        private: For opero's own layers and tests (leading underscore), not documented.

    """

    name: str
    stage: str
    default: Any
    check: c.Checker
    doc: str
    private: bool = False

    @property
    def field(self) -> str:
        """The attribute name in the stage policy (the name without a leading ``_``)."""
        return self.name.lstrip("_")


def _retry_on(option: str, value: Any) -> tuple[type[BaseException], ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    example = "(ConnectionError, TimeoutError)"
    if not items:
        raise c.bad(option, value, "an exception type or a non-empty tuple/list of them", example)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise c.bad(
                option, value, "an exception type or a tuple/list of exception types", example
            )
        if not issubclass(item, Exception):
            raise ConfigurationError(
                f"@opero(retry_on={c.show(value)}) is invalid: {item.__name__} is not an "
                "Exception subclass; KeyboardInterrupt, SystemExit, GeneratorExit and "
                "asyncio.CancelledError are never retried. Use Exception subclasses, "
                f"for example retry_on={example}."
            )
    return items


_RATE = c.real(
    f"calls per second (a finite number >= {c.MIN_RATE:g}: one call per "
    f"{c.MAX_SECONDS:g} s at the slowest, as a longer wait cannot be slept) "
    "or a zero-argument callable returning one",
    "10.0",
    low=c.MIN_RATE,
)


def _rate_limit(option: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        from opero._ratelimit.windows import check_windows

        return check_windows(value)
    if not callable(value):
        return _RATE(option, value)
    try:
        sig = inspect.signature(value)
    except Exception:  # unreadable (a builtin), or a __signature__ that raises
        return value
    required = [
        p.name
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise ConfigurationError(
            f"@opero({option}={c.show(value)}) is invalid: a callable {option} is read on every "
            f"call with no arguments, but it requires {', '.join(required)}; for example "
            f"{option}=lambda: 10.0."
        )
    return value


def _retry_after(option: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    return c.function(
        "True (read Retry-After and retry_after from the error), False (off) or a callable "
        "retry_after(exception) -> seconds | None",
        "lambda exc: getattr(exc, 'wait', None)",
        least=1,
        shape="retry_after(exception)",
        sync=True,
    )(option, value)


CACHE_BACKENDS = ("memory", "redis", "disk")
CACHE_POLICIES = ("lru", "tinylfu")


def _cache_backend(option: str, value: Any) -> Any:
    if isinstance(value, str) and value in CACHE_BACKENDS:
        return value
    if not isinstance(value, str) and (
        callable(getattr(value, "open", None)) and hasattr(value, "stable_keys")
    ):
        return value
    raise c.bad(
        option,
        value,
        "'memory', 'redis', 'disk' or a backend object (with open() and stable_keys)",
        "'redis'",
    )


_KEY_TEXT = c.text(
    "a non-empty str naming a bucket shared by every function using it, or a "
    "callable(*args, **kwargs) -> str called with each call's arguments",
    "'github-api'",
)


def _rate_limit_key(option: str, value: Any) -> Any:
    if callable(value) and not isinstance(value, str):
        try:
            params = inspect.signature(value).parameters.values()
        except Exception:  # unreadable (a builtin): called as it is
            return value
        if not params:
            raise ConfigurationError(
                f"@opero({option}={c.show(value)}) is invalid: a callable {option} is called "
                "with each call's arguments and returns its bucket's name, but it takes none; "
                f"a fixed name is written {option}='github-api', a name per call "
                f"{option}=lambda user, *args, **kwargs: f'user:{{user}}'."
            )
        return value
    return _KEY_TEXT(option, value)


def _limiter(option: str, value: Any) -> Any:
    if not callable(getattr(value, "reserve", None)):
        raise c.bad(option, value, "an object with reserve(rate=None) -> seconds", "...")
    return value


def _circuit_breaker(option: str, value: Any) -> Any:
    from opero._pipeline.breaker import CircuitBreaker

    if not isinstance(value, CircuitBreaker):
        raise c.bad(
            option,
            value,
            "None or an opero.CircuitBreaker (one object may guard several functions)",
            "opero.CircuitBreaker(failures=5, reset_after=30.0)",
        )
    return value


_SECONDS = f"a finite number of seconds >= 0 and <= {c.MAX_SECONDS:g}"
_CALLBACK = "lambda *a: None"


#: Every option, in documentation order within its stage.
OPTIONS: tuple[Option, ...] = (
    # retry
    Option(
        "retries",
        "retry",
        3,
        c.integer(f"an int >= 0 and <= {c.MAX_COUNT} (retries after the first call)", "3", low=0),
        "retries after the first call: up to retries + 1 calls",
    ),
    Option(
        "backoff_factor",
        "retry",
        1.5,
        c.real("a finite number >= 1 (growth of the delay per retry)", "2.0", low=1.0),
        "growth of the wait per retry",
    ),
    Option(
        "min_delay",
        "retry",
        0.1,
        c.real(_SECONDS, "0.1", low=0.0, high=c.MAX_SECONDS),
        "wait before the first retry (before jitter), in seconds",
    ),
    Option(
        "max_delay",
        "retry",
        30.0,
        c.real(_SECONDS, "30.0", low=0.0, high=c.MAX_SECONDS),
        "cap on the schedule's waits, in seconds; a longer server wait stops retrying "
        "(a backoff_function's waits are its own)",
    ),
    Option("jitter", "retry", True, c.flag, "draw each wait uniformly from [d/2, d] instead of d"),
    Option("retry_on", "retry", (Exception,), _retry_on, "which errors may be retried"),
    Option(
        "retry_predicate",
        "retry",
        None,
        c.optional(
            c.function(
                "a callable predicate(exception) -> bool",
                "lambda exc: getattr(exc, 'status', 500) >= 500",
                least=1,
                shape="predicate(exception)",
                sync=True,
            )
        ),
        "after retry_on matched: return True to retry",
    ),
    Option(
        "backoff_function",
        "retry",
        None,
        c.optional(
            c.function(
                "a callable backoff_function(attempt) -> seconds (attempt is 0-based)",
                "lambda attempt: 0.5 * 2**attempt",
                least=1,
                shape="backoff_function(attempt)",
                sync=True,
            )
        ),
        "replaces the schedule; attempt counts retries from 0",
    ),
    Option(
        "retry_after",
        "retry",
        True,
        _retry_after,
        "honour a server's Retry-After (or retry_after attribute) instead of the backoff wait",
    ),
    Option(
        "retry_on_result",
        "retry",
        None,
        c.optional(
            c.function(
                "a callable predicate(result) -> bool",
                "lambda result: result is None",
                least=1,
                shape="predicate(result)",
                sync=True,
            )
        ),
        "return True to treat a result as a failed call and retry",
    ),
    Option(
        "timeout",
        "retry",
        None,
        c.optional(
            c.real(
                f"None (no deadline) or seconds > 0 and <= {c.MAX_SECONDS:g}",
                "10.0",
                low=0.0,
                strict=True,
                high=c.MAX_SECONDS,
            )
        ),
        "deadline of the whole call, retries and waits included, in seconds",
    ),
    Option(
        "attempt_timeout",
        "retry",
        None,
        c.optional(
            c.real(
                f"None or seconds > 0 and <= {c.MAX_SECONDS:g}",
                "2.0",
                low=0.0,
                strict=True,
                high=c.MAX_SECONDS,
            )
        ),
        "async def only: cancel an attempt after this many seconds (a retryable TimeoutError)",
    ),
    # fallback
    Option(
        "arg_fallback",
        "fallback",
        None,
        c.optional(
            c.text(
                "the name of a parameter of the decorated function (a str)",
                "'endpoint'",
                identifier=True,
            )
        ),
        "the parameter whose value is a list or tuple of candidates",
    ),
    # circuit breaker
    Option(
        "circuit_breaker",
        "breaker",
        None,
        c.optional(_circuit_breaker),
        "a CircuitBreaker guarding every call (each attempt and fallback candidate)",
    ),
    # rate limit
    Option(
        "rate_limit",
        "rate_limit",
        None,
        c.optional(_rate_limit),
        "sustained calls per second, a zero-argument callable read on every call, or "
        "windows [(calls, seconds), ...] that must all admit a call",
    ),
    Option(
        "rate_burst",
        "rate_limit",
        1,
        c.integer(
            f"an int >= 1 and <= {c.MAX_BURST} (calls allowed at once)",
            "5",
            low=1,
            high=c.MAX_BURST,
        ),
        "calls that may start at once",
    ),
    Option(
        "rate_limit_key",
        "rate_limit",
        None,
        c.optional(_rate_limit_key),
        "share one bucket by name, across functions; a callable(*args, **kwargs) -> str "
        "gives a bucket per returned key",
    ),
    Option(
        "rate_max_wait",
        "rate_limit",
        None,
        c.optional(
            c.real(
                f"None (no limit) or seconds >= 0 and <= {c.MAX_SECONDS:g} (the longest wait "
                "for a token before RateLimitTimeout)",
                "5.0",
                low=0.0,
                high=c.MAX_SECONDS,
            )
        ),
        "a longer wait for a token raises RateLimitTimeout",
    ),
    Option(
        "rate_limit_backend",
        "rate_limit",
        "memory",
        c.choice(
            ("memory", "redis"),
            "'memory' (this process) or 'redis' (shared by processes and hosts)",
            "'redis'",
        ),
        "'redis' shares the bucket between processes and hosts",
    ),
    Option(
        "rate_limit_redis_url",
        "rate_limit",
        None,
        c.anything,
        "the Redis (URL or client) of a 'redis' limit",
    ),
    Option(
        "rate_limit_max_keys",
        "rate_limit",
        10_000,
        c.integer(
            "an int >= 1 (live buckets kept for a callable rate_limit_key)", "100_000", low=1
        ),
        "with a callable rate_limit_key: the most buckets kept (full ones are dropped first)",
    ),
    # callbacks
    Option(
        "on_retry",
        "callbacks",
        None,
        c.optional(
            c.function(
                "a callable on_retry(exception) or on_retry(exception, attempt)",
                _CALLBACK,
                least=1,
                shape="on_retry(exception) or on_retry(exception, attempt)",
            )
        ),
        "called before each retry",
    ),
    Option(
        "on_success",
        "callbacks",
        None,
        c.optional(c.function("a callable on_success(result) or on_success()", _CALLBACK)),
        "called after a call that returned (not on cache hits)",
    ),
    Option(
        "on_failure",
        "callbacks",
        None,
        c.optional(
            c.function(
                "a callable on_failure(exception)",
                _CALLBACK,
                least=1,
                shape="on_failure(exception)",
            )
        ),
        "called once, with the error about to be raised",
    ),
    Option(
        "on_cache_hit",
        "callbacks",
        None,
        c.optional(c.function("a callable on_cache_hit()", _CALLBACK)),
        "called on every cache hit",
    ),
    Option(
        "on_circuit_open",
        "callbacks",
        None,
        c.optional(
            c.function("a callable on_circuit_open(details) or on_circuit_open()", _CALLBACK)
        ),
        "called when a call's failure opens the circuit breaker",
    ),
    Option(
        "on_fallback",
        "callbacks",
        None,
        c.optional(
            c.function(
                "a callable on_fallback(exception) or on_fallback(exception, index)",
                _CALLBACK,
                least=1,
                shape="on_fallback(exception) or on_fallback(exception, index)",
            )
        ),
        "called when a fallback candidate failed and the next one is tried",
    ),
    Option(
        "on_rate_limit_wait",
        "callbacks",
        None,
        c.optional(
            c.function("a callable on_rate_limit_wait(wait) or on_rate_limit_wait()", _CALLBACK)
        ),
        "called before sleeping for a rate-limit token, with the wait in seconds",
    ),
    # cache
    Option("cache", "cache", False, c.flag, "cache successful results"),
    Option(
        "cache_ttl",
        "cache",
        None,
        c.optional(
            c.real(
                f"None (no expiry) or seconds > 0 and <= {c.MAX_SECONDS:g}",
                "3600",
                low=0.0,
                strict=True,
                high=c.MAX_SECONDS,
            )
        ),
        "how long an entry lives, in seconds; None = until evicted",
    ),
    Option(
        "cache_max_size",
        "cache",
        1024,
        c.optional(
            c.integer(f"None (unbounded) or an int >= 1 and <= {c.MAX_COUNT}", "1024", low=1)
        ),
        "memory backend only: entries kept; None = unbounded",
    ),
    Option(
        "cache_policy",
        "cache",
        "lru",
        c.choice(CACHE_POLICIES, "'lru' or 'tinylfu'", "'tinylfu'"),
        "memory backend only: what a full store evicts (LRU or W-TinyLFU)",
    ),
    Option(
        "cache_namespace",
        "cache",
        "opero",
        c.text("a non-empty str", "'myapp'"),
        "group of entries that opero.clear_cache(namespace) clears",
    ),
    Option(
        "cache_key",
        "cache",
        None,
        c.optional(
            c.function(
                "a callable cache_key(func, *args, **kwargs) returning the key",
                "lambda func, *a, **k: (func.__qualname__, a)",
            )
        ),
        "cache_key(func, *args, **kwargs) replaces the default key",
    ),
    Option("cache_backend", "cache", "memory", _cache_backend, "where entries live"),
    Option("cache_redis_url", "cache", None, c.anything, "Redis backend only: a URL or a client"),
    Option(
        "cache_serializer",
        "cache",
        "pickle",
        c.anything,
        "Redis and disk only: how values are encoded",
    ),
    Option(
        "cache_secret", "cache", None, c.anything, "Redis and disk only: sign every value with HMAC"
    ),
    Option(
        "cache_strict", "cache", False, c.flag, "Redis and disk only: raise when the backend fails"
    ),
    Option("cache_dir", "cache", None, c.anything, "disk backend only: the directory"),
    # private: opero's own layers and tests
    Option(
        "_limiter",
        "rate_limit",
        None,
        c.optional(_limiter),
        "an object with reserve(rate=None) -> seconds; replaces the bucket",
        private=True,
    ),
    Option(
        "_rate_clock",
        "rate_limit",
        None,
        c.anything,
        "a ManualClock for the rate-limit buckets (tests)",
        private=True,
    ),
    Option(
        "_sleep",
        "wait",
        None,
        c.optional(c.function("a callable sleep(seconds)", "time.sleep")),
        "sync sleep(seconds) used for retry and rate-limit waits",
        private=True,
    ),
    Option(
        "_asleep",
        "wait",
        None,
        c.optional(c.function("an async callable sleep(seconds)", "asyncio.sleep", sync=False)),
        "async sleep(seconds)",
        private=True,
    ),
    Option(
        "_backoff_seed",
        "retry",
        None,
        c.optional(c.integer("an int in [0, 2**64)", "42", low=0, high=2**64 - 1)),
        "seed of the jitter RNG, for reproducible schedules",
        private=True,
    ),
    Option(
        "_clock",
        "wait",
        None,
        c.optional(c.function("a callable clock() -> seconds", "time.monotonic")),
        "monotonic clock() of the timeout deadline",
        private=True,
    ),
)


BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
#: The public option names.
OPTION_NAMES: frozenset[str] = frozenset(o.name for o in OPTIONS if not o.private)


# --- cross-option rules --------------------------------------------------------------
# Each rule gets the checked values (every option), the options given and the function
# (None when decorating later), and raises ConfigurationError.

Rule = Callable[[Mapping[str, Any], Mapping[str, Any], "Callable[..., Any] | None"], None]


def delays_ordered(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """``max_delay`` must be at least ``min_delay``."""
    if v["max_delay"] < v["min_delay"]:
        raise ConfigurationError(
            f"@opero(min_delay={c.show(given.get('min_delay', v['min_delay']))}, "
            f"max_delay={c.show(given.get('max_delay', v['max_delay']))}) is invalid: "
            f"max_delay must be >= min_delay; for example max_delay={max(30.0, v['min_delay'])!r}."
        )


def fallback_names_a_parameter(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """``arg_fallback`` names a parameter of the function (checked once it is known)."""
    if v["arg_fallback"] is not None and func is not None:
        fallback_parameter(func, v["arg_fallback"])


_RATE_OPTIONS = (
    "rate_burst",
    "rate_limit_key",
    "rate_max_wait",
    "rate_limit_backend",
    "rate_limit_max_keys",
)


def rate_options_need_rate_limit(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """``rate_*`` options do nothing without ``rate_limit``; a Redis bucket needs a key."""
    extra = [n for n in (*_RATE_OPTIONS, "rate_limit_redis_url") if n in given]
    if v["rate_limit"] is None and extra:
        raise ConfigurationError(
            f"@opero({extra[0]}={c.show(given[extra[0]])}) has no effect without rate_limit; "
            "set rate_limit=<calls per second>, for example rate_limit=10.0."
        )
    if v["rate_limit_backend"] == "redis" and v["rate_limit_key"] is None:
        raise ConfigurationError(
            "@opero(rate_limit_backend='redis') needs rate_limit_key: the name of the bucket "
            "shared through Redis; for example rate_limit_key='github-api'."
        )
    if isinstance(v["rate_limit"], tuple) and "rate_burst" in given:
        raise ConfigurationError(
            f"@opero(rate_limit={c.show(v['rate_limit'])}, "
            f"rate_burst={c.show(given['rate_burst'])}) is invalid: a window (calls, seconds) "
            "already lets its calls start at once; drop "
            "rate_burst, or add a short window such as (5, 0.1) to bound bursts."
        )
    if "rate_limit_max_keys" in given and not callable(v["rate_limit_key"]):
        raise ConfigurationError(
            f"@opero(rate_limit_max_keys={c.show(given['rate_limit_max_keys'])}) is only used "
            "with a callable rate_limit_key (a bucket per key); drop it, or set "
            "rate_limit_key=lambda *args, **kwargs: <key>."
        )
    if v["rate_limit_redis_url"] is not None and v["rate_limit_backend"] != "redis":
        raise ConfigurationError(
            f"@opero(rate_limit_redis_url={c.show(v['rate_limit_redis_url'])}) is only used with "
            "rate_limit_backend='redis'; add rate_limit_backend='redis' or drop it."
        )


#: Cache options that only one kind of backend uses. Redis and disk have no
#: per-function entry bound (Redis: maxmemory policy and cache_ttl; disk: a size
#: limit in bytes), so cache_max_size there would be a silent no-op.
BACKEND_ONLY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cache_redis_url", ("redis",)),
    ("cache_dir", ("disk",)),
    ("cache_serializer", ("redis", "disk")),
    ("cache_secret", ("redis", "disk")),
    ("cache_strict", ("redis", "disk")),
    ("cache_max_size", ("memory",)),
    ("cache_policy", ("memory",)),
)


def cache_options_fit_backend(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """Refuse a backend-specific ``cache_*`` option with another named backend."""
    backend = v["cache_backend"]
    if not isinstance(backend, str):
        return
    for name, only in BACKEND_ONLY:
        if name in given and backend not in only:
            wanted = " or ".join(repr(b) for b in only)
            raise ConfigurationError(
                f"@opero({name}={c.show(given[name])}) is only used with cache_backend={wanted}, "
                f"not {c.show(backend)}; set cache_backend={only[0]!r} or drop {name}."
            )


def cache_policy_fits(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """Refuse ``tinylfu`` without a bound, and ``cache_policy`` with a non-memory backend object."""
    if v["cache_policy"] == "tinylfu" and v["cache_max_size"] is None:
        raise ConfigurationError(
            "@opero(cache_policy='tinylfu') needs a bound: an unbounded store never evicts; "
            "set cache_max_size (for example cache_max_size=1024) or drop cache_policy."
        )
    backend = v["cache_backend"]
    if "cache_policy" in given and not isinstance(backend, (str, MemoryBackend)):
        raise ConfigurationError(
            f"@opero(cache_policy={v['cache_policy']!r}) is only used with the memory backend, "
            f"not {type(backend).__name__}; drop cache_policy or use cache_backend='memory'."
        )


def cache_options_need_cache(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """``cache_*`` options do nothing without ``cache=True``."""
    extra = [n for n in given if n.startswith("cache_")]
    if not v["cache"] and extra:
        raise ConfigurationError(
            f"@opero({extra[0]}={c.show(given[extra[0]])}) has no effect without cache=True; "
            "add cache=True to cache results."
        )


def circuit_hook_needs_breaker(v: Mapping[str, Any], given: Mapping[str, Any], func: Any) -> None:
    """``on_circuit_open`` does nothing without ``circuit_breaker``."""
    if v["on_circuit_open"] is not None and v["circuit_breaker"] is None:
        raise ConfigurationError(
            "@opero(on_circuit_open=...) has no effect without circuit_breaker; set "
            "circuit_breaker=opero.CircuitBreaker(...) or drop on_circuit_open."
        )


#: The cross-option rules, run in this order after the per-option checks.
RULES: tuple[Rule, ...] = (
    delays_ordered,
    fallback_names_a_parameter,
    rate_options_need_rate_limit,
    cache_options_fit_backend,
    cache_policy_fits,
    cache_options_need_cache,
    circuit_hook_needs_breaker,
)
