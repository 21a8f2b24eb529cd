"""Hostile pass on the @opero call pipeline after the restructure (issue 9, third pass)."""

from __future__ import annotations

import asyncio
import functools
import gc
import linecache
import logging
import traceback
import types
from collections.abc import Iterator
from typing import Any

import pytest

import opero
from faultkit import run_scenario
from opero import opero as op
from opero.errors import attempt_errors

CALLS = 200


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


async def afails(x: int, endpoint: tuple[str, ...] = ("a", "b")) -> None:
    """Raise ValueError(x) asynchronously, always."""
    raise ValueError(x)


async def aleft_for_collector(call: Any) -> int:
    """Await ``call(i)`` CALLS times, collector off, dropping errors; return collect()."""
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


ASYNC_CACHED = {
    "memory": {"retries": 2, "cache": True},
    "memory+key": {"retries": 2, "cache": True, "cache_key": lambda f, x: ("k", x)},
    "memory+fallback": {"retries": 1, "cache": True, "arg_fallback": "endpoint"},
    "disk": {"retries": 1, "cache": True, "cache_backend": "disk"},
}


@pytest.mark.parametrize("config", sorted(ASYNC_CACHED))
def test_async_cached_exhaustion_leaves_no_cycle(config: str, tmp_path: Any) -> None:
    """A failed async call through the cache's task flight is freed by refcounting."""
    options = dict(ASYNC_CACHED[config])
    if options.get("cache_backend") == "disk":
        options["cache_dir"] = str(tmp_path)
    func = op(**options)(afails)

    async def main() -> tuple[int, int]:
        with pytest.raises(Exception):  # noqa: B017 (warm-up)
            await func(-1)
        return await aleft_for_collector(afails), await aleft_for_collector(func)

    # The control must find nothing: garbage that another thread of the test run
    # (a pool, a previous test's executor) makes while the collector is off would be
    # counted too, so the measurement is repeated until the control is clean.
    runs = [asyncio.run(main())]
    while runs[-1][0] != 0 and len(runs) < 4:
        runs.append(asyncio.run(main()))
    baseline, leaked = runs[-1]
    assert baseline == 0, runs
    assert leaked == 0, runs


def fails(x: int) -> None:
    """Raise ValueError(x), always."""
    raise ValueError(x)


