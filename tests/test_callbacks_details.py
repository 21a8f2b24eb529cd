"""Callbacks that take one CallDetails, and the on_fallback / on_rate_limit_wait hooks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from opero import CallDetails, opero
from opero._pipeline.callbacks import adapt_callback
from opero._pipeline.details import wants_details
from opero.errors import AllFailedError, ConfigurationError


class Clock:
    """A manual clock: sleeps advance it instead of waiting."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        """Record a sync wait."""
        self.slept.append(seconds)

    async def asleep(self, seconds: float) -> None:
        """Record an async wait."""
        self.slept.append(seconds)


def flaky(failures: int) -> Any:
    """Return a function failing ``failures`` times with ConnectionError, then returning x*2."""
    state = {"n": 0}

    def fetch(x: int, *, scale: int = 2) -> int:
        state["n"] += 1
        if state["n"] <= failures:
            raise ConnectionError(f"down {state['n']}")
        return x * scale

    return fetch


def test_details_rule_annotation_name_and_string() -> None:
    """Details go to a lone parameter annotated CallDetails (even as a string) or named details."""

    def by_annotation(d: CallDetails) -> None: ...

    def by_string(d: "CallDetails") -> None: ...  # noqa: UP037

    def by_dotted(d: "opero.CallDetails") -> None: ...  # type: ignore[name-defined]  # noqa: UP037

    def by_name(details):  # type: ignore[no-untyped-def]
        ...

    def classic(exc: Exception) -> None: ...

    def two(details: Any, attempt: int) -> None: ...

    assert wants_details(by_annotation)
    assert wants_details(by_string)
    assert wants_details(by_dotted)
    assert wants_details(by_name)
    assert wants_details(lambda details: None)
    assert not wants_details(classic)
    assert not wants_details(two)
    assert not wants_details(lambda exc: None)
    assert not wants_details(print)  # a builtin without a readable signature


def test_retry_success_details_fields() -> None:
    """on_retry and on_success details carry args, kwargs, 1-based attempt, wait and waited."""
    seen: list[CallDetails] = []
    clock = Clock()
    f = opero(
        retries=3,
        _sleep=clock.sleep,
        _backoff_seed=1,
        on_retry=lambda details: seen.append(details),
        on_success=lambda details: seen.append(details),
    )(flaky(2))
    assert f(5, scale=3) == 15
    assert [d.event for d in seen] == ["retry", "retry", "success"]
    first, second, success = seen
    assert first.function.endswith("flaky.<locals>.fetch")
    assert first.args == (5,)
    assert first.kwargs == {"scale": 3}
    assert (first.attempt, second.attempt, success.attempt) == (1, 2, 3)
    assert isinstance(first.exception, ConnectionError)
    assert str(first.exception) == "down 1"
    assert clock.slept == [first.wait, second.wait]
    assert first.waited == 0.0
    assert second.waited == pytest.approx(first.wait)
    assert success.waited == pytest.approx(first.wait + second.wait)
    assert success.result == 15
    assert success.exception is None
    assert success.wait == 0.0


def test_classic_arities_unchanged() -> None:
    """Classic callbacks still receive (exc, attempt), (result) and (exc) exactly as before."""
    events: list[Any] = []
    f = opero(
        retries=1,
        min_delay=0,
        on_retry=lambda exc, attempt: events.append(("retry", str(exc), attempt)),
        on_success=lambda result: events.append(("success", result)),
        on_failure=lambda exc: events.append(("failure", type(exc).__name__)),
    )(flaky(1))
    assert f(2) == 4
    g = opero(retries=0, on_failure=lambda exc: events.append(("failure", str(exc))))(flaky(5))
    with pytest.raises(ConnectionError):
        g(1)
    assert events == [("retry", "down 1", 0), ("success", 4), ("failure", "down 1")]


def test_failure_details_after_exhaustion() -> None:
    """on_failure details name the last error and the number of calls made."""
    seen: list[CallDetails] = []

    def on_failure(d: CallDetails) -> None:
        seen.append(d)

    f = opero(retries=2, min_delay=0, on_failure=on_failure)(flaky(10))
    with pytest.raises(ConnectionError, match="down 3"):
        f(1)
    (details,) = seen
    assert details.event == "failure"
    assert details.attempt == 3
    assert str(details.exception) == "down 3"
    assert details.args == (1,)


def test_on_fallback_classic_and_details() -> None:
    """on_fallback fires for each failed candidate followed by another, not for the last."""
    classic: list[tuple[str, int]] = []
    detailed: list[CallDetails] = []

    def call(model: list[str]) -> str:
        if model[0] != "c":
            raise ValueError(f"{model[0]} failed")
        return "ok"

    f = opero(
        retries=0, arg_fallback="model", on_fallback=lambda exc, i: classic.append((str(exc), i))
    )(call)
    assert f(["a", "b", "c"]) == "ok"
    assert classic == [("a failed", 0), ("b failed", 1)]

    g = opero(
        retries=0, arg_fallback="model", on_fallback=lambda details: detailed.append(details)
    )(call)
    with pytest.raises(AllFailedError):
        g(["a", "b"])
    assert [(d.event, d.attempt, str(d.exception)) for d in detailed] == [
        ("fallback", 1, "a failed")
    ]
    assert detailed[0].args == (["a", "b"],)


@pytest.mark.parametrize("is_async", [False, True])
def test_on_rate_limit_wait_fires_before_sleeping(is_async: bool) -> None:
    """on_rate_limit_wait gets the wait about to be slept (classic and details), sync and async."""
    clock = Clock()
    waits: list[float] = []
    detailed: list[CallDetails] = []

    async def aone(x: int) -> int:
        return x

    def one(x: int) -> int:
        return x

    for callback in (lambda wait: waits.append(wait), lambda details: detailed.append(details)):
        f = opero(
            retries=0,
            rate_limit=10.0,
            _sleep=clock.sleep,
            _asleep=clock.asleep,
            on_rate_limit_wait=callback,
        )(aone if is_async else one)
        for i in range(3):
            result = asyncio.run(f(i)) if is_async else f(i)
            assert result == i
    # The bucket books ahead: the 2nd and 3rd calls of each function wait.
    assert len(waits) == 2
    assert all(w > 0 for w in waits)
    assert [d.event for d in detailed] == ["rate_limit_wait", "rate_limit_wait"]
    assert [d.args for d in detailed] == [(1,), (2,)]
    assert all(d.wait > 0 for d in detailed)
    assert len(clock.slept) == 4
    assert clock.slept[2:] == [d.wait for d in detailed]


def test_async_details_callbacks() -> None:
    """An async def function gives the same details (retry then success) as a sync one."""
    seen: list[CallDetails] = []
    clock = Clock()
    state = {"n": 0}

    async def fetch(x: int) -> int:
        state["n"] += 1
        if state["n"] == 1:
            raise TimeoutError("slow")
        return x + 1

    f = opero(
        retries=2,
        _asleep=clock.asleep,
        on_retry=lambda details: seen.append(details),
        on_success=lambda details: seen.append(details),
    )(fetch)
    assert asyncio.run(f(1)) == 2
    assert [(d.event, d.attempt, d.args) for d in seen] == [
        ("retry", 1, (1,)),
        ("success", 2, (1,)),
    ]
    assert seen[1].waited == pytest.approx(clock.slept[0])


def test_cache_hit_details() -> None:
    """on_cache_hit may take details: event cache_hit and the function name."""
    seen: list[CallDetails] = []
    f = opero(cache=True, on_cache_hit=lambda details: seen.append(details))(lambda x: x)
    f(1)
    f(1)
    assert [(d.event, d.function.endswith("<lambda>")) for d in seen] == [("cache_hit", True)]


def test_raising_details_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A raising details callback is logged with opero_callback and never changes the outcome."""

    def bad(details: CallDetails) -> None:
        raise RuntimeError("callback bug")

    f = opero(retries=2, min_delay=0, on_retry=bad, on_success=bad, on_failure=bad)(flaky(1))
    with caplog.at_level(logging.ERROR, logger="opero"):
        assert f(3) == 6
    callbacks = sorted(getattr(r, "opero_callback", "") for r in caplog.records)
    assert callbacks == ["on_retry", "on_success"]


