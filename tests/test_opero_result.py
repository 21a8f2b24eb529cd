"""retry_on_result: a rejected result is a failed call; RetryResultError when retries run out."""

from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any

import pytest

import opero
from opero import AllFailedError, ConfigurationError, RetryResultError
from opero import opero as op
from opero.errors import attempt_errors


def test_rejected_results_are_retried_until_accepted() -> None:
    """A rejected result is retried with the backoff wait, and on_retry fires with the error."""
    answers = [None, None, "ready"]
    waits: list[float] = []
    retried: list[tuple[BaseException, int]] = []

    @op(
        retries=3,
        retry_on_result=lambda r: r is None,
        min_delay=0.5,
        jitter=False,
        backoff_factor=2.0,
        on_retry=lambda exc, attempt: retried.append((exc, attempt)),
        _sleep=waits.append,
    )
    def poll() -> str | None:
        return answers.pop(0)

    assert poll() == "ready"
    assert waits == [0.5, 1.0]
    assert [a for _, a in retried] == [0, 1]
    assert all(isinstance(e, RetryResultError) for e, _ in retried)


def test_exhaustion_raises_retry_result_error_with_the_last_result() -> None:
    """When every result is rejected, RetryResultError has .result, .attempts and the name."""
    results = iter(range(10))

    @op(retries=2, retry_on_result=lambda r: r < 100, _sleep=lambda s: None)
    def count() -> int:
        return next(results)

    with pytest.raises(RetryResultError) as info:
        count()
    error = info.value
    assert error.result == 2
    assert error.attempts == 3
    assert "count" in str(error)
    assert ": 2" in str(error)
    assert [e.result for e in attempt_errors(error)] == [0, 1, 2]  # type: ignore[attr-defined]
    assert isinstance(error, opero.OperoError)


def test_error_pickles_with_its_fields() -> None:
    """A raised RetryResultError pickles with its result and attempts (not the engine)."""

    @op(retries=1, retry_on_result=bool, _sleep=lambda s: None)
    def truthy() -> list[int]:
        return [1, 2]

    with pytest.raises(RetryResultError) as info:
        truthy()
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.result == [1, 2]
    assert copy.attempts == 2
    assert str(copy) == str(info.value)


def test_long_result_repr_is_shortened_and_hostile_repr_survives() -> None:
    """The message shows a short repr; a raising __repr__ shows the type instead."""

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    @op(retries=0, retry_on_result=lambda r: True)
    def huge() -> str:
        return "x" * 10_000

    @op(retries=0, retry_on_result=lambda r: True)
    def hostile() -> Hostile:
        return Hostile()

    with pytest.raises(RetryResultError) as info:
        huge()
    assert len(str(info.value)) < 300
    with pytest.raises(RetryResultError, match="Hostile"):
        hostile()


