"""Retries of @opero, sync and async: schedules, retry_on, predicates, exhaustion, fatal errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import opero
from opero import ConfigurationError
from opero import opero as op
from opero.errors import attempt_errors


class Flaky:
    """A callable failing with the given errors in order, then returning ``value``."""

    def __init__(self, errors: list[BaseException], value: Any = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Fail with the next queued error, or return the value."""
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def make(
    behaviour: Flaky, is_async: bool, **options: Any
) -> tuple[Callable[..., Any], list[float]]:
    """Decorate ``behaviour`` as a sync or async function with recorded waits."""
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    if is_async:

        async def fa(x: int = 0) -> Any:
            return behaviour(x)

        return op(_asleep=asleep, **options)(fa), waits

    def fs(x: int = 0) -> Any:
        return behaviour(x)

    return op(_sleep=waits.append, **options)(fs), waits


def run(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``func``, running it to completion if it is async."""
    result = func(*args, **kwargs)
    if isinstance(result, Awaitable):
        return asyncio.run(_await(result))
    return result


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


modes = pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])


@modes
def test_success_on_first_call_makes_one_call(is_async: bool) -> None:
    """A function that succeeds is called once and never waits."""
    flaky = Flaky([])
    func, waits = make(flaky, is_async, retries=3)
    assert run(func) == "ok"
    assert flaky.calls == 1
    assert waits == []


@modes
def test_exact_wait_sequence_without_jitter(is_async: bool) -> None:
    """Waits follow min(max_delay, min_delay * factor**k) exactly when jitter is off."""
    flaky = Flaky([ValueError(i) for i in range(4)])
    func, waits = make(
        flaky, is_async, retries=4, min_delay=0.5, backoff_factor=2.0, max_delay=3.0, jitter=False
    )
    assert run(func) == "ok"
    assert flaky.calls == 5
    assert waits == [0.5, 1.0, 2.0, 3.0]


@modes
def test_default_schedule(is_async: bool) -> None:
    """The defaults give waits 0.1, 0.15, 0.225 (without jitter) for retries=3."""
    flaky = Flaky([ValueError(), ValueError(), ValueError()])
    func, waits = make(flaky, is_async, jitter=False)
    assert run(func) == "ok"
    assert waits == pytest.approx([0.1, 0.15, 0.225])


@modes
def test_jittered_waits_stay_in_band(is_async: bool) -> None:
    """With jitter each wait lies in [d/2, d] of its un-jittered delay d."""
    flaky = Flaky([ValueError()] * 6)
    func, waits = make(flaky, is_async, retries=6, min_delay=1.0, backoff_factor=2.0, max_delay=20)
    run(func)
    for k, wait in enumerate(waits):
        d = min(20.0, 2.0**k)
        assert d / 2 <= wait <= d


@modes
def test_seeded_jitter_is_reproducible(is_async: bool) -> None:
    """The same _backoff_seed gives the same jittered schedule."""
    schedules = []
    for _ in range(2):
        flaky = Flaky([ValueError()] * 3)
        func, waits = make(flaky, is_async, _backoff_seed=7)
        run(func)
        schedules.append(waits)
    assert schedules[0] == schedules[1]


@modes
def test_zero_delay_never_sleeps(is_async: bool) -> None:
    """min_delay=0 retries without calling sleep at all."""
    flaky = Flaky([ValueError(), ValueError()])
    func, waits = make(flaky, is_async, min_delay=0, max_delay=0)
    assert run(func) == "ok"
    assert flaky.calls == 3
    assert waits == []


@modes
def test_backoff_function_replaces_schedule(is_async: bool) -> None:
    """backoff_function(attempt) gives the waits, with 0-based attempts."""
    seen: list[int] = []

    def backoff(attempt: int) -> float:
        seen.append(attempt)
        return 10.0 + attempt

    flaky = Flaky([ValueError()] * 3)
    func, waits = make(flaky, is_async, backoff_function=backoff)
    run(func)
    assert seen == [0, 1, 2]
    assert waits == [10.0, 11.0, 12.0]


@modes
def test_backoff_function_bad_result_is_reported(is_async: bool) -> None:
    """A backoff_function returning a negative number raises ConfigurationError naming it."""
    flaky = Flaky([ValueError()])
    func, _ = make(flaky, is_async, backoff_function=lambda attempt: -1)
    with pytest.raises(ConfigurationError, match=r"backoff_function.*returned -1"):
        run(func)


@modes
def test_exhausted_retries_raise_the_last_error_itself(is_async: bool) -> None:
    """After retries the function's own last exception propagates, noted, with every error kept."""
    errors = [ValueError("a"), KeyError("b"), OSError("c"), ValueError("d")]
    flaky = Flaky(list(errors))
    func, waits = make(flaky, is_async, retries=3)
    with pytest.raises(ValueError, match="d") as info:
        run(func)
    assert info.value is errors[-1]
    assert type(info.value) is ValueError
    assert attempt_errors(info.value) == errors
    assert any("failed on all 4 calls" in note for note in info.value.__notes__)
    assert len(waits) == 3
    assert not isinstance(info.value, opero.OperoError)


@modes
def test_exhaustion_keeps_the_callers_except_clause(is_async: bool) -> None:
    """A caller's except for the function's own error type still catches it with retries."""
    flaky = Flaky([ConnectionError("x")] * 3)
    func, _ = make(flaky, is_async, retries=2)
    try:
        run(func)
    except ConnectionError as exc:
        caught: BaseException = exc
    assert isinstance(caught, ConnectionError)
    assert flaky.calls == 3


@modes
def test_one_shared_instance_keeps_one_note_and_no_self_reference(is_async: bool) -> None:
    """One shared instance raised on every call keeps a single opero note and no self-reference."""
    shared = ValueError("shared")
    flaky = Flaky([shared] * 6)
    func, _ = make(flaky, is_async, retries=2)
    for _ in range(2):
        with pytest.raises(ValueError) as info:
            run(func)
        assert info.value is shared
    assert len([n for n in shared.__notes__ if n.startswith("opero: ")]) == 1
    assert attempt_errors(shared) == [shared]


@modes
def test_no_retries_propagates_the_original(is_async: bool) -> None:
    """With retries=0 and no fallback the function's own exception propagates unchanged."""
    error = ValueError("boom")
    flaky = Flaky([error])
    func, waits = make(flaky, is_async, retries=0)
    with pytest.raises(ValueError, match="boom") as info:
        run(func)
    assert info.value is error
    assert waits == []


@modes
def test_retry_on_filters_errors(is_async: bool) -> None:
    """An error outside retry_on propagates at once, unchanged, without retrying."""
    error = KeyError("no")
    flaky = Flaky([ConnectionError(), error])
    func, waits = make(flaky, is_async, retry_on=[ConnectionError, TimeoutError], retries=5)
    with pytest.raises(KeyError) as info:
        run(func)
    assert info.value is error
    assert flaky.calls == 2
    assert len(waits) == 1


@modes
def test_retry_on_single_type(is_async: bool) -> None:
    """retry_on accepts a single exception type."""
    flaky = Flaky([TimeoutError(), TimeoutError()])
    func, _ = make(flaky, is_async, retry_on=TimeoutError)
    assert run(func) == "ok"
    assert flaky.calls == 3


@modes
def test_retry_predicate_decides(is_async: bool) -> None:
    """retry_predicate(exc) returning False stops retrying and propagates the error."""
    seen: list[BaseException] = []

    def predicate(exc: BaseException) -> bool:
        seen.append(exc)
        return "again" in str(exc)

    last = ValueError("stop")
    flaky = Flaky([ValueError("again"), last])
    func, _ = make(flaky, is_async, retry_predicate=predicate)
    with pytest.raises(ValueError, match="stop") as info:
        run(func)
    assert info.value is last
    assert [str(e) for e in seen] == ["again", "stop"]


@modes
def test_retry_predicate_with_response_parameter(is_async: bool) -> None:
    """A predicate written as (exception, response=None) is called and respected."""
    calls: list[tuple[BaseException, Any]] = []

    def should_retry(exception: BaseException, response: Any = None) -> bool:
        calls.append((exception, response))
        return True

    flaky = Flaky([ValueError()])
    func, _ = make(flaky, is_async, retry_predicate=should_retry)
    assert run(func) == "ok"
    assert calls[0][1] is None


@modes
def test_raising_predicate_is_logged_and_not_retried(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry_predicate that raises is logged and the original error propagates."""

    def predicate(exc: BaseException) -> bool:
        raise RuntimeError("bad predicate")

    error = ValueError("x")
    flaky = Flaky([error])
    func, _ = make(flaky, is_async, retry_predicate=predicate)
    with caplog.at_level(logging.ERROR, logger="opero"), pytest.raises(ValueError) as info:
        run(func)
    assert info.value is error
    assert "retry_predicate" in caplog.text


@modes
@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_fatal_errors_are_never_caught(is_async: bool, fatal: type[BaseException]) -> None:
    """KeyboardInterrupt, SystemExit and GeneratorExit propagate at once, unwrapped."""
    flaky = Flaky([fatal()])
    func, waits = make(flaky, is_async, retries=3)
    with pytest.raises(fatal):
        run(func)
    assert flaky.calls == 1
    assert waits == []


def test_cancelled_error_is_never_retried() -> None:
    """asyncio.CancelledError raised by the function propagates at once."""
    flaky = Flaky([asyncio.CancelledError()])
    func, _ = make(flaky, True, retries=3)
    with pytest.raises(asyncio.CancelledError):
        run(func)
    assert flaky.calls == 1


def test_task_cancellation_during_backoff_is_not_wrapped() -> None:
    """Cancelling a task while it waits between retries cancels it, unwrapped."""
    calls = 0

    @op(retries=5, min_delay=60, max_delay=60)
    async def slow() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("x")

    async def main() -> None:
        task = asyncio.create_task(slow())
        while calls == 0:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert calls == 1


@modes
def test_testing_switch_makes_waits_zero(is_async: bool) -> None:
    """While set_testing is on, retries happen without any wait; it restores on exit."""
    flaky = Flaky([ValueError(), ValueError()])
    func, waits = make(flaky, is_async, min_delay=5)
    with opero.set_testing():
        assert run(func) == "ok"
    assert waits == []
    assert flaky.calls == 3
    flaky2 = Flaky([ValueError()])
    func2, waits2 = make(flaky2, is_async, min_delay=5, jitter=False)
    run(func2)
    assert waits2 == [5.0]


def test_set_testing_bare_call_and_type_check() -> None:
    """set_testing(True) turns the switch on until set_testing(False); non-bools are refused."""
    from opero._testing import is_testing

    previous = opero.set_testing(True)
    try:
        assert is_testing()
    finally:
        opero.set_testing(False)
    assert not is_testing()
    assert "set_testing" in repr(previous)
    with pytest.raises(TypeError, match="bool"):
        opero.set_testing("yes")  # type: ignore[arg-type]


@modes
def test_retries_are_logged(is_async: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Each retry and the exhaustion are INFO records (no WARNING) on the opero logger."""
    flaky = Flaky([ValueError("x")] * 3)
    func, _ = make(flaky, is_async, retries=2)
    with caplog.at_level(logging.DEBUG, logger="opero"), pytest.raises(ValueError):
        run(func)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    retries = [r for r in infos if getattr(r, "opero_event", None) == "retry"]
    exhausted = [r for r in infos if getattr(r, "opero_event", None) == "exhausted"]
    assert len(retries) == 2
    assert len(exhausted) == 1
    assert "failed on all 3 calls" in exhausted[0].message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_async_wrapper_is_a_coroutine_function() -> None:
    """An async def keeps inspect.iscoroutinefunction true and never blocks the loop."""
    import inspect

    @op(retries=2, min_delay=0.01)
    async def f() -> int:
        return 1

    assert inspect.iscoroutinefunction(f)
    assert asyncio.run(f()) == 1


def test_async_retry_does_not_block_loop() -> None:
    """While one task waits to retry, other tasks on the loop keep running."""
    progress: list[int] = []
    attempts = 0

    @op(retries=1, min_delay=0.05, jitter=False)
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ValueError
        return "done"

    async def ticker() -> None:
        for i in range(3):
            progress.append(i)
            await asyncio.sleep(0)

    async def main() -> str:
        result, _ = await asyncio.gather(flaky(), ticker())
        return result

    assert asyncio.run(main()) == "done"
    assert progress == [0, 1, 2]


@modes
def test_generated_wrapper_forwards_every_parameter_kind(is_async: bool) -> None:
    """Positional-only, defaults, keyword-only parameters reach the function on every retry."""
    seen: list[tuple[Any, ...]] = []
    default: list[int] = []

    def record(a: Any, b: Any, c: Any, d: Any, e: Any) -> tuple[Any, ...]:
        seen.append((a, b, c, d, e))
        if len(seen) % 2:
            raise ValueError
        return (a, b, c, d, e)

    if is_async:

        async def af(a: Any, b: Any = default, /, c: Any = 1, *, d: Any, e: Any = None) -> Any:
            return record(a, b, c, d, e)

        func: Callable[..., Any] = op(retries=1, min_delay=0)(af)
    else:

        def sf(a: Any, b: Any = default, /, c: Any = 1, *, d: Any, e: Any = None) -> Any:
            return record(a, b, c, d, e)

        func = op(retries=1, min_delay=0)(sf)

    assert run(func, 1, d=2) == (1, default, 1, 2, None)
    assert run(func, 1, [3], c=4, d=5, e=6) == (1, [3], 4, 5, 6)
    assert seen[0] == seen[1]
    assert seen[0][1] is default
    assert seen[2] == seen[3] == (1, [3], 4, 5, 6)


@modes
def test_var_args_functions_are_forwarded(is_async: bool) -> None:
    """Functions taking *args and **kwargs get every argument on every retry."""
    seen: list[tuple[Any, ...]] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        if len(seen) == 1:
            raise ValueError
        return (args, kwargs)

    if is_async:

        async def af(*args: Any, **kwargs: Any) -> Any:
            return record(*args, **kwargs)

        func: Callable[..., Any] = op(retries=1, min_delay=0)(af)
    else:

        def sf(*args: Any, **kwargs: Any) -> Any:
            return record(*args, **kwargs)

        func = op(retries=1, min_delay=0)(sf)

    assert run(func, 1, 2, k=3) == ((1, 2), {"k": 3})
    assert seen == [((1, 2), {"k": 3})] * 2


def test_wrapper_reports_argument_errors_under_the_functions_name() -> None:
    """A call with missing arguments raises TypeError naming the decorated function."""

    @op(retries=2, min_delay=0)
    def needs_two(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match=r"needs_two\(\) missing 1 required positional"):
        needs_two(1)  # type: ignore[call-arg]


@given(retries=st.integers(0, 6), failures=st.integers(0, 9))
@settings(max_examples=60, deadline=None)
def test_rounds_and_outcome_follow_retries_property(retries: int, failures: int) -> None:
    """For any retries N and F leading failures: min(F, N) + 1 calls, success iff F <= N."""
    errors = [ValueError(i) for i in range(failures)]
    flaky = Flaky(list(errors))
    waits: list[float] = []
    func = op(retries=retries, jitter=False, _sleep=waits.append)(lambda: flaky())
    if failures <= retries:
        assert func() == "ok"
    elif retries == 0:
        with pytest.raises(ValueError) as single:
            func()
        assert single.value is errors[0]
    else:
        with pytest.raises(ValueError) as info:
            func()
        assert info.value is errors[retries]
        assert attempt_errors(info.value) == errors[: retries + 1]
    assert flaky.calls == min(failures, retries) + 1
    assert len(waits) == min(failures, retries)