def test_adapt_callback_passes_details_through() -> None:
    """adapt_callback (used by on_circuit_open) hands a CallDetails to a details callback."""
    seen: list[Any] = []
    adapted = adapt_callback("on_circuit_open", lambda details: seen.append(details), (1, 0))
    assert adapted is not None
    details = CallDetails("svc", event="circuit_open")
    adapted(details)
    assert seen == [details]
    zero = adapt_callback("on_circuit_open", lambda: seen.append("zero"), (1, 0))
    assert zero is not None
    zero(details)
    assert seen[-1] == "zero"


def test_bad_new_callbacks_are_configuration_errors() -> None:
    """A non-callable on_fallback / on_rate_limit_wait, or a no-argument on_fallback, is refused."""
    with pytest.raises(ConfigurationError, match="on_fallback"):
        opero(on_fallback=3)
    with pytest.raises(ConfigurationError, match="on_rate_limit_wait"):
        opero(on_rate_limit_wait="no")
    with pytest.raises(ConfigurationError, match="on_fallback"):
        opero(on_fallback=lambda: None)


def test_details_are_frozen() -> None:
    """CallDetails is immutable: a callback cannot change what another one sees."""
    details = CallDetails("f")
    with pytest.raises(AttributeError):
        details.attempt = 2  # type: ignore[misc]


def test_callback_changing_details_kwargs_does_not_change_the_retry() -> None:
    """details.kwargs is a copy: a callback that empties it leaves the next attempt's arguments."""
    seen: list[dict[str, Any]] = []

    def meddle(details: CallDetails) -> None:
        details.kwargs.clear()

    def record(details: CallDetails) -> None:
        seen.append(details.kwargs)

    f = opero(retries=1, min_delay=0, on_retry=meddle, on_success=record)(flaky(1))
    assert f(2, scale=5) == 10
    assert seen == [{"scale": 5}]
