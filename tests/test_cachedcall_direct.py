"""The native cached call makes the first call itself (``on_error``) and counts coalesced waits.

With retries as the only layer under a memory cache, ``@opero`` hands the
native ``CachedCall`` the function and the retry loop: a miss calls the
function with no Python frame of opero around it, and only a failure enters
the loop. These tests pin that the outcome is the one the first-call wrapper
gave (retries, exhaustion, wrong arguments, chaining), and the ``coalesced``
counter of waiters.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

from faultkit import run_scenario
from opero import attempt_errors
from opero import opero as op
from opero._opero_core import CachedCall, Store


def _caller_name() -> str:
    """Return the name of the code that called the caller of this function."""
    return sys._getframe(2).f_code.co_name


def test_a_miss_calls_the_function_with_no_opero_frame() -> None:
    """A cached miss under retries calls the function straight from the native call."""
    callers: list[str] = []

    @op(cache=True, retries=2)
    def f(x: int) -> int:
        callers.append(_caller_name())
        return x + 1

    @op(cache=True, retries=2)
    def g(*args: Any, **kwargs: Any) -> int:  # not generated: the generic wrapper's path
        callers.append(_caller_name())
        return len(args)

    assert (f(1), f(1), g(1, 2), g(1, 2)) == (2, 2, 2, 2)
    name = test_a_miss_calls_the_function_with_no_opero_frame.__name__
    assert callers == [name, name]


def test_a_layer_other_than_retries_keeps_its_wrapper() -> None:
    """With a rate limit under the cache, the miss still goes through opero's wrapper."""
    callers: list[str] = []

    @op(cache=True, retries=2, rate_limit=1e9)
    def f(x: int) -> int:
        callers.append(_caller_name())
        return x

    assert f(3) == 3
    assert callers
    assert callers[0] != test_a_layer_other_than_retries_keeps_its_wrapper.__name__


