"""Option validation of @opero: unknown names, bad values, bare use and non-callables."""

from __future__ import annotations

import re
from typing import Any

import pytest

from opero import ConfigurationError, opero


def f(x: int, endpoint: list[str] | None = None) -> int:
    return x


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("retires", "retries"), ("cache_tll", "cache_ttl"), ("ratelimit", "rate_limit")],
)
def test_unknown_option_is_a_type_error_naming_the_closest(name: str, suggestion: str) -> None:
    """An unknown option raises TypeError naming it and the closest valid option."""
    with pytest.raises(TypeError, match=rf"{name!r}.*did you mean {suggestion!r}"):
        opero(**{name: 1})


def test_unknown_option_without_close_match_points_to_help() -> None:
    """An unknown option with no close match still names itself and points to the docs."""
    with pytest.raises(TypeError, match=r"'zzzz'.*help"):
        opero(zzzz=1)


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"retries": -1}, r"retries=-1.*int >= 0"),
    ({"retries": 1.5}, r"retries=1.5"),
    ({"retries": True}, r"retries=True"),
    ({"backoff_factor": 0.5}, r"backoff_factor=0.5.*>= 1"),
    ({"min_delay": -1}, r"min_delay=-1"),
    ({"max_delay": float("nan")}, r"max_delay=nan"),
    ({"min_delay": 5, "max_delay": 1}, r"max_delay must be >= min_delay"),
    ({"jitter": "yes"}, r"jitter='yes'"),
    ({"retry_on": 42}, r"retry_on=42.*exception type"),
    ({"retry_on": "ValueError"}, r"retry_on='ValueError'"),
    ({"retry_on": ()}, r"retry_on=\(\).*non-empty"),
    ({"retry_on": KeyboardInterrupt}, r"KeyboardInterrupt is not an Exception subclass"),
    ({"retry_predicate": 3}, r"retry_predicate=3.*callable"),
    ({"retry_predicate": lambda: True}, r"retry_predicate=.*predicate\(exception\)"),
    ({"backoff_function": "fast"}, r"backoff_function='fast'"),
    ({"arg_fallback": 3}, r"arg_fallback=3"),
    ({"rate_limit": -5}, r"rate_limit=-5.*>= 1e-09"),
    ({"rate_limit": 0}, r"rate_limit=0"),
    ({"rate_limit": float("inf")}, r"rate_limit=inf"),
    ({"rate_limit": lambda x: x}, r"rate_limit=.*no arguments.*requires x"),
    ({"rate_limit": 1, "rate_burst": 0}, r"rate_burst=0.*>= 1"),
    ({"rate_limit": 1, "rate_limit_key": ""}, r"rate_limit_key=''"),
    ({"rate_limit": 1, "rate_max_wait": -1}, r"rate_max_wait=-1"),
    ({"rate_limit": 1, "rate_limit_backend": "etcd"}, r"rate_limit_backend='etcd'"),
    ({"rate_limit": 1, "rate_limit_backend": "redis"}, r"needs rate_limit_key"),
    ({"rate_limit": 1, "rate_limit_redis_url": "redis://x"}, r"only used with rate_limit_backend"),
    ({"rate_burst": 3}, r"rate_burst=3.*without rate_limit"),
    ({"on_retry": "print"}, r"on_retry='print'"),
    ({"on_retry": lambda: None}, r"on_retry.*on_retry\(exception\)"),
    ({"on_failure": lambda: None}, r"on_failure"),
    ({"on_success": 1}, r"on_success=1"),
    ({"on_cache_hit": 1}, r"on_cache_hit=1"),
    ({"cache": "yes"}, r"cache='yes'"),
    ({"cache": True, "cache_ttl": 0}, r"cache_ttl=0.*> 0"),
    ({"cache": True, "cache_ttl": -3}, r"cache_ttl=-3"),
    ({"cache": True, "cache_max_size": 0}, r"cache_max_size=0.*>= 1"),
    ({"cache": True, "cache_namespace": ""}, r"cache_namespace=''"),
    ({"cache": True, "cache_key": "id"}, r"cache_key='id'.*callable"),
    ({"cache": True, "cache_backend": "memcached"}, r"cache_backend='memcached'"),
    ({"cache": True, "cache_backend": object()}, r"cache_backend=.*open\(\)"),
    ({"cache": True, "cache_dir": "/tmp/x"}, r"cache_dir=.*only used with cache_backend='disk'"),
    ({"cache": True, "cache_redis_url": "redis://x"}, r"only used with cache_backend='redis'"),
    ({"cache": True, "cache_strict": 1, "cache_backend": "redis"}, r"cache_strict=1"),
    (
        {"cache": True, "cache_backend": "redis", "cache_max_size": 10},
        r"cache_max_size=10.*only used with cache_backend='memory'",
    ),
    (
        {"cache": True, "cache_backend": "disk", "cache_max_size": 10},
        r"cache_max_size=10.*only used with cache_backend='memory'",
    ),
    ({"cache_ttl": 60}, r"cache_ttl=60.*without cache=True"),
    ({"cache_backend": "redis"}, r"cache_backend='redis'.*cache=True"),
]


