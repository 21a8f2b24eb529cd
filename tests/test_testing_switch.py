"""opero.set_testing: zero waits, attempts, cache and rate-limit bypass, nesting, workers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import opero
from faultkit import run_scenario
from opero import opero as op
from opero.errors import attempt_errors


@pytest.fixture(autouse=True)
def _switch_off() -> Any:
    """Every test starts and ends with the switch off."""
    opero.set_testing(False)
    yield
    opero.set_testing(False)


def test_is_testing_is_exported_and_follows_the_switch() -> None:
    """opero.is_testing() reports the switch, through set_testing and its context manager."""
    assert opero.is_testing() is False
    with opero.set_testing():
        assert opero.is_testing() is True
    assert opero.is_testing() is False


def test_context_manager_restores_on_exceptions_and_nests() -> None:
    """Nested blocks restore the previous state on exit, also when a block raises."""
    with opero.set_testing(attempts=3):
        with pytest.raises(KeyError), opero.set_testing(attempts=1, cache=False):
            raise KeyError("boom")
        calls: list[int] = []

        @op(retries=5)
        def down() -> None:
            calls.append(1)
            raise ConnectionError

        with pytest.raises(ConnectionError):
            down()
        assert len(calls) == 3  # attempts=3 is back, cache=False is gone
    assert opero.is_testing() is False


def test_attempts_caps_total_calls() -> None:
    """attempts=1 makes one call and no retry; attempts=2 two calls; None keeps retries."""
    for attempts, expected in ((1, 1), (2, 2), (None, 6)):
        calls: list[int] = []

        @op(retries=5, min_delay=30.0)
        def down(calls: list[int] = calls) -> None:
            calls.append(1)
            raise ConnectionError("down")

        with opero.set_testing(attempts=attempts), pytest.raises(ConnectionError) as info:
            down()
        assert len(calls) == expected
        assert len(attempt_errors(info.value)) == expected


def test_attempts_keep_every_fallback_candidate() -> None:
    """attempts=1 still tries each arg_fallback candidate once (one round)."""
    tried: list[str] = []

    @op(retries=3, arg_fallback="hosts")
    def fetch(hosts: tuple[str, ...] = ("a", "b")) -> None:
        tried.append(hosts[0])
        raise ConnectionError(hosts[0])

    with opero.set_testing(attempts=1), pytest.raises(opero.AllFailedError):
        fetch()
    assert tried == ["a", "b"]


@pytest.mark.parametrize("kind", ["memory-sync", "memory-async", "memory-key", "disk"])
def test_cache_false_bypasses_lookups_and_stores(kind: str, tmp_path: Any) -> None:
    """cache=False runs the function on every call, stores nothing; leaving restores the cache."""
    calls: list[int] = []
    options: dict[str, Any] = {"cache": True}
    if kind == "memory-key":
        options["cache_key"] = lambda func, x: ("k", x)
    if kind == "disk":
        options.update(cache_backend="disk", cache_dir=str(tmp_path))

    if kind == "memory-async":

        @op(**options)
        async def acompute(x: int) -> int:
            calls.append(x)
            return x * 2

        def compute(x: int) -> int:
            return asyncio.run(acompute(x))  # type: ignore[no-any-return]

        f: Any = acompute
    else:

        @op(**options)
        def compute(x: int) -> int:
            calls.append(x)
            return x * 2

        f = compute

    assert compute(1) == 2  # cached before the switch
    with opero.set_testing(cache=False):
        assert compute(1) == 2
        assert compute(1) == 2
        assert compute(5) == 10  # not stored
    assert calls == [1, 1, 1, 5]
    assert compute(1) == 2  # the entry from before is served again
    assert compute(5) == 10  # 5 was not stored during the bypass
    assert calls == [1, 1, 1, 5, 5]
    with pytest.raises(KeyError):
        f.cache_get(9)


def test_cache_bypass_reaches_functions_decorated_during_it() -> None:
    """A function decorated while the cache is bypassed is bypassed at once."""
    calls: list[int] = []
    with opero.set_testing(cache=False):

        @op(cache=True)
        def compute(x: int) -> int:
            calls.append(x)
            return x

        compute(1)
        compute(1)
    compute(1)
    compute(1)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_rate_limit_false_takes_no_token(is_async: bool) -> None:
    """rate_limit=False makes no wait and takes no token; leaving it restores the limit."""
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    if is_async:

        @op(rate_limit=0.001, retries=0, _asleep=asleep)
        async def alimited(x: int) -> int:
            return x

        def limited(x: int) -> int:
            return asyncio.run(alimited(x))  # type: ignore[no-any-return]

    else:

        @op(rate_limit=0.001, retries=0, _sleep=waits.append)
        def limited(x: int) -> int:
            return x

    with opero.set_testing(rate_limit=False):
        assert [limited(i) for i in range(5)] == list(range(5))
    assert waits == []
    assert limited(9) == 9  # the burst token was never taken
    assert waits == []
    assert limited(10) == 10  # the limit is back: the next token is 1000 s away
    assert len(waits) == 1
    assert waits[0] > 900


def test_rate_limit_bypass_in_the_generic_wrapper() -> None:
    """A callable object (no generated wrapper) skips its tokens too."""
    waits: list[float] = []

    class Limited:
        def __call__(self, x: int) -> int:
            return x

    f = op(rate_limit=0.001, _sleep=waits.append)(Limited())
    with opero.set_testing(rate_limit=False):
        assert [f(i) for i in range(3)] == [0, 1, 2]
    assert waits == []


def test_switches_are_independent() -> None:
    """attempts, cache and rate_limit each apply only when given; waits are zero in all."""
    calls: list[int] = []

    @op(cache=True)
    def compute(x: int) -> int:
        calls.append(x)
        return x

    compute(1)
    with opero.set_testing(attempts=1):
        compute(1)  # the cache still works
    assert calls == [1]


@pytest.mark.parametrize(
    "bad",
    [
        {"enabled": 1},
        {"attempts": 0},
        {"attempts": True},
        {"attempts": 1.5},
        {"cache": None},
        {"rate_limit": "no"},
    ],
)
def test_bad_arguments_are_type_errors(bad: dict[str, Any]) -> None:
    """Bad arguments to set_testing raise TypeError naming the parameter, state unchanged."""
    name = next(iter(bad))
    with pytest.raises(TypeError, match=name):
        opero.set_testing(**bad)
    assert opero.is_testing() is False


def test_options_with_enabled_false_are_refused() -> None:
    """set_testing(False, attempts=1) is contradictory and raises ValueError."""
    with pytest.raises(ValueError, match="set_testing"):
        opero.set_testing(False, attempts=1)


def _result(source: str, timeout: float = 90) -> Any:
    outcome = run_scenario(source, timeout=timeout)
    assert outcome.returncode == 0, outcome.stderr
    line = [x for x in outcome.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_attempts_and_cache_reach_process_workers(method: str) -> None:
    """A process map's workers, spawned or forked, take attempts=1 and cache=False."""
    result = _result(
        f"""
        import json, multiprocessing, os
        import opero
        from opero import opmap, opero as op

        @op(cache=True)
        def cached_pid(x):
            return os.getpid(), x

        def f(x):
            raise ValueError(f"fails {{x}}")

        def g(x):
            a = cached_pid(1)
            b = cached_pid(1)
            return a is b

        if __name__ == "__main__":
            multiprocessing.set_start_method({method!r}, force=True)
            mapped = opmap(mode="process", workers=2, progress=False, strict=False,
                           retries=3, min_delay=30.0)(f)
            same = opmap(mode="process", workers=1, progress=False)(g)
            with opero.set_testing(attempts=1, cache=False):
                out = mapped([1, 2])
                counts = [len(opero.attempt_errors(e)) for e in out]
                bypassed = same([0])
            print("RESULT " + json.dumps([counts, bypassed]))
        """
    )
    assert result == [[1, 1], [False]]


def test_cache_false_reaches_opmap_cache_lookups() -> None:
    """An @opmap with cache=True runs every item while the cache is bypassed, and stores none."""
    calls: list[int] = []

    @opero.opmap(mode="thread", workers=2, progress=False, cache=True)
    def double(x: int) -> int:
        calls.append(x)
        return x * 2

    assert double([1, 2]) == [2, 4]
    with opero.set_testing(cache=False):
        assert double([1, 2, 3]) == [2, 4, 6]
    assert sorted(calls) == [1, 1, 2, 2, 3]
    assert double([1, 2, 3]) == [2, 4, 6]  # 3 was not stored during the bypass
    assert sorted(calls) == [1, 1, 2, 2, 3, 3]
