"""The frozen per-stage policies of one ``@opero`` decoration, built from the option table.

:func:`build_policy` runs once per decoration: an unknown name is a
``TypeError`` naming the closest valid one (``difflib``), a bad value is a
:class:`~opero.errors.ConfigurationError` from the option's own check (see
:mod:`opero._pipeline.options`), then the cross-option rules run. The call
path never re-validates: it reads the frozen policies.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from opero._pipeline.checks import (
    MAX_BURST,
    MAX_SECONDS,
    MIN_RATE,
    check_rate,
    check_seconds,
    required_positional,
)
from opero._pipeline.options import BY_NAME, OPTION_NAMES, OPTIONS, RULES

__all__ = [
    "MAX_BURST",
    "MAX_SECONDS",
    "MIN_RATE",
    "OPTION_NAMES",
    "CachePolicy",
    "BreakerPolicy",
    "CallbackPolicy",
    "FallbackPolicy",
    "Policy",
    "RateLimitPolicy",
    "RetryPolicy",
    "WaitPolicy",
    "build_policy",
    "check_rate",
    "check_seconds",
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Stage ``retry``: how many rounds, which errors, how long between them."""

    retries: int
    backoff_factor: float
    min_delay: float
    max_delay: float
    jitter: bool
    retry_on: tuple[type[BaseException], ...]
    retry_predicate: Callable[..., Any] | None
    backoff_function: Callable[[int], float] | None
    backoff_seed: int | None
    retry_after: bool | Callable[[BaseException], Any]
    retry_on_result: Callable[[Any], Any] | None
    timeout: float | None
    attempt_timeout: float | None

    @property
    def retry_predicate_arity(self) -> int:
        """How ``retry_predicate`` is called: 1 (``exc``) or 2 (``exc, None``)."""
        if self.retry_predicate is None:
            return 1
        return required_positional(self.retry_predicate)


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """Stage ``fallback``: the parameter holding the candidates."""

    arg_fallback: str | None


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Stage ``breaker``: the circuit breaker guarding every real call."""

    circuit_breaker: Any


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Stage ``rate_limit``: one token per real call."""

    rate_limit: float | Callable[[], float] | tuple[tuple[int, float], ...] | None
    rate_burst: int
    rate_limit_key: str | Callable[..., str] | None
    rate_max_wait: float | None
    rate_limit_backend: str
    rate_limit_redis_url: Any
    limiter: Any
    rate_limit_max_keys: int
    rate_clock: Any


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """Stage ``callbacks``: the user's hooks (arity adapted later)."""

    on_retry: Callable[..., Any] | None
    on_success: Callable[..., Any] | None
    on_failure: Callable[..., Any] | None
    on_cache_hit: Callable[..., Any] | None
    on_circuit_open: Callable[..., Any] | None


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Stage ``cache``: whether, where and how long results are kept."""

    cache: bool
    cache_ttl: float | None
    cache_max_size: int | None
    cache_policy: str
    cache_namespace: str
    cache_key: Callable[..., Any] | None
    cache_backend: Any
    cache_redis_url: Any
    cache_serializer: Any
    cache_secret: Any
    cache_strict: bool
    cache_dir: Any


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    """The private waits (tests inject them): ``None`` means ``time.sleep``/``asyncio.sleep``."""

    sleep: Callable[[float], Any] | None
    asleep: Callable[[float], Any] | None
    clock: Callable[[], float] | None


#: The policy class of each stage of the option table.
STAGE_POLICIES: dict[str, type[Any]] = {
    "cache": CachePolicy,
    "retry": RetryPolicy,
    "fallback": FallbackPolicy,
    "breaker": BreakerPolicy,
    "rate_limit": RateLimitPolicy,
    "callbacks": CallbackPolicy,
    "wait": WaitPolicy,
}

# Policy attribute holding each stage (``cache`` and ``rate_limit`` are option names).
_STAGE_ATTR = {
    "cache": "caching",
    "retry": "retry",
    "fallback": "fallback",
    "breaker": "breaker",
    "rate_limit": "rate",
    "callbacks": "callbacks",
    "wait": "wait",
}
# Flat name (an option's field) -> the Policy attribute of its stage.
_FLAT = {o.field: _STAGE_ATTR[o.stage] for o in OPTIONS} | {"retry_predicate_arity": "retry"}

# Options given as these are kept normalized in ``Policy.options``.
_NORMALIZED = ("retry_on", "backoff_factor", "min_delay", "max_delay")


@dataclass(frozen=True)  # no slots: with __getattr__, 3.11's slotted frozen setattr breaks
class Policy:
    """The validated options of one ``@opero`` decoration (immutable), by stage.

    Every option is also readable flat (``policy.retries``, ``policy.cache_ttl``,
    ``policy.limiter``), for the layers outside the pipeline.

    Attributes:
        retry: Stage ``retry`` (:class:`RetryPolicy`).
        fallback: Stage ``fallback`` (:class:`FallbackPolicy`).
        rate: Stage ``rate_limit`` (:class:`RateLimitPolicy`).
        callbacks: Stage ``callbacks`` (:class:`CallbackPolicy`).
        caching: Stage ``cache`` (:class:`CachePolicy`).
        wait: The private waits (:class:`WaitPolicy`).
        breaker: Stage ``breaker`` (:class:`BreakerPolicy`).
        options: The read-only mapping of the options the user passed, after
            normalization (``retry_on`` as a tuple), without the private
            ``_limiter``: ``opero(**policy.options)`` rebuilds an equivalent
            decorator.

    """

    retry: RetryPolicy
    fallback: FallbackPolicy
    rate: RateLimitPolicy
    callbacks: CallbackPolicy
    caching: CachePolicy
    wait: WaitPolicy
    breaker: BreakerPolicy
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __getattr__(self, name: str) -> Any:
        """Read an option flat from its stage (``policy.retries`` is ``policy.retry.retries``)."""
        stage = _FLAT.get(name)
        if stage is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, stage), name)

    @property
    def has_rate_limit(self) -> bool:
        """Whether every real call takes a token (``rate_limit`` or ``_limiter``)."""
        return self.rate.rate_limit is not None or self.rate.limiter is not None

    @property
    def has_fallback(self) -> bool:
        """Whether ``arg_fallback`` is configured."""
        return self.fallback.arg_fallback is not None


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(OPTION_NAMES), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; see help(opero.opero) for the options"


def check_options(func: Callable[..., Any] | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """Return every option's checked value (defaults for those not given).

    Raises:
        TypeError: An unknown option (the message names the closest valid one).
        ConfigurationError: A bad value, or options that contradict each other.

    """
    for name in options:
        if name not in BY_NAME:
            raise TypeError(f"opero() got an unexpected option {name!r}{_suggest(name)}")
    values = {
        o.name: o.check(o.name, options[o.name]) if o.name in options else o.default
        for o in OPTIONS
    }
    for rule in RULES:
        rule(values, options, func)
    return values


def _plain_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``options`` with subclasses of ``str``, ``int`` and ``float`` as the plain type.

    The value is read the way the base type stores it, so a subclass's own
    ``__eq__``, ``__hash__``, ``__len__``, ``__index__`` or ``__float__`` (which may
    raise, or disagree with the value) never runs in a check, in a message or when
    the value is used later (a cache namespace or bucket name as a dict key).
    """
    plain: dict[str, Any] = {}
    for name, value in options.items():
        kind = type(value)
        if kind is bool or kind in (str, int, float):
            plain[name] = value
        elif isinstance(value, str):
            plain[name] = str.__str__(value)
        elif isinstance(value, int):
            plain[name] = int.__int__(value)
        elif isinstance(value, float):
            plain[name] = float.__float__(value)
        else:
            plain[name] = value
    return plain


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
    options = _plain_values(options)
    values = check_options(func, options)
    stages = {
        stage: cls(**{o.field: values[o.name] for o in OPTIONS if o.stage == stage})
        for stage, cls in STAGE_POLICIES.items()
    }
    normalized = {k: v for k, v in options.items() if k != "_limiter"}
    for name in _NORMALIZED:
        if name in normalized:
            normalized[name] = values[name]
    return Policy(
        **{_STAGE_ATTR[stage]: policy for stage, policy in stages.items()},
        options=MappingProxyType(normalized),
    )


def stage_fields(stage: str) -> frozenset[str]:
    """Return the field names of ``stage``'s policy class (for the table's consistency test)."""
    return frozenset(f.name for f in fields(STAGE_POLICIES[stage]))