def test_raising_predicate_is_logged_and_the_result_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A predicate that raises is logged and the result accepted (no retry)."""
    calls: list[int] = []

    def predicate(result: Any) -> bool:
        raise ValueError("bad predicate")

    @op(retries=3, retry_on_result=predicate)
    def value() -> int:
        calls.append(1)
        return 5

    with caplog.at_level(logging.ERROR, logger="opero"):
        assert value() == 5
    assert calls == [1]
    assert "retry_on_result" in caplog.text


def test_rejected_result_is_never_cached() -> None:
    """With cache=True a rejected result is not stored: the next call runs again."""
    calls: list[int] = []

    @op(cache=True, retries=1, retry_on_result=lambda r: r < 0, _sleep=lambda s: None)
    def sign(x: int) -> int:
        calls.append(x)
        return -1 if len(calls) <= 2 else 1

    with pytest.raises(RetryResultError):
        sign(1)
    assert sign(1) == 1
    assert sign(1) == 1  # now cached
    assert len(calls) == 3


def test_in_a_fallback_chain_all_failed_holds_the_result_errors() -> None:
    """Inside arg_fallback, rejected results are errors of the AllFailedError, in call order."""

    @op(
        retries=1,
        arg_fallback="hosts",
        retry_on_result=lambda r: r == "busy",
        _sleep=lambda s: None,
    )
    def fetch(hosts: tuple[str, ...] = ("a", "b")) -> str:
        return "busy"

    with pytest.raises(AllFailedError) as info:
        fetch()
    assert len(info.value.errors) == 4
    assert all(isinstance(e, RetryResultError) for e in info.value.errors)


def test_fallback_candidate_with_an_accepted_result_wins() -> None:
    """A candidate whose result is rejected moves on to the next candidate without waiting."""
    waits: list[float] = []

    @op(arg_fallback="hosts", retry_on_result=lambda r: r == "busy", _sleep=waits.append)
    def fetch(hosts: tuple[str, ...] = ("a", "b")) -> str:
        return "busy" if hosts[0] == "a" else f"ok from {hosts[0]}"

    assert fetch() == "ok from b"
    assert waits == []


def test_async_and_rate_limit() -> None:
    """An async function with a rate limit retries rejected results, one token per call."""
    answers = [0, 0, 7]
    tokens: list[int] = []

    class Limiter:
        def reserve(self, rate: float | None = None) -> float:
            tokens.append(1)
            return 0.0

    async def asleep(seconds: float) -> None: ...

    @op(retries=3, retry_on_result=lambda r: r == 0, _limiter=Limiter(), _asleep=asleep)
    async def value() -> int:
        return answers.pop(0)

    assert asyncio.run(value()) == 7
    assert len(tokens) == 3


def test_timeout_stops_result_retries() -> None:
    """Rejected results count against timeout: the retry that would end past it is not made."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    @op(
        retries=10,
        timeout=2.5,
        retry_on_result=lambda r: r is None,
        min_delay=1.0,
        backoff_factor=1.0,
        jitter=False,
        _sleep=sleep,
        _clock=lambda: now[0],
    )
    def never() -> None:
        return None

    with pytest.raises(RetryResultError) as info:
        never()
    assert info.value.attempts == 3  # at 0, 1, 2; a wait from 2 would end at 3 > 2.5
    assert "past timeout=2.5 s" in info.value.__notes__[-1]


def test_testing_attempts_cap_result_retries() -> None:
    """set_testing(attempts=2) caps result retries at two calls."""
    calls: list[int] = []

    @op(retries=5, retry_on_result=lambda r: True)
    def always() -> int:
        calls.append(1)
        return 1

    with opero.set_testing(attempts=2), pytest.raises(RetryResultError):
        always()
    assert len(calls) == 2


def test_stacked_layers_do_not_multiply() -> None:
    """An outer default layer over an inner one with retry_on_result makes no extra rounds."""
    calls: list[int] = []

    @op
    @op(retries=2, retry_on_result=lambda r: True, _sleep=lambda s: None)
    def inner() -> int:
        calls.append(1)
        return 1

    with pytest.raises(RetryResultError):
        inner()
    assert len(calls) == 3


@pytest.mark.parametrize("bad", [True, "x", lambda: True])
def test_bad_predicates_are_refused_at_decoration(bad: Any) -> None:
    """retry_on_result must be a one-argument callable, refused at decoration."""
    with pytest.raises(ConfigurationError, match="retry_on_result"):
        op(retry_on_result=bad)


def test_async_fallback_with_result_check_and_deadline() -> None:
    """Async: candidates with rejected results move on; the deadline ends the rounds."""
    now = [0.0]
    tried: list[str] = []

    async def asleep(seconds: float) -> None:
        now[0] += seconds

    @op(
        retries=10,
        timeout=2.5,
        arg_fallback="hosts",
        retry_on_result=lambda r: r == "busy",
        min_delay=1.0,
        backoff_factor=1.0,
        jitter=False,
        _asleep=asleep,
        _clock=lambda: now[0],
    )
    async def fetch(hosts: tuple[str, ...] = ("a", "b")) -> str:
        tried.append(hosts[0])
        return "busy"

    with pytest.raises(AllFailedError, match=r"past timeout=2\.5 s") as info:
        asyncio.run(fetch())
    assert tried == ["a", "b", "a", "b", "a", "b"]  # rounds at 0, 1, 2
    assert all(isinstance(e, RetryResultError) for e in info.value.errors)


def test_dropped_retry_result_error_is_freed_without_the_collector() -> None:
    """A caught and dropped RetryResultError is freed by reference counting (no cycle)."""
    import gc
    import weakref

    @op(retries=2, retry_on_result=lambda r: True, _sleep=lambda s: None)
    def always() -> object:
        return object()

    enabled = gc.isenabled()
    gc.disable()
    try:
        ref: Any = None
        try:
            always()
        except RetryResultError as error:
            ref = weakref.ref(error)
        assert ref is not None
        assert ref() is None
    finally:
        if enabled:
            gc.enable()