def test_sync_flight_exhaustion_leaves_no_cycle(tmp_path: Any) -> None:
    """A failed sync call through the thread flight (disk cache) is freed by refcounting."""
    func = op(retries=1, cache=True, cache_backend="disk", cache_dir=str(tmp_path))(fails)
    with pytest.raises(ValueError):
        func(-1)
    gc.collect()
    gc.disable()
    try:
        for i in range(CALLS // 4):
            with pytest.raises(ValueError):
                func(i)
        leaked = gc.collect()
    finally:
        gc.enable()
    assert leaked == 0


def test_async_cached_waiters_leave_no_cycle() -> None:
    """Tasks that wait on a failing flight get its error and leave no cycle behind."""
    gate: list[asyncio.Event] = []

    @op(retries=0, cache=True)
    async def slow_fail(x: int) -> None:
        await gate[0].wait()
        raise ValueError(x)

    async def round_(i: int) -> list[BaseException | None]:
        gate[:] = [asyncio.Event()]
        tasks = [asyncio.ensure_future(slow_fail(i)) for _ in range(3)]
        await asyncio.sleep(0)
        gate[0].set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    async def main() -> tuple[list[BaseException | None], int]:
        first = await round_(-1)
        gc.collect()
        gc.disable()
        try:
            for i in range(50):
                await round_(i)
            return first, gc.collect()
        finally:
            gc.enable()

    first, leaked = asyncio.run(main())
    assert [type(e) for e in first] == [ValueError] * 3
    assert first[0] is first[1] is first[2]
    assert leaked == 0


class AsyncCallable:
    """A callable object whose ``__call__`` is ``async def`` and fails twice."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, x: int) -> int:
        """Fail on the first two calls, then return ``x``."""
        self.calls += 1
        if self.calls < 3:
            raise ConnectionError(self.calls)
        return x


def test_async_callable_object_is_retried() -> None:
    """An object with an ``async def __call__`` is decorated as async: its errors are retried."""
    target = AsyncCallable()
    func = op(retries=3)(target)
    assert func.__opero__.is_async

    assert asyncio.run(func(7)) == 7
    assert target.calls == 3


def test_partial_of_async_callable_object_is_retried() -> None:
    """A ``functools.partial`` over an async callable object is async too."""
    target = AsyncCallable()
    func = op(retries=3)(functools.partial(target, 5))
    assert func.__opero__.is_async
    assert asyncio.run(func()) == 5
    assert target.calls == 3


def test_async_callable_object_exhaustion_is_annotated() -> None:
    """An async callable object failing every call raises its own last error, annotated."""

    class Down:
        async def __call__(self) -> None:
            raise ConnectionError("down")

    func = op(retries=2)(Down())
    with pytest.raises(ConnectionError) as info:
        asyncio.run(func())
    assert len(attempt_errors(info.value)) == 3


def test_opmap_async_mode_awaits_async_callable_object() -> None:
    """``@opmap(mode="async")`` over an async callable object returns results, not coroutines."""

    class Double:
        async def __call__(self, x: int) -> int:
            return x * 2

    assert opero.opmap(mode="async", workers=2)(Double())([1, 2, 3]) == [2, 4, 6]


def test_opmap_thread_mode_refuses_async_callable_object() -> None:
    """``@opmap(mode="thread")`` refuses an async callable object at decoration, naming mode."""

    class Double:
        async def __call__(self, x: int) -> int:
            return x * 2

    with pytest.raises(opero.ConfigurationError, match="mode='async'"):
        opero.opmap(mode="thread")(Double())


class UnprintableError(Exception):
    """An error whose ``repr`` and ``str`` raise."""

    def __repr__(self) -> str:
        raise RuntimeError("repr failed")

    def __str__(self) -> str:
        raise RuntimeError("str failed")


class HugeReprError(Exception):
    """An error whose ``repr`` is ten megabytes long."""

    def __repr__(self) -> str:
        return "x" * 10_000_000


@pytest.mark.parametrize("error", [UnprintableError, HugeReprError])
@pytest.mark.parametrize("is_async", [False, True])
def test_exhausted_fallback_with_hostile_repr_raises_all_failed(
    error: type, is_async: bool
) -> None:
    """An exhausted fallback chain raises AllFailedError, its message short, whatever the repr."""
    if is_async:

        async def abody(endpoint: tuple[str, ...] = ("a", "b")) -> None:
            raise error()

        func: Any = op(retries=1, arg_fallback="endpoint")(abody)
    else:

        def body(endpoint: tuple[str, ...] = ("a", "b")) -> None:
            raise error()

        func = op(retries=1, arg_fallback="endpoint")(body)

    async def caught() -> BaseException | None:
        # Caught inside the task: asyncio itself reprs a task's outcome in some paths.
        try:
            await func()
        except BaseException as exc:  # asserted below
            return exc
        return None

    if is_async:
        raised = asyncio.run(caught())
    else:
        with pytest.raises(opero.AllFailedError) as info:
            func()
        raised = info.value
    assert isinstance(raised, opero.AllFailedError)
    assert [type(e) for e in raised.errors] == [error] * 4
    assert raised.__cause__ is raised.errors[-1]
    assert len(raised.message) < 400


def _wrapper_entries() -> set[str]:
    """Return the linecache file names of generated wrappers."""
    return {k for k in list(linecache.cache) if str(k).startswith("<opero wrapper of")}


def test_linecache_does_not_grow_with_dropped_distinct_wrappers() -> None:
    """Decorating ever new functions and dropping them keeps linecache bounded (KEEP_DEAD)."""
    from opero._pipeline.codegen import KEEP_DEAD

    def make(i: int) -> Any:
        def body(x: int) -> int:
            return x + i

        body.__qualname__ = f"tenant_{i}.body"
        return body

    for i in range(3 * KEEP_DEAD):
        assert op(retries=1)(make(i))(1) == 1 + i
    gc.collect()  # a decorated function is in a cycle with its __opero__ internals
    op(retries=1)(make(-1))  # a registration accounts for the wrappers gone since
    names = [k for k in _wrapper_entries() if ".tenant_" in k]
    assert len(names) <= KEEP_DEAD + 1
    assert any("tenant_-1.body" in k for k in names)


def test_live_wrapper_keeps_its_linecache_entry() -> None:
    """A wrapper still in use keeps its source in linecache however many others came and went."""
    from opero._pipeline.codegen import KEEP_DEAD

    def keeper(x: int) -> int:
        raise ValueError(x)

    kept = op(retries=0, on_failure=lambda exc: None)(keeper)
    for i in range(2 * KEEP_DEAD):

        def other(x: int) -> int:
            return x

        other.__qualname__ = f"churn_{i}"
        op(retries=1)(other)
    gc.collect()
    op(retries=1)(keeper)  # accounts for the dropped ones
    with pytest.raises(ValueError) as info:
        kept(1)
    text = "".join(traceback.format_exception(info.value))
    assert "return __opero_retry_from(" in text


class SignatureRaises:
    """A callable whose ``__signature__`` raises when inspected (and whose repr raises)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @property
    def __signature__(self) -> Any:
        raise RuntimeError("signature failed")

    def __repr__(self) -> str:
        raise RuntimeError("repr failed")

    def __call__(self, *args: Any) -> bool:
        """Record the call and ask for a retry."""
        self.seen.append(args)
        return True


@pytest.mark.parametrize("option", ["on_retry", "retry_predicate", "on_failure"])
def test_callback_whose_signature_raises_is_still_called(option: str) -> None:
    """A callback that cannot be inspected is accepted at decoration and called with its args."""
    callback = SignatureRaises()
    calls: list[int] = []

    @op(retries=1, **{option: callback})
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 2:
            raise ConnectionError(x)
        return x

    assert flaky(4) == 4
    assert calls == [4, 4]
    if option == "on_failure":
        assert callback.seen == []
    else:
        assert [type(args[0]) for args in callback.seen] == [ConnectionError]


def test_rate_limit_callable_whose_signature_raises_is_read() -> None:
    """A rate_limit callable that cannot be inspected is accepted and read on calls."""

    class Rate(SignatureRaises):
        def __call__(self, *args: Any) -> float:  # type: ignore[override]
            self.seen.append(args)
            return 1e6

    rate = Rate()
    func = op(rate_limit=rate, retries=0)(lambda x: x)
    assert func(3) == 3
    assert rate.seen


def test_arg_fallback_on_uninspectable_callable_is_a_configuration_error() -> None:
    """arg_fallback over a callable whose signature raises is a ConfigurationError naming it."""
    with pytest.raises(opero.ConfigurationError, match=r"arg_fallback='x'.*cannot be read"):
        op(arg_fallback="x")(SignatureRaises())


def test_short_callback_with_failing_repr_is_a_configuration_error() -> None:
    """A callback taking too few arguments is refused with a ConfigurationError, even unreprable."""

    class NoArgs:
        def __repr__(self) -> str:
            raise RuntimeError("repr failed")

        def __call__(self) -> bool:
            return True

    with pytest.raises(opero.ConfigurationError, match="retry_predicate"):
        op(retry_predicate=NoArgs())


def _gen(n: int) -> Iterator[int]:
    yield from range(n)


async def _agen(n: int) -> Any:
    for i in range(n):
        yield i


class _GenCall:
    def __call__(self, n: int) -> Iterator[int]:
        yield from range(n)


@pytest.mark.parametrize(
    "target",
    [_gen, _agen, functools.partial(_gen, 2), _GenCall()],
    ids=["generator", "async generator", "partial", "callable object"],
)
@pytest.mark.parametrize("options", [{}, {"cache": True}, {"retries": 0, "rate_limit": 10.0}])
def test_generator_function_is_refused_at_decoration(target: Any, options: dict[str, Any]) -> None:
    """A generator function is a ConfigurationError at decoration (a cache replays it empty)."""
    with pytest.raises(opero.ConfigurationError, match="generator function"):
        op(**options)(target)


def test_function_returning_a_list_is_cached_whole() -> None:
    """The documented fix, a function returning the items, is cached and replayed in full."""

    @op(cache=True)
    def items(n: int) -> list[int]:
        return list(_gen(n))

    assert items(3) == [0, 1, 2]
    assert items(3) == [0, 1, 2]


def _backoff_fails_after_first(attempt: int) -> float:
    """Return 0 for the first retry; raise for the later ones."""
    if attempt >= 1:
        raise ZeroDivisionError(f"backoff {attempt}")
    return 0.0


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("fallback", [False, True])
def test_failing_backoff_function_chains_to_the_call_it_followed(
    is_async: bool, fallback: bool
) -> None:
    """A backoff_function that raises propagates chained to the error of the call before it."""
    opero.set_testing(False)  # backoff_function is only asked outside testing mode
    calls: list[int] = []
    options: dict[str, Any] = {"retries": 3, "backoff_function": _backoff_fails_after_first}
    if fallback:
        options["arg_fallback"] = "endpoint"

    def body(endpoint: tuple[str, ...] = ("a",)) -> None:
        calls.append(len(calls))
        raise KeyError(f"call {len(calls)}")

    async def abody(endpoint: tuple[str, ...] = ("a",)) -> None:
        body(endpoint)

    func: Any = op(**options)(abody if is_async else body)

    async def caught() -> BaseException | None:
        try:
            await func()
        except BaseException as exc:  # asserted below
            return exc
        return None

    if is_async:
        raised = asyncio.run(caught())
    else:
        with pytest.raises(ZeroDivisionError) as info:
            func()
        raised = info.value
    assert isinstance(raised, ZeroDivisionError)
    assert len(calls) == 2
    assert isinstance(raised.__context__, KeyError)
    assert raised.__context__.args == ("call 2",)


class DictRaises(Exception):
    """An error whose ``__dict__`` is a property that raises."""

    @property  # type: ignore[override]
    def __dict__(self) -> Any:  # type: ignore[override]
        raise RuntimeError("no __dict__")


def test_exhausted_error_with_raising_dict_still_propagates() -> None:
    """An exhausted error whose __dict__ raises propagates itself, not the RuntimeError."""
    error = DictRaises("down")
    calls: list[int] = []

    @op(retries=2)
    def down() -> None:
        calls.append(1)
        raise error

    with pytest.raises(DictRaises) as info:
        down()
    assert info.value is error
    assert len(calls) == 3
    assert attempt_errors(info.value) == [error]


class HostileStr(str):
    """A str whose comparison, hash and length raise."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__")

    def __hash__(self) -> int:
        raise RuntimeError("__hash__")

    def __len__(self) -> int:
        raise RuntimeError("__len__")


class HostileFloat(float):
    """A float whose conversion and comparison raise."""

    def __float__(self) -> float:
        raise RuntimeError("__float__")

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("__lt__")


class HostileInt(int):
    """An int whose conversion and comparison raise."""

    def __index__(self) -> int:
        raise RuntimeError("__index__")

    def __int__(self) -> int:
        raise RuntimeError("__int__")

    def __gt__(self, other: object) -> bool:
        raise RuntimeError("__gt__")


@pytest.mark.parametrize(
    ("options", "field", "expected"),
    [
        ({"retries": HostileInt(2)}, "retries", 2),
        ({"min_delay": HostileFloat(0.5)}, "min_delay", 0.5),
        ({"rate_limit": HostileFloat(50.0)}, "rate_limit", 50.0),
        ({"cache": True, "cache_policy": HostileStr("lru")}, "cache_policy", "lru"),
        ({"cache": True, "cache_namespace": HostileStr("ns")}, "cache_namespace", "ns"),
        ({"arg_fallback": HostileStr("x")}, "arg_fallback", "x"),
    ],
)
def test_hostile_subclass_option_is_read_as_its_plain_value(
    options: dict[str, Any], field: str, expected: Any
) -> None:
    """An option given as a hostile int/float/str subclass is kept as its plain value."""
    func = op(**options)(lambda x=[1]: x)
    value = getattr(func.__opero__.policy, field)
    assert value == expected
    assert type(value) is type(expected)
    assert func([5]) == [5]


class Unreprable:
    """A value whose repr raises."""

    def __repr__(self) -> str:
        raise RuntimeError("repr failed")


@pytest.mark.parametrize(
    "options",
    [
        {"cache_dir": Unreprable()},
        {"cache_redis_url": Unreprable()},
        {"rate_limit_redis_url": Unreprable()},
        {"cache": True, "cache_serializer": Unreprable()},
        {"cache": True, "cache_secret": Unreprable()},
        {"rate_burst": 10**5000},
        {"min_delay": HostileFloat(50.0), "max_delay": 1.0},
    ],
)
def test_option_rule_message_survives_unreprable_value(options: dict[str, Any]) -> None:
    """A rule refusing an unreprable or huge value raises ConfigurationError, not its repr error."""
    with pytest.raises(opero.ConfigurationError):
        op(**options)


def test_fork_while_the_linecache_registry_is_locked_does_not_hang() -> None:
    """A child forked while a parent thread holds the wrapper-source lock can still decorate."""
    out = run_scenario(
        """
import os, threading, time
from opero import opero
from opero._pipeline import codegen

codegen._lock.acquire()  # as if a parent thread were registering a wrapper at the fork
pid = os.fork()
if pid == 0:
    def body(x):
        return x + 1
    ok = opero(retries=1)(body)(1) == 2
    os._exit(0 if ok else 3)
codegen._lock.release()
end = time.monotonic() + 20
while time.monotonic() < end:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.01)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child hung")
""",
        timeout=60,
    )
    assert out.lines() == ["child exit 0"], out


@pytest.mark.parametrize("options", ["cache=True", "retries=3", "retries=2, arg_fallback='hosts'"])
def test_recursion_error_in_recursive_function_is_not_retried(options: str) -> None:
    """A decorated recursive function past the recursion limit raises RecursionError at once."""
    out = run_scenario(
        f"""
