"""Hostile combinations of the merged ``@opero`` features: each test is an attack on a seam."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from faultkit import ROOT, run_scenario
from opero import CallDetails, RateLimitTimeout
from opero import opero as op


def _recorder(events: list[tuple[Any, ...]]) -> Any:
    """Return a details callback appending (event, args, attempt) to ``events``."""

    def record(details: CallDetails) -> None:
        events.append((details.event, details.args, details.attempt))

    return record


def test_token_past_timeout_after_a_failure_gives_on_failure_the_call_arguments() -> None:
    """A retry refused because its token ends past ``timeout`` tells on_failure the call's args."""
    events: list[tuple[Any, ...]] = []
    record = _recorder(events)

    @op(
        retries=3,
        backoff_function=lambda attempt: 0.0,
        rate_limit=1.0,
        timeout=0.5,
        on_failure=record,
        _sleep=lambda seconds: None,
    )
    def fetch(x: int) -> int:
        raise ValueError(x)

    with pytest.raises(ValueError, match="7"):
        fetch(7)
    assert events == [("failure", (7,), 1)]


def test_token_past_timeout_before_any_call_gives_on_failure_the_call_arguments() -> None:
    """A first call refused because its token ends past ``timeout`` tells on_failure its args."""
    events: list[tuple[Any, ...]] = []
    record = _recorder(events)

    @op(rate_limit=1.0, timeout=0.5, on_failure=record, _sleep=lambda seconds: None)
    def fetch(x: int) -> int:
        return x

    assert fetch(1) == 1
    with pytest.raises(RateLimitTimeout):
        fetch(8)
    assert events == [("failure", (8,), 1)]


def _async_fetch(events: list[tuple[Any, ...]], retries: int) -> Any:
    """Return an async function failing with its argument, limited to one call a second."""

    async def no_sleep(seconds: float) -> None:
        return None

    @op(
        retries=retries,
        backoff_function=lambda attempt: 0.0,
        rate_limit=1.0,
        timeout=0.5,
        on_failure=_recorder(events),
        _asleep=no_sleep,
    )
    async def fetch(x: int) -> int:
        raise ValueError(x)

    return fetch


def test_async_token_past_timeout_after_a_failure_gives_on_failure_the_call_arguments() -> None:
    """The async retry loop tells on_failure the args when a token ends past ``timeout``."""
    events: list[tuple[Any, ...]] = []
    fetch = _async_fetch(events, retries=3)
    with pytest.raises(ValueError, match="7"):
        asyncio.run(fetch(7))
    assert events == [("failure", (7,), 1)]


@pytest.mark.xfail(
    strict=True,
    reason="the async first-call token check (aio.check_deadline via take_token) is not "
    "given the call's arguments: on_failure's details have args=()",
)
def test_async_token_past_timeout_before_any_call_gives_on_failure_the_call_arguments() -> None:
    """The async first call refused at its token tells on_failure the call's args."""
    events: list[tuple[Any, ...]] = []
    fetch = _async_fetch(events, retries=0)
    with pytest.raises(ValueError, match="1"):
        asyncio.run(fetch(1))
    with pytest.raises(RateLimitTimeout):
        asyncio.run(fetch(8))
    assert events[-1] == ("failure", (8,), 1)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("details", [False, True], ids=["classic", "details"])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_token_wait_refused_by_timeout_is_not_reported_as_a_wait(
    is_async: bool, details: bool, keyed: bool
) -> None:
    """A token wait that ``timeout`` refuses is neither counted nor reported as a wait."""
    events: list[Any] = []
    slept: list[float] = []

    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    options: dict[str, Any] = {
        "retries": 2,
        "backoff_function": lambda attempt: 0.0,
        "rate_limit": 1.0,
        "timeout": 0.5,
        "on_rate_limit_wait": _recorder(events) if details else events.append,
    }
    if keyed:
        options["rate_limit_key"] = lambda x: "one"

    def make() -> tuple[Callable[[int], int], Callable[[], Any]]:
        """Return a fresh decorated function (its own bucket) and its stats()."""
        if is_async:

            @op(**options, _asleep=asleep)
            async def afetch(x: int) -> int:
                if x < 0:
                    raise ValueError(x)
                return x

            return (lambda x: asyncio.run(afetch(x))), afetch.stats

        @op(**options, _sleep=slept.append)
        def fetch(x: int) -> int:
            if x < 0:
                raise ValueError(x)
            return x

        return fetch, fetch.stats

    first, first_stats = make()
    assert first(1) == 1
    with pytest.raises(RateLimitTimeout):  # refused before any call
        first(2)
    retried, retried_stats = make()
    with pytest.raises(ValueError):  # the retry's token is past the deadline
        retried(-1)
    assert first_stats().rate_limit_waits == retried_stats().rate_limit_waits == 0
    assert slept == []
    assert events == []


