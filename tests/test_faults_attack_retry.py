"""Hostile use of retry_after, timeout, attempt_timeout, retry_on_result and set_testing.

Each test is an attack that once worked (or a documented limit, as a strict xfail).
"""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest

from opero import opero as op


def test_timed_first_call_chains_retry_errors_like_the_python_wrapper() -> None:
    """With timeout=, the native first call hands over the error as handled: later errors chain to it."""
    calls: list[int] = []

    @op(retries=1, timeout=10.0, min_delay=0.0)
    def timed() -> None:
        calls.append(1)
        raise ValueError(f"boom {len(calls)}")

    with pytest.raises(ValueError, match="boom 2") as info:
        timed()
    assert repr(info.value.__context__) == "ValueError('boom 1')"

    @op(retries=1, timeout=10.0, backoff_function=lambda attempt: -1)
    def bad_schedule() -> None:
        raise ValueError("first")

    with pytest.raises(ValueError, match="backoff_function") as bad:
        bad_schedule()
    assert repr(bad.value.__context__) == "ValueError('first')"


def test_timed_first_call_restores_the_handled_exception_without_leaks() -> None:
    """The native first call puts back the caller's handled exception and keeps no reference."""
    shared = ValueError("shared")
    count = [0]

    @op(retries=1, timeout=10.0, min_delay=0.0)
    def flaky() -> BaseException | None:
        count[0] += 1
        if count[0] % 2:
            raise shared
        return sys.exception()

    outer = KeyError("outer")
    gc.disable()
    try:
        before = sys.getrefcount(shared), sys.getrefcount(outer)
        for _ in range(2000):
            try:
                raise outer
            except KeyError:
                seen = flaky()
                assert sys.exception() is outer
            assert seen is shared
        assert sys.exception() is None
        seen = None
        shared.__traceback__ = shared.__context__ = outer.__traceback__ = None
        assert (sys.getrefcount(shared), sys.getrefcount(outer)) == before
    finally:
        gc.enable()


def test_attempt_timeout_error_is_retried_only_by_the_layer_that_cut_it() -> None:
    """An attempt_timeout TimeoutError leaving its layer follows the next layer's retry_on."""
    inner_calls: list[int] = []
    other_calls: list[int] = []

    @op(retries=1, attempt_timeout=0.01, min_delay=0.0)
    async def inner() -> None:
        inner_calls.append(1)
        await asyncio.Event().wait()

    @op(retries=2, retry_on=(ConnectionError,), min_delay=0.0)
    async def outer() -> None:
        await inner()

    with pytest.raises(TimeoutError, match="attempt_timeout") as info:
        asyncio.run(asyncio.wait_for(outer(), 60))
    assert len(inner_calls) == 2  # the inner layer's own retry; the outer one made none
    assert "__opero_attempt_timeout__" not in info.value.__dict__

    @op(retries=3, retry_on=(ValueError,), min_delay=0.0)
    async def reraises() -> None:
        other_calls.append(1)
        raise info.value

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(reraises(), 60))
    assert other_calls == [1]