@pytest.mark.parametrize(("options", "pattern"), BAD_VALUES)
def test_bad_value_is_a_configuration_error_at_decoration(
    options: dict[str, Any], pattern: str
) -> None:
    """A bad option value raises ConfigurationError before any call, naming option and fix."""
    with pytest.raises(ConfigurationError, match=pattern) as info:
        opero(**options)
    message = str(info.value)
    assert re.search(r"for example|add |set |define |drop |use |Use ", message), message


#: Every numeric option with the options it needs to be used, and a good value.
NUMERIC_OPTIONS: dict[str, tuple[dict[str, Any], Any]] = {
    "retries": ({}, 3),
    "backoff_factor": ({}, 2.0),
    "min_delay": ({"max_delay": 1e9}, 0.1),
    "max_delay": ({}, 30.0),
    "rate_limit": ({}, 10.0),
    "rate_burst": ({"rate_limit": 1}, 5),
    "rate_max_wait": ({"rate_limit": 1}, 5.0),
    "cache_ttl": ({"cache": True}, 60),
    "cache_max_size": ({"cache": True}, 1024),
}

OUT_OF_RANGE = [
    ("nan", float("nan")),
    ("inf", float("inf")),
    ("-inf", float("-inf")),
    ("huge int", 10**400),
    ("huge float", 1e300),
    ("negative", -1),
    ("bool", True),
    ("str", "5"),
]


#: Options for which a huge finite float is valid: a factor capped by max_delay, and a
#: rate so high it never waits.
HUGE_IS_VALID = {"backoff_factor", "rate_limit"}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        pytest.param(option, value, id=f"{option}-{label}")
        for option in sorted(NUMERIC_OPTIONS)
        for label, value in OUT_OF_RANGE
        if not (label == "huge float" and option in HUGE_IS_VALID)
    ],
)
def test_out_of_range_numbers_are_configuration_errors(option: str, value: Any) -> None:
    """NaN, inf, huge, negative, bool or str numbers are ConfigurationErrors naming the option."""
    extra, _good = NUMERIC_OPTIONS[option]
    with pytest.raises(ConfigurationError, match=rf"@opero\({option}=") as info:
        opero(**extra, **{option: value})
    assert "for example" in str(info.value)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("option", sorted(NUMERIC_OPTIONS))
def test_good_numbers_are_accepted(option: str) -> None:
    """The documented example value of every numeric option is accepted."""
    extra, good = NUMERIC_OPTIONS[option]
    assert opero(**extra, **{option: good})(f)(1) == 1


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"rate_limit": 1e-300}, r"rate_limit=1e-300.*longer wait cannot be slept"),
        ({"rate_limit": 5, "rate_burst": 2**40}, r"rate_burst=1099511627776.*<= 4294967295"),
        ({"max_delay": 1e10}, r"max_delay=10000000000.0.*<= 1e\+09"),
        ({"cache": True, "cache_ttl": 2e9}, r"cache_ttl=2000000000.0"),
        ({"cache": True, "cache_max_size": 2**64}, r"cache_max_size=18446744073709551616"),
        ({"retries": 2**64}, r"retries=18446744073709551616"),
    ],
)
def test_values_that_cannot_be_honoured_are_refused(options: dict[str, Any], pattern: str) -> None:
    """Rates whose wait cannot be slept and bursts or sizes past the native range are refused."""
    with pytest.raises(ConfigurationError, match=pattern):
        opero(**options)


