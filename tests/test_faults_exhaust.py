"""Exhaustion faults: reference cycles, stacked layers, @opmap items, pickling, the 2.x alias."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import opero
from opero import AllFailedError, opmap
from opero import opero as op
from opero.errors import attempt_errors

CALLS = 300


@pytest.fixture(autouse=True)
def _instant_and_quiet() -> Iterator[None]:
    """Make retries instant and silence the exhaustion warnings."""
    opero.set_testing(True)
    logger = logging.getLogger("opero")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        opero.set_testing(False)


def fails(x: int, endpoint: tuple[str, ...] = ("a", "b")) -> None:
    """Raise ValueError(x), always."""
    raise ValueError(x)


async def afails(x: int, endpoint: tuple[str, ...] = ("a", "b")) -> None:
    """Raise ValueError(x) asynchronously, always."""
    raise ValueError(x)


class Fails:
    """A callable object that always raises (not a plain function: the generic closures)."""

    def __call__(self, x: int, endpoint: tuple[str, ...] = ("a", "b")) -> None:
        """Raise ValueError(x)."""
        raise ValueError(x)


def left_for_collector(call: Callable[[int], Any]) -> int:
    """Call ``call(i)`` CALLS times, collector off, dropping errors; return collect()."""
    with pytest.raises(Exception):  # noqa: B017 (any error: warm-up only)
        call(-1)
    gc.collect()
    gc.disable()
    try:
        for i in range(CALLS):
            try:
                call(i)
            except Exception:
                continue
        return gc.collect()
    finally:
        gc.enable()


CONFIGS = {
    "retries": {"retries": 2},
    "fallback": {"retries": 1, "arg_fallback": "endpoint"},
    "callbacks": {"retries": 2, "on_failure": lambda e: None, "on_retry": lambda e: None},
    "rate_limit": {"retries": 2, "rate_limit": 1e6, "rate_burst": 10_000},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("target", ["function", "callable object"])
def test_sync_exhaustion_leaves_no_cycle(config: str, target: str) -> None:
    """A dropped exhausted-retry or fallback error is freed by refcounting (gc finds 0)."""
    func = op(**CONFIGS[config])(fails if target == "function" else Fails())
    assert left_for_collector(func) == 0


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_async_exhaustion_leaves_no_cycle(config: str) -> None:
    """The async driver frees a dropped exhausted error by refcounting too (gc finds 0)."""
    func = op(**CONFIGS[config])(afails)

    async def main() -> tuple[int, int]:
        async def control(i: int) -> None:
            await afails(i)

        async def measure(call: Callable[[int], Any]) -> int:
            gc.collect()
            gc.disable()
            try:
                for i in range(CALLS):
                    try:
                        await call(i)
                    except Exception:
                        continue
                return gc.collect()
            finally:
                gc.enable()

        with pytest.raises(Exception):  # noqa: B017 (warm-up)
            await func(-1)
        return await measure(control), await measure(func)

    baseline, leaked = asyncio.run(main())
    assert baseline == 0
    assert leaked == 0


def test_fallback_chain_still_raises_all_failed_error() -> None:
    """An exhausted arg_fallback chain raises AllFailedError with every error in call order."""
    func = op(retries=1, arg_fallback="endpoint")(fails)
    with pytest.raises(AllFailedError) as info:
        func(7)
    assert len(info.value.errors) == 4
    assert info.value.__cause__ is info.value.errors[-1]
    assert attempt_errors(info.value) == info.value.errors


def counting(calls: list[str]) -> Callable[[str], str]:
    """Return a function that records each call and always raises ConnectionError."""

    def body(key: str) -> str:
        calls.append(key)
        raise ConnectionError(key)

    return body


def test_stacked_layers_do_not_multiply_attempts() -> None:
    """The guide's L1-over-L2 recipe (memory standing in for Redis) runs the body 4 times."""
    calls: list[str] = []
    inner = op(cache=True, cache_namespace="l2-stand-in", cache_ttl=3600)(counting(calls))
    outer = op(cache=True, cache_backend="memory", cache_ttl=60, cache_max_size=100)(inner)
    with pytest.raises(ConnectionError) as info:
        outer("k")
    assert len(calls) == 4
    assert len(attempt_errors(info.value)) == 4


def test_stacked_explicit_retries_is_honoured() -> None:
    """An outer layer that sets retries explicitly retries the inner one (documented rule)."""
    calls: list[str] = []
    inner = op(retries=1)(counting(calls))
    outer = op(retries=2)(inner)
    with pytest.raises(ConnectionError):
        outer("k")
    assert len(calls) == 2 * 3


def test_stacked_async_layers_do_not_multiply_attempts() -> None:
    """Two default async layers run an always-failing body retries+1 times."""
    calls: list[int] = []

    async def body() -> None:
        calls.append(1)
        raise ConnectionError

    func = op(cache=True)(op(cache=True, cache_namespace="inner-async")(body))
    with pytest.raises(ConnectionError):
        asyncio.run(func())
    assert len(calls) == 4


