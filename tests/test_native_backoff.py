"""Backoff: the exponential schedule, the jitter band, seeding, overflow, bad input."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opero._opero_core import Backoff


def test_base_schedule_grows_then_caps() -> None:
    """base_delay(k) = min(max_delay, min_delay * factor**k)."""
    b = Backoff(0.1, 1.0, 2.0, jitter=False)
    assert [b.base_delay(k) for k in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert [b.delay(k) for k in range(6)] == [b.base_delay(k) for k in range(6)]


def test_defaults_match_the_guide() -> None:
    """Defaults: min 0.1 s, max 30 s, factor 1.5, jitter on."""
    b = Backoff(jitter=False)
    assert b.base_delay(0) == pytest.approx(0.1)
    assert b.base_delay(1) == pytest.approx(0.15)
    assert b.base_delay(100) == 30.0


def test_huge_attempts_never_overflow() -> None:
    """Attempt numbers beyond any float range give max_delay, never inf or NaN."""
    b = Backoff(0.1, 30.0, 1.5, seed=1)
    for k in (1000, 2**31, 2**64, 10**30):
        assert b.base_delay(k) == 30.0
        assert 15.0 <= b.delay(k) <= 30.0


def test_zero_min_delay_is_always_zero() -> None:
    """min_delay=0 gives 0 for every attempt (no NaN from 0 * inf)."""
    b = Backoff(0.0, 5.0, 10.0)
    assert b.delay(10**6) == 0.0
    assert b.base_delay(0) == 0.0


def test_seed_makes_schedules_reproducible() -> None:
    """The same seed gives the same jittered schedule; another seed another one."""
    a = [Backoff(seed=7).delay(k) for k in range(10)]
    b = [Backoff(seed=7).delay(k) for k in range(10)]
    c = [Backoff(seed=8).delay(k) for k in range(10)]
    assert a == b
    assert a != c
    big = Backoff(seed=2**70 + 7)
    assert big.delay(0) == Backoff(seed=7).delay(0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"min_delay": -0.1}, ValueError, "min_delay must be a finite number of seconds >= 0"),
        ({"min_delay": math.nan}, ValueError, "min_delay"),
        ({"max_delay": math.inf}, ValueError, "max_delay"),
        ({"min_delay": 2.0, "max_delay": 1.0}, ValueError, "max_delay must be .* >= min_delay"),
        ({"factor": 0.5}, ValueError, "factor must be a finite number >= 1"),
        ({"factor": math.nan}, ValueError, "factor"),
        ({"seed": "x"}, TypeError, "seed must be an int or None"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"min_delay": "1"}, TypeError, "min_delay"),
    ],
)
def test_bad_constructor_arguments(
    kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    """Each bad argument raises ValueError/TypeError naming it and the accepted range."""
    with pytest.raises(exc, match=match):
        Backoff(**kwargs)


def test_bad_attempts() -> None:
    """A negative attempt is a ValueError, a non-int a TypeError, both naming attempt."""
    b = Backoff()
    with pytest.raises(ValueError, match="attempt must be an int >= 0"):
        b.delay(-1)
    with pytest.raises(ValueError, match="attempt"):
        b.base_delay(-(2**80))
    with pytest.raises(TypeError, match="attempt must be an int"):
        b.delay(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="attempt"):
        b.delay("1")  # type: ignore[arg-type]


def test_repr() -> None:
    """The repr shows the schedule."""
    assert repr(Backoff(0.5, 2.0, 3.0, False)) == (
        "Backoff(min_delay=0.5, max_delay=2.0, factor=3.0, jitter=False)"
    )


@settings(max_examples=200, deadline=None)
@given(
    min_delay=st.floats(0.0, 10.0),
    extra=st.floats(0.0, 100.0),
    factor=st.floats(1.0, 10.0),
    seed=st.integers(0, 2**64 - 1),
    attempts=st.lists(st.integers(0, 2000), min_size=1, max_size=20),
)
def test_jittered_delays_stay_in_their_band(
    min_delay: float, extra: float, factor: float, seed: int, attempts: list[int]
) -> None:
    """Every delay is in [d/2, d] for d = base_delay(k), and never above max_delay."""
    max_delay = min_delay + extra
    b = Backoff(min_delay, max_delay, factor, True, seed)
    for k in attempts:
        d = b.base_delay(k)
        try:
            expected = min(max_delay, min_delay * math.pow(factor, k))
        except OverflowError:
            expected = max_delay if min_delay > 0 else 0.0
        assert d == pytest.approx(expected, rel=1e-9)
        x = b.delay(k)
        assert d / 2 <= x <= d <= max_delay
        assert not math.isnan(x)
