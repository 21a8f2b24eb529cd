"""One engine, two drivers: the decisions, their sync/async parity, and generated wrappers."""

from __future__ import annotations

import asyncio
import linecache
import sys
import traceback
from typing import Any

import pytest

from faultkit import run_scenario
from opero import AllFailedError, opero
from opero._pipeline.engine import Engine
from opero._pipeline.policy import build_policy


def _engine(func: Any, **options: Any) -> Engine:
    return Engine(build_policy(func, options), func, "tests.f")


def test_after_failure_walks_candidates_then_rounds_then_gives_up() -> None:
    """after_failure tries the next candidate, then the next round after a wait, then exhausts."""

    def f(x: int, host: tuple[str, ...] = ("a", "b")) -> int:
        return x

    engine = _engine(f, retries=1, arg_fallback="host", min_delay=0.5, jitter=False)
    errors: list[Exception] = [OSError("a0")]
    assert engine.after_failure(errors, 0, 0, 2) == (0, 1, 0.0, None)
    errors.append(OSError("b0"))
    assert engine.after_failure(errors, 0, 1, 2) == (1, 0, 0.5, None)
    errors += [OSError("a1"), OSError("b1")]
    round_, index, wait, error = engine.after_failure(errors, 1, 1, 2)
    assert isinstance(error, AllFailedError)
    assert list(error.errors) == errors
    assert (round_, index, wait) == (1, 1, 0.0)


def test_after_failure_returns_a_non_retryable_error_unchanged() -> None:
    """An error outside retry_on is the error to raise at once, the same object."""
    engine = _engine(lambda: None, retries=5, retry_on=KeyError)
    exc = ValueError("no")
    assert engine.after_failure([exc], 0, 0, 1) == (0, 0, 0.0, exc)


def _recording(sink: list[Any]) -> tuple[Any, Any]:
    def sync_call(x: int, host: tuple[str, ...] = ("a", "b", "c")) -> str:
        sink.append(host[0])
        if host[0] != "c" or len([h for h in sink if h == "c"]) < 2:
            raise ConnectionError(host[0])
        return f"{x}@{host[0]}"

    async def async_call(x: int, host: tuple[str, ...] = ("a", "b", "c")) -> str:
        return sync_call(x, host)

    return sync_call, async_call


def test_sync_and_async_drivers_make_the_same_calls_and_waits() -> None:
    """The two drivers call the same candidates in the same order and wait the same times."""
    options: dict[str, Any] = {
        "retries": 2,
        "arg_fallback": "host",
        "min_delay": 0.25,
        "backoff_factor": 2.0,
        "jitter": False,
    }
    sync_calls: list[Any] = []
    async_calls: list[Any] = []
    sync_waits: list[float] = []
    async_waits: list[float] = []

    async def asleep(seconds: float) -> None:
        async_waits.append(seconds)

    sync_f, _ = _recording(sync_calls)
    _, async_f = _recording(async_calls)
    assert opero(**options, _sleep=sync_waits.append)(sync_f)(1) == "1@c"
    assert asyncio.run(opero(**options, _asleep=asleep)(async_f)(1)) == "1@c"
    assert sync_calls == async_calls == ["a", "b", "c", "a", "b", "c"]
    assert sync_waits == async_waits == [0.25]


def _raiser(x: int) -> int:
    raise ValueError(f"bad {x}")


@pytest.mark.parametrize(
    ("options", "line"),
    [
        # Every failure goes through the engine (counted by f.stats()).
        ({"retries": 0, "on_success": lambda: None}, "return __opero_retry_from("),
        ({"retries": 0, "on_failure": lambda exc: None}, "return __opero_retry_from("),
    ],
)
def test_generated_wrapper_frames_show_their_source(options: dict[str, Any], line: str) -> None:
    """A traceback through a generated wrapper shows the wrapper's source line (linecache)."""
    decorated = opero(**options)(_raiser)
    with pytest.raises(ValueError, match="bad 3") as info:
        decorated(3)
    frames = traceback.extract_tb(info.value.__traceback__)
    generated = [f for f in frames if f.filename.startswith("<opero wrapper of")]
    assert generated, [f.filename for f in frames]
    assert "_raiser" in generated[0].filename
    assert (generated[0].line or "").startswith(line)
    assert line in "".join(traceback.format_exception(info.value))


def test_redecorating_reuses_the_linecache_entry() -> None:
    """Decorating the same function the same way again adds no linecache entry."""
    opero(retries=1)(_raiser)
    before = {k for k in linecache.cache if str(k).startswith("<opero wrapper of")}
    for _ in range(20):
        opero(retries=1)(_raiser)
    after = {k for k in linecache.cache if str(k).startswith("<opero wrapper of")}
    assert after == before
    assert any("_raiser" in str(k) for k in after)


@pytest.mark.parametrize("is_async", [False, True])
def test_fallback_candidates_are_sliced_before_the_first_call(is_async: bool) -> None:
    """A function that changes its candidate list still gets values[1:] as taken before."""
    seen: list[list[str]] = []

    def body(hosts: list[str]) -> str:
        seen.append(list(hosts))
        if hosts[0] == "a":
            hosts.clear()  # a hostile body empties the list it was given
            raise ConnectionError("a down")
        return hosts[0]

    def sync_f(hosts: list[str] | None = None) -> str:
        return body(hosts or [])

    async def async_f(hosts: list[str] | None = None) -> str:
        return body(hosts or [])

    options: dict[str, Any] = {"retries": 0, "arg_fallback": "hosts"}
    if is_async:
        result = asyncio.run(opero(**options)(async_f)(["a", "b"]))
    else:
        result = opero(**options)(sync_f)(["a", "b"])
    assert result == "b"
    assert seen == [["a", "b"], ["b"]]


def test_a_memory_cache_hit_runs_no_python_code_of_opero() -> None:
    """A sync memory-cache hit stays in the native CachedCall: no Python frame of opero runs."""

    def double(x: int) -> int:
        return 2 * x

    cached = opero(cache=True, retries=3, rate_limit=1e9, on_success=lambda: None)(double)
    assert cached(21) == 42  # the miss fills the cache
    frames: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        value = cached(21)
    finally:
        sys.setprofile(None)
    assert value == 42
    assert frames == []


LONG_CHAIN_SCENARIO = """
    import asyncio
    import sys
    import tracemalloc

    from opero import opero

    hosts = list(range(200_000))
    tried = []


    @opero(arg_fallback="hosts", retries=0)
    def fetch(hosts):
        tried.append(len(hosts))
        if len(tried) < 3:
            raise ConnectionError(hosts[0])
        return hosts[0]


    @opero(arg_fallback="hosts", retries=0)
    async def afetch(hosts):
        return fetch.__wrapped__(hosts)


    tracemalloc.start()
    first = fetch(hosts)
    tried.clear()
    second = asyncio.run(afetch(tuple(hosts)))
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    print(first, second, tried, peak_mib < 64)
"""


def test_a_long_fallback_chain_builds_only_the_candidates_it_tries() -> None:
    """200k candidates cost one copy of the list, not one slice per candidate up front."""
    outcome = run_scenario(LONG_CHAIN_SCENARIO, timeout=120)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["2 2 [200000, 199999, 199998] True"]