def test_call_counting_turned_on_later_counts_a_function_with_a_timeout() -> None:
    """``set_call_counting(True)`` counts the calls of a ``timeout=`` function decorated before."""
    from opero._opero_core import TimedCall
    from opero.instrumentation import set_call_counting

    set_call_counting(False)  # decorated while counting is off: the native timed first call

    @op(timeout=5.0, retries=2)
    def fetch(x: int) -> int:
        return x

    assert any(isinstance(o, TimedCall) for o in _inner_chain(fetch))
    set_call_counting(True)
    try:
        assert fetch(1) == 1
        assert fetch(2) == 2
        assert fetch.stats().calls == 2
    finally:
        set_call_counting(False)


def test_documented_log_format_formats_every_record_of_the_pipeline() -> None:
    """The docs' ``%(opero_event)s`` format prints every pipeline record; a token wait logs once."""
    path = os.environ.get("PYTHONPATH", "")
    outcome = run_scenario(
        """
        import logging
        logging.basicConfig(
            level=logging.DEBUG,
            format="%(opero_event)s %(opero_function)s attempt=%(opero_attempt)s|%(message)s",
        )
        from opero import CircuitBreaker, opero

        breaker = CircuitBreaker(failures=2, name="pay")

        @opero(
            retries=1,
            backoff_function=lambda attempt: 0.0,
            on_retry=lambda exc: 1 / 0,
            rate_limit=0.5,
            circuit_breaker=breaker,
            _sleep=lambda seconds: None,
        )
        def charge():
            raise TimeoutError("gateway timeout")

        try:
            charge()
        except Exception as exc:
            print(type(exc).__name__)
        """,
        timeout=60,
        env={"PYTHONPATH": str(ROOT / "python") + (os.pathsep + path if path else "")},
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["TimeoutError"]
    assert "Logging error" not in outcome.stderr, outcome.stderr
    records = [line for line in outcome.stderr.splitlines() if "|opero:" in line]
    assert any(r.startswith("callback_error None attempt=None|") for r in records), records
    assert any(r.startswith("retry __main__.charge attempt=1|") for r in records), records
    assert any("circuit breaker" in r and r.startswith("None ") for r in records), records
    token_records = [r for r in records if "rate-limit token" in r]
    assert len(token_records) == 1, records
    assert token_records[0].startswith("rate_limit_wait __main__.charge attempt=2|"), records


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_keyed_token_wait_of_a_fallback_candidate_reports_the_callers_arguments(
    is_async: bool,
) -> None:
    """on_rate_limit_wait's details hold the caller's arguments for every fallback candidate."""
    events: list[tuple[Any, ...]] = []
    keys: list[str] = []

    def key(urls: list[str]) -> str:
        keys.append(urls[0])
        return "one"

    async def no_sleep(seconds: float) -> None:
        return None

    options: dict[str, Any] = {
        "retries": 0,
        "arg_fallback": "urls",
        "rate_limit": 1.0,
        "rate_limit_key": key,
        "on_rate_limit_wait": _recorder(events),
    }
    if is_async:

        @op(**options, _asleep=no_sleep)
        async def afetch(urls: list[str]) -> str:
            raise ValueError(urls[0])

        with pytest.raises(Exception, match="on all 2 calls"):
            asyncio.run(afetch(["a", "b"]))
    else:

        @op(**options, _sleep=lambda seconds: None)
        def fetch(urls: list[str]) -> str:
            raise ValueError(urls[0])

        with pytest.raises(Exception, match="on all 2 calls"):
            fetch(["a", "b"])
    assert keys == ["a", "b"]  # each candidate is keyed by its own arguments
    assert events == [("rate_limit_wait", (["a", "b"],), 2)]


@pytest.mark.xfail(
    strict=True,
    reason="async memory cache: when the computing task is cancelled, each waiter that "
    "finds no flight left recomputes without looking the cache up again (the native async "
    "path calls TaskFlight.do without stamp/recheck): 3 waiters -> 3 computations",
)
def test_waiters_of_a_cancelled_async_computation_compute_once() -> None:
    """After the computing task is cancelled, its waiters share one new computation."""
    runs: list[int] = []

    @op(cache=True)
    async def lookup(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            await asyncio.sleep(30)
        return x

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(lookup(2)) for _ in range(4)]
        await asyncio.sleep(0.05)
        tasks[0].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [2, 2, 2]
    assert len(runs) == 2


@pytest.mark.parametrize("generic", [False, True], ids=["generated", "generic"])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_waited_includes_the_first_calls_token_wait(
    is_async: bool, keyed: bool, generic: bool
) -> None:
    """``details.waited`` of a retry and of the success after it counts the first token wait."""
    events: list[tuple[str, int, float]] = []

    def record(details: CallDetails) -> None:
        events.append((details.event, details.attempt, round(details.waited, 6)))

    async def asleep(seconds: float) -> None:
        return None

    failures = [ValueError("once")]
    options: dict[str, Any] = {
        "retries": 1,
        "backoff_function": lambda attempt: 0.5,
        "rate_limit": 1.0,
        "on_retry": record,
        "on_success": record,
    }
    if keyed:
        options["rate_limit_key"] = lambda x: "one"
    if generic:  # a details on_rate_limit_wait takes the generic first-call wrapper
        options["on_rate_limit_wait"] = lambda details: None
    if is_async:

        @op(**options, _asleep=asleep)
        async def afetch(x: int) -> int:
            if x == 2 and failures:
                raise failures.pop()
            return x

        async def both() -> list[int]:
            return [await afetch(1), await afetch(2)]

        assert asyncio.run(both()) == [1, 2]
    else:

        @op(**options, _sleep=lambda seconds: None)
        def fetch(x: int) -> int:
            if x == 2 and failures:
                raise failures.pop()
            return x

        assert [fetch(1), fetch(2)] == [1, 2]
    # Sleeps take no time: call 2 books a token ~1 s away, fails, waits 0.5 s of backoff,
    # then books the next token ~2 s away.
    assert [e[:2] for e in events] == [("success", 1), ("retry", 1), ("success", 2)]
    first_token = events[1][2]
    assert 0.5 < first_token <= 1.0
    assert 1.5 < events[2][2] - first_token - 0.5 <= 2.0 + 1e-6


@pytest.mark.xfail(
    strict=True,
    reason="a cached function's calls are the store's hits + misses; a call under "
    "set_testing(cache=False) skips the store and is not counted, even with call counting on",
)
def test_calls_under_the_cache_bypass_are_counted() -> None:
    """``stats().calls`` counts the calls made while ``set_testing(cache=False)`` is on."""
    from opero import set_testing
    from opero.instrumentation import set_call_counting

    runs: list[int] = []

    @op(cache=True, retries=1)
    def lookup(x: int) -> int:
        runs.append(x)
        return x

    set_call_counting(True)
    try:
        with set_testing(cache=False):
            assert [lookup(1), lookup(1)] == [1, 1]
        assert runs == [1, 1]
        assert lookup.stats().calls == 2
    finally:
        set_call_counting(False)


@pytest.mark.xfail(
    strict=True,
    reason="a RateLimitTimeout before any call fires on_failure and counts as a failure when "
    "timeout= refused the token (Engine.token_late -> give_up), but not when rate_max_wait "
    "did (the limiter's check raises); docs/circuit-breaker.md says on_failure is not called "
    "for RateLimitTimeout: the lead picks one rule",
)
def test_rate_limit_timeout_before_any_call_is_reported_the_same_whatever_refused_it() -> None:
    """A token refused by ``rate_max_wait`` or by ``timeout`` reaches on_failure and stats alike."""
    seen: dict[str, tuple[list[str], int]] = {}
    for name, option in (("rate_max_wait", {"rate_max_wait": 0.1}), ("timeout", {"timeout": 0.1})):
        failed: list[str] = []

        @op(
            rate_limit=1.0,
            on_failure=lambda exc, failed=failed: failed.append(type(exc).__name__),
            _sleep=lambda seconds: None,
            **option,
        )
        def fetch() -> int:
            return 1

        assert fetch() == 1
        with pytest.raises(RateLimitTimeout):
            fetch()
        seen[name] = (failed, fetch.stats().failures)
    assert seen["rate_max_wait"] == seen["timeout"]


def test_token_past_timeout_with_details_leaves_no_reference_cycle() -> None:
    """A retry refused at its token (details callbacks on) leaves nothing for the collector."""
    import gc
    import logging

    logger = logging.getLogger("opero")
    level = logger.level
    logger.setLevel(logging.CRITICAL)

    @op(
        retries=2,
        backoff_function=lambda attempt: 0.0,
        rate_limit=1.0,
        timeout=0.5,
        on_failure=lambda details: None,
        on_retry=lambda details: None,
        _sleep=lambda seconds: None,
    )
    def fetch(x: int) -> int:
        raise ValueError(x)

    try:
        with pytest.raises(ValueError):
            fetch(-1)
        gc.collect()
        gc.disable()
        try:
            for i in range(100):
                with pytest.raises(Exception):  # noqa: B017 (ValueError or RateLimitTimeout)
                    fetch(i)
            assert gc.collect() == 0
        finally:
            gc.enable()
    finally:
        logger.setLevel(level)


def _inner_chain(f: object) -> list[object]:
    """Return ``f`` and every callable reachable through ``__wrapped__``/``__opero__`` (tests)."""
    seen: list[object] = []
    todo = [f]
    while todo and len(seen) < 20:
        obj = todo.pop()
        if any(obj is s for s in seen):
            continue
        seen.append(obj)
        for name in ("__wrapped__", "_inner", "inner", "call", "_call"):
            child = getattr(obj, name, None)
            if child is not None and callable(child):
                todo.append(child)
        meta = getattr(obj, "__opero__", None)
        for name in ("inner", "call", "sync_call", "first_call"):
            child = getattr(meta, name, None)
            if child is not None and callable(child):
                todo.append(child)
    return seen