import logging, sys
import opero
from opero import opero as op

logging.disable(logging.CRITICAL)
opero.set_testing(True)
sys.setrecursionlimit(400)
calls = [0]

@op({options})
def depth(n, hosts=("a", "b")):
    calls[0] += 1
    return 0 if n == 0 else 1 + depth(n - 1)

assert depth(10) == 10
calls[0] = 0
try:
    depth(10_000)
except RecursionError:
    print("RecursionError after", "few" if calls[0] < 1000 else calls[0], "calls")
""",
        timeout=60,
    )
    assert out.lines() == ["RecursionError after few calls"], out


def test_parameter_name_folded_by_the_parser_is_forwarded_as_is() -> None:
    """A keyword-only parameter whose name is not NFKC-normal still reaches the function."""

    def template(*, fi: int = 1) -> int:
        return fi

    name = "\ufb01"  # the "fi" ligature: the parser reads it as "fi" in source
    code = template.__code__.replace(co_varnames=(name,))
    func = types.FunctionType(code, globals(), "ligature", None, None)
    func.__kwdefaults__ = {name: 1}
    assert func(**{name: 5}) == 5
    assert op(retries=1)(func)(**{name: 5}) == 5
    assert op(retries=1)(func)() == 1


def test_kept_traceback_keeps_its_wrapper_lines_after_churn() -> None:
    """A traceback kept after its wrapper was dropped still shows the wrapper's line later."""
    from opero._pipeline.codegen import KEEP_DEAD

    def dropped(x: int) -> int:
        raise ValueError(x)

    try:
        op(retries=0, on_failure=lambda exc: None)(dropped)(1)
    except ValueError as exc:
        kept = exc
    for i in range(2 * KEEP_DEAD):

        def other(x: int) -> int:
            return x

        other.__qualname__ = f"churn_kept_{i}"
        op(retries=1)(other)
        if i % 64 == 0:
            gc.collect()
    gc.collect()
    op(retries=2)(other)  # a new entry: trims the dead ones
    text = "".join(traceback.format_exception(kept))
    assert "return __opero_retry_from(" in text