@pytest.mark.redis
def test_guide_l1_over_redis_l2_runs_body_at_most_retries_plus_one(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's L1 memory over L2 Redis recipe, as written, runs a failing body 4 times."""
    monkeypatch.setenv("OPERO_REDIS_URL", redis_url)
    calls: list[str] = []
    body = counting(calls)

    @op(cache=True, cache_backend="memory", cache_ttl=60, cache_max_size=100)
    @op(cache=True, cache_backend="redis", cache_ttl=3600, cache_namespace="l2")
    def hierarchical_cached_function(key: str) -> str:
        return body(key)

    with pytest.raises(ConnectionError) as info:
        hierarchical_cached_function("a")
    assert len(calls) == 4
    assert info.value.args == ("a",)


def item(x: int) -> int:
    """Fail on odd items with a fresh ValueError, return even ones."""
    if x % 2:
        raise ValueError(x)
    return x


def test_opmap_item_holds_the_same_exception_as_a_direct_call() -> None:
    """A failed @opmap item holds the error type and note a direct @opero call raises."""
    direct = op(retries=2)(item)
    with pytest.raises(ValueError) as info:
        direct(1)
    mapped = opmap(mode="thread", workers=2, progress=False, retries=2)(item)
    with pytest.warns(opero.OpmapFailureWarning):
        results = mapped([0, 1, 2])
    assert results[0] == 0
    assert results[2] == 2
    failed = results[1]
    assert type(failed) is type(info.value)
    assert failed.args == info.value.args
    assert len(attempt_errors(failed)) == len(attempt_errors(info.value)) == 3
    assert [n.split(" failed")[1] for n in failed.__notes__] == [
        n.split(" failed")[1] for n in info.value.__notes__
    ]


class Greeter:
    """A callable object (no __qualname__ on the instance)."""

    def __call__(self, name: str) -> str:
        """Greet."""
        return f"hello {name}"


def subtract(a: int, b: int) -> int:
    """Return a - b."""
    return a - b


cached_object = op(cache=True, retries=0)(Greeter())
cached_partial = op(cache=True, retries=0)(functools.partial(subtract, 10))
unbound_object = op(cache=True, retries=0)(Greeter())
retried_object = op(retries=1)(Greeter())


def test_cached_callable_object_and_partial_pickle_by_name() -> None:
    """A cached callable object and partial bound to module names pickle as themselves."""
    assert pickle.loads(pickle.dumps(cached_object)) is cached_object
    assert pickle.loads(pickle.dumps(cached_partial)) is cached_partial
    assert pickle.loads(pickle.dumps(cached_partial))(3) == 7


def test_unpicklable_decorated_objects_say_why() -> None:
    """A decorated callable object with no module-level name raises a PicklingError saying why."""
    local = op(cache=True, retries=0)(Greeter())
    with pytest.raises(pickle.PicklingError, match="no __qualname__"):
        pickle.dumps(local)
    with pytest.raises(pickle.PicklingError, match="no __qualname__"):
        pickle.dumps(retried_object)


def test_static_and_class_methods_keep_their_binding() -> None:
    """@opero over @staticmethod and @classmethod keeps how they bind (class and instance)."""

    class K:
        @op(cache=True)
        @staticmethod
        def s(x: int) -> int:
            return x

        @op(retries=1)
        @classmethod
        def c(cls, x: int) -> tuple[str, int]:
            return cls.__name__, x

    assert K.s(1) == 1
    assert K().s(2) == 2
    assert K.c(3) == ("K", 3)
    assert K().c(4) == ("K", 4)


def test_exceptions_module_is_an_alias_of_errors() -> None:
    """opero.exceptions (2.x name) gives the very classes of opero.errors."""
    import opero.errors
    import opero.exceptions

    for name in opero.errors.__all__:
        assert getattr(opero.exceptions, name) is getattr(opero.errors, name)
    from opero.exceptions import OperoError

    assert OperoError is opero.OperoError


def test_error_with_foreign_notes_still_propagates() -> None:
    """An error whose __notes__ is not a list still propagates itself, with its earlier errors."""

    class Odd(Exception):
        """An error carrying a tuple as __notes__ (add_note refuses it)."""

    def body() -> None:
        error = Odd("odd")
        error.__notes__ = ("not a list",)  # type: ignore[assignment]
        raise error

    func = op(retries=1)(body)
    with pytest.raises(Odd) as info:
        func()
    assert info.value.__notes__ == ("not a list",)
    assert len(attempt_errors(info.value)) == 2


def test_not_retryable_error_propagates_without_note() -> None:
    """An error outside retry_on propagates at once, unchanged: no note, no earlier errors."""
    calls: list[str] = []

    @op(retries=3, retry_on=ConnectionError)
    def body() -> None:
        calls.append("x")
        raise KeyError("k")

    with pytest.raises(KeyError) as info:
        body()
    assert calls == ["x"]
    assert not hasattr(info.value, "__notes__")
    assert attempt_errors(info.value) == [info.value]