def test_integral_and_real_number_types_are_accepted() -> None:
    """Integral types (numpy-like, via __index__) and Fractions are accepted like int/float."""
    from fractions import Fraction

    class Count:
        def __index__(self) -> int:
            return 2

    policy = opero(retries=Count(), min_delay=Fraction(1, 4))(f).__opero__.policy
    assert policy.retries == 2
    assert type(policy.retries) is int
    assert policy.min_delay == 0.25


def test_configuration_error_is_value_and_type_error() -> None:
    """ConfigurationError can be caught as ValueError or TypeError."""
    with pytest.raises(ValueError, match="retries"):
        opero(retries=-1)
    with pytest.raises(TypeError, match="retries"):
        opero(retries=-1)


def test_arg_fallback_not_a_parameter() -> None:
    """An arg_fallback that is not a parameter of the function fails at decoration time."""
    with pytest.raises(ConfigurationError, match=r"arg_fallback='nope'.*no parameter.*'x'"):
        opero(arg_fallback="nope")(f)


def test_arg_fallback_on_var_args_is_rejected() -> None:
    """arg_fallback cannot name *args or **kwargs."""

    def g(*urls: str, **opts: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="arg_fallback='urls'"):
        opero(arg_fallback="urls")(g)


def test_bare_decorator_equals_empty_call() -> None:
    """@opero without parentheses decorates like @opero()."""

    @opero
    def a(x: int) -> int:
        return x + 1

    @opero()
    def b(x: int) -> int:
        return x + 1

    assert a(1) == b(1) == 2
    assert a.__opero__.policy.retries == b.__opero__.policy.retries == 3
    assert a.__name__ == "a"


def test_decorating_a_non_callable_is_a_type_error() -> None:
    """opero()(5) and opero(5) raise TypeError."""
    with pytest.raises(TypeError, match="decorates a function"):
        opero()(5)
    with pytest.raises(TypeError, match="got 5"):
        opero(5)  # type: ignore[call-overload]


def test_policy_is_frozen_and_options_normalized() -> None:
    """The policy is immutable and its options mapping holds the normalized values."""
    decorated = opero(retries=2, retry_on=[ValueError, KeyError])(f)
    policy = decorated.__opero__.policy
    assert policy.options["retry_on"] == (ValueError, KeyError)
    assert policy.retry_on == (ValueError, KeyError)
    with pytest.raises(AttributeError):
        policy.retries = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.options["retries"] = 5  # type: ignore[index]
    rebuilt = opero(**policy.options)(f)
    assert rebuilt.__opero__.policy.retries == 2


@pytest.mark.parametrize("bad", [1e300, 10**400, float("nan"), -1, True])
def test_backoff_function_result_out_of_range_is_a_configuration_error(bad: object) -> None:
    """A backoff_function wait that cannot be slept is a ConfigurationError naming it."""
    slept: list[float] = []
    calls = []

    def flaky() -> int:
        calls.append(1)
        raise ValueError("boom")

    func = opero(retries=1, backoff_function=lambda attempt: bad, _sleep=slept.append)(flaky)
    with pytest.raises(ConfigurationError, match=r"backoff_function of .*returned") as info:
        func()
    assert "at most 1e+09" in str(info.value)
    assert slept == []
    assert len(calls) == 1


def test_values_whose_repr_fails_still_give_configuration_errors() -> None:
    """An int past Python's repr digit limit, or a raising __repr__, still names the option."""

    class NoRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    with pytest.raises(ConfigurationError, match=r"retries=<int object>"):
        opero(retries=10**5000)
    with pytest.raises(ConfigurationError, match=r"min_delay=<NoRepr object>"):
        opero(min_delay=NoRepr())
    f = opero(rate_limit=lambda: 10**5000, retries=0)(lambda: 1)
    with pytest.raises(ConfigurationError, match=r"rate_limit callable returned <int object>"):
        f()
