"""Callbacks of @opero: both arities, firing points, and raising callbacks that change nothing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from opero import opero as op


def failing_then(value: Any, failures: int) -> Any:
    """Return a function failing ``failures`` times with ValueError(i), then returning value."""
    state = {"n": 0}

    def f() -> Any:
        state["n"] += 1
        if state["n"] <= failures:
            raise ValueError(state["n"])
        return value

    return f


def test_on_retry_one_and_two_arguments() -> None:
    """on_retry(exc) and on_retry(exc, attempt) both work; attempt is the 0-based retry."""
    one: list[str] = []
    two: list[tuple[str, int]] = []
    f1 = op(retries=3, min_delay=0, on_retry=lambda e: one.append(str(e)))(failing_then(1, 2))
    f2 = op(retries=3, min_delay=0, on_retry=lambda e, a: two.append((str(e), a)))(
        failing_then(1, 2)
    )
    assert f1() == 1
    assert f2() == 1
    assert one == ["1", "2"]
    assert two == [("1", 0), ("2", 1)]


def test_on_success_with_and_without_result() -> None:
    """on_success(result) gets the result; on_success() is called with nothing."""
    results: list[Any] = []
    count: list[int] = []
    f1 = op(on_success=results.append)(lambda: 5)
    f2 = op(on_success=lambda: count.append(1))(lambda: 6)
    assert f1() == 5
    assert f2() == 6
    assert results == [5]
    assert count == [1]


def test_on_failure_gets_the_raised_error() -> None:
    """on_failure gets the raised error: the last one after retries, the only one with retries=0."""
    got: list[BaseException] = []
    f1 = op(retries=1, min_delay=0, on_failure=got.append)(failing_then(1, 5))
    with pytest.raises(ValueError) as info:
        f1()
    assert len(got) == 1
    assert got[0] is info.value
    got.clear()
    f2 = op(retries=0, on_failure=got.append)(failing_then(1, 5))
    with pytest.raises(ValueError, match="1") as info2:
        f2()
    assert got == [info2.value]


def test_on_cache_hit_fires_only_on_hits() -> None:
    """on_cache_hit() fires once per hit and never on a miss."""
    hits: list[int] = []

    @op(cache=True, on_cache_hit=lambda: hits.append(1))
    def f(x: int) -> int:
        return x

    f(1)
    assert hits == []
    f(1)
    f(1)
    assert hits == [1, 1]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_raising_callbacks_are_logged_and_change_nothing(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Callbacks that raise are logged on 'opero'; result and attempts are unchanged."""

    def boom(*args: Any) -> None:
        raise RuntimeError("callback broke")

    calls = {"n": 0}
    options: dict[str, Any] = dict(
        retries=2,
        min_delay=0,
        cache=True,
        on_retry=boom,
        on_success=boom,
        on_failure=boom,
        on_cache_hit=boom,
    )
    if is_async:

        @op(**options)
        async def af(x: int) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError
            return x * 2

        def call(x: int) -> int:
            return asyncio.run(af(x))  # type: ignore[no-any-return]

    else:

        @op(**options)
        def sf(x: int) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError
            return x * 2

        call = sf

    with caplog.at_level(logging.ERROR, logger="opero"):
        assert call(2) == 4
        assert call(2) == 4
    assert calls["n"] == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "opero"]
    assert any("on_retry" in m for m in messages)
    assert any("on_success" in m for m in messages)
    assert any("on_cache_hit" in m for m in messages)
    assert all(r.exc_info is not None for r in caplog.records if "callback" in r.getMessage())


def test_raising_on_failure_keeps_the_error(caplog: pytest.LogCaptureFixture) -> None:
    """A raising on_failure is logged and the original failure still propagates."""

    def boom(exc: BaseException) -> None:
        raise RuntimeError("nope")

    f = op(retries=0, on_failure=boom)(failing_then(1, 1))
    with caplog.at_level(logging.ERROR, logger="opero"), pytest.raises(ValueError):
        f()
    assert "on_failure" in caplog.text


def test_async_callbacks_fire() -> None:
    """Async functions fire on_retry, on_success and on_failure like sync ones."""
    events: list[str] = []

    @op(
        retries=1,
        min_delay=0,
        on_retry=lambda e: events.append("retry"),
        on_success=lambda r: events.append(f"success:{r}"),
        on_failure=lambda e: events.append("failure"),
    )
    async def f(fail_times: list[int]) -> int:
        if fail_times:
            fail_times.pop()
            raise ValueError
        return 7

    assert asyncio.run(f([1])) == 7
    with pytest.raises(ValueError):
        asyncio.run(f([1, 1, 1]))
    assert events == ["retry", "success:7", "retry", "failure"]