def test_a_failed_first_call_enters_the_retry_loop_and_its_success_is_cached() -> None:
    """A miss whose first call fails is retried (on_retry, backoff) and the success is stored."""
    calls: list[int] = []
    retried: list[tuple[BaseException, int]] = []
    waits: list[float] = []
    first = ValueError("flaky")

    @op(
        cache=True,
        retries=2,
        jitter=False,
        min_delay=0.5,
        on_retry=lambda e, a: retried.append((e, a)),
        _sleep=waits.append,
    )
    def f(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise first
        return x * 10

    assert f(4) == 40
    assert f(4) == 40
    assert calls == [4, 4]
    assert retried == [(first, 0)]
    assert waits == [0.5]


def _always_fails(errors: list[Exception]) -> Any:
    def f(x: int, *, tag: str = "t") -> int:
        errors.append(KeyError(f"{x}-{tag}-{len(errors)}"))
        raise errors[-1]

    return f


def _exhaust(func: Any) -> tuple[BaseException, list[Exception]]:
    with pytest.raises(KeyError) as info:
        func(7, tag="k")
    return info.value, attempt_errors(info.value)  # type: ignore[return-value]


def test_exhausted_retries_raise_as_the_uncached_function_does() -> None:
    """Exhausted retries raise the last error with the same notes, errors and chaining."""
    cached_errors: list[Exception] = []
    plain_errors: list[Exception] = []
    cached = op(cache=True, retries=2, _sleep=lambda s: None)(_always_fails(cached_errors))
    plain = op(cache=False, retries=2, _sleep=lambda s: None)(_always_fails(plain_errors))
    c_exc, c_all = _exhaust(cached)
    p_exc, p_all = _exhaust(plain)
    assert c_exc is cached_errors[-1]
    assert p_exc is plain_errors[-1]
    assert c_all == cached_errors
    assert p_all == plain_errors
    assert len(c_all) == 3

    def chain(errors: list[Exception]) -> list[int | None]:
        return [errors.index(e.__context__) if e.__context__ in errors else None for e in errors]

    assert chain(c_all) == chain(p_all)
    assert c_exc.__notes__ == p_exc.__notes__
    assert cached.cache_info().currsize == 0


def test_wrong_arguments_raise_at_once_without_retries() -> None:
    """A call that does not bind raises its TypeError unchanged: no call, no retry, no note."""
    calls: list[int] = []
    retried: list[BaseException] = []

    @op(cache=True, retries=3, on_retry=retried.append)
    def needs_two(a: int, b: int) -> int:
        calls.append(a)
        return a + b

    with pytest.raises(TypeError, match=r"needs_two\(\) missing 1 required positional") as info:
        needs_two(1)  # type: ignore[call-arg]
    assert calls == []
    assert retried == []
    assert not getattr(info.value, "__notes__", None)
    assert needs_two(1, 2) == 3


def test_on_error_gets_the_arguments_as_the_exception_being_handled() -> None:
    """on_error receives (exc, args, kwargs) with exc as sys.exc_info(), through both call forms."""
    seen: list[tuple[Any, ...]] = []
    boom = RuntimeError("boom")

    def f(*args: Any, **kwargs: Any) -> int:
        raise boom

    def on_error(exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        seen.append((exc, args, dict(kwargs), sys.exc_info()[1]))
        kwargs["mutated"] = True
        return "recovered"

    cc = CachedCall(Store(8), f, on_error=on_error)
    kw = {"y": 2}
    assert cc(1, **kw) == "recovered"
    assert cc.__call__(5, z=3) == "recovered"  # the tp_call (tuple and dict) form
    assert kw == {"y": 2}
    assert seen == [(boom, (1,), {"y": 2}, boom), (boom, (5,), {"z": 3}, boom)]
    assert sys.exc_info() == (None, None, None)
    assert cc(1, y=2) == "recovered"
    assert len(seen) == 2


def test_handled_exception_is_restored_after_on_error() -> None:
    """Inside an except clause, the caller's handled exception is back after on_error ran."""

    def f(x: int) -> int:
        raise ValueError(x)

    def on_error(exc: Exception, args: Any, kwargs: Any) -> Any:
        raise LookupError("from on_error")

    cc = CachedCall(Store(8), f, on_error=on_error)
    outer = OSError("outer")
    try:
        raise outer
    except OSError:
        with pytest.raises(LookupError) as info:
            cc(1)
        assert sys.exc_info()[1] is outer
    assert isinstance(info.value.__context__, ValueError)


def test_base_exceptions_and_binding_errors_skip_on_error() -> None:
    """A KeyboardInterrupt, or a TypeError of arguments that do not bind, never reaches on_error."""
    handled: list[BaseException] = []

    def interrupted(x: int) -> int:
        raise KeyboardInterrupt

    def on_error(exc: Exception, args: Any, kwargs: Any) -> int:
        handled.append(exc)
        return 0

    with pytest.raises(KeyboardInterrupt):
        CachedCall(Store(8), interrupted, on_error=on_error)(1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        CachedCall(Store(8), interrupted, on_error=on_error)(1, nope=2)
    # A builtin's TypeError has no traceback either, but it is the function's own error.
    assert CachedCall(Store(8), len, on_error=on_error)(5) == 0
    assert [type(e) for e in handled] == [TypeError]


def test_on_error_must_be_callable() -> None:
    """A non-callable on_error is a TypeError naming it."""
    with pytest.raises(TypeError, match="on_error"):
        CachedCall(Store(8), len, on_error=3)  # type: ignore[arg-type]


def _misses(cc: CachedCall) -> int:
    return cc.store.info()[1]


def test_waiters_of_a_retried_computation_share_it_and_are_counted() -> None:
    """Threads missing a key whose owner retries get the retried result and count as coalesced."""
    n = 5
    release = threading.Event()
    calls: list[int] = []

    @op(cache=True, retries=1, _sleep=lambda s: None)
    def f(x: int) -> object:
        calls.append(x)
        if len(calls) == 1:
            release.wait(timeout=60)
            raise ConnectionError("first attempt")
        return object()

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(f(1))) for _ in range(n)]
    for t in threads:
        t.start()
    while _misses(f) < n:  # every thread has missed; the owner is blocked in f
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(timeout=60)
    assert calls == [1, 1]
    assert len(results) == n
    assert all(r is results[0] for r in results)
    assert f.coalesced == n - 1
    assert f(1) is results[0]
    assert f.coalesced == n - 1


def test_coalesced_counts_waiters_of_a_failure_and_nothing_else() -> None:
    """Waiters that get the owner's exception count; sequential misses and hits do not."""
    n = 4
    release = threading.Event()

    def f(x: int) -> int:
        if x == 0:
            release.wait(timeout=60)
            raise ArithmeticError("shared")
        return x

    cc = CachedCall(Store(8), f)
    assert (cc(1), cc(1), cc(2), cc.coalesced) == (1, 1, 2, 0)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            cc(0)
        except ArithmeticError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(n)]
    before = _misses(cc)
    for t in threads:
        t.start()
    while _misses(cc) < before + n:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == n
    assert all(e is errors[0] for e in errors)
    assert cc.coalesced == n - 1


def test_references_of_the_handled_exception_stay_balanced() -> None:
    """Many failures handed to on_error, with collections between, leave every traceback alive."""
    outcome = run_scenario(
        """
        import gc, sys, traceback
        from opero._opero_core import CachedCall, Store

        kept = []

        def f(x):
            raise KeyError(x)

        def on_error(exc, args, kwargs):
            kept.append(exc)
            raise ValueError(args[0]) from None

        cc = CachedCall(Store(8), f, on_error=on_error)
        for i in range(300):
            try:
                cc(i)
            except ValueError:
                pass
            if i % 25 == 0:
                gc.collect()
        gc.collect()
        tb = kept[-1].__traceback__
        lines = sum(len(traceback.format_tb(e.__traceback__)) for e in kept)
        print(len(kept), lines >= len(kept), sys.getrefcount(tb) >= 2)
        """,
        timeout=120,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.split() == ["300", "True", "True"]
