"""Argument fallbacks of @opero: values[i:] candidates, defaults, None, errors, async."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opero import AllFailedError
from opero import opero as op


def test_candidates_are_values_from_i_onwards() -> None:
    """Candidate i is called with the parameter bound to values[i:], same type."""
    seen: list[Any] = []

    @op(arg_fallback="endpoint", retries=0)
    def call(data: str, endpoint: Any = ("a", "b", "c")) -> str:
        seen.append(endpoint)
        if endpoint[0] != "c":
            raise ConnectionError(endpoint[0])
        return f"{data}@{endpoint[0]}"

    assert call("d") == "d@c"
    assert seen == [("a", "b", "c"), ("b", "c"), ("c",)]
    seen.clear()
    assert call("d", ["a", "c"]) == "d@c"
    assert seen == [["a", "c"], ["c"]]
    seen.clear()
    assert call("d", endpoint=["b", "c"]) == "d@c"
    assert seen == [["b", "c"], ["c"]]


def test_signature_default_is_used_when_caller_passes_nothing() -> None:
    """The parameter's default list drives the fallback when the caller omits it."""
    seen: list[list[str]] = []

    @op(arg_fallback="endpoint", retries=2)
    def primary(data: int, endpoint: list[str] = ["https://p", "https://b"]) -> str:  # noqa: B006
        seen.append(endpoint)
        if endpoint[0] == "https://p":
            raise ConnectionError
        return endpoint[0]

    assert primary(1) == "https://b"
    assert seen == [["https://p", "https://b"], ["https://b"]]


def test_non_list_value_means_one_call() -> None:
    """A value that is not a list or tuple (None) is one call with that value, unchanged."""
    seen: list[Any] = []

    @op(arg_fallback="endpoint", retries=0)
    def call(q: str, endpoint: Any = None) -> Any:
        seen.append(endpoint)
        return endpoint

    assert call("q") is None
    assert call("q", endpoint="single") == "single"
    assert seen == [None, "single"]


def test_none_value_failure_is_all_failed_since_fallback_configured() -> None:
    """With a fallback configured, even one failed call raises AllFailedError."""
    error = ValueError("x")

    @op(arg_fallback="endpoint", retries=0)
    def call(endpoint: Any = None) -> None:
        raise error

    with pytest.raises(AllFailedError) as info:
        call()
    assert info.value.errors == [error]
    assert info.value.__cause__ is error


def test_rounds_repeat_the_whole_chain_with_waits_between_rounds() -> None:
    """Each retry round tries every candidate again; waits only come between rounds."""
    seen: list[str] = []
    waits: list[float] = []

    @op(arg_fallback="ep", retries=2, jitter=False, _sleep=waits.append)
    def call(ep: list[str] = ["a", "b"]) -> None:  # noqa: B006
        seen.append(ep[0])
        raise ConnectionError(ep[0])

    with pytest.raises(AllFailedError) as info:
        call()
    assert seen == ["a", "b", "a", "b", "a", "b"]
    assert [str(e) for e in info.value.errors] == seen
    assert waits == pytest.approx([0.1, 0.15])


def test_non_retryable_error_stops_the_chain_unchanged() -> None:
    """An error outside retry_on propagates at once, even with candidates left."""
    error = KeyError("bad input")
    seen: list[str] = []

    @op(arg_fallback="ep", retry_on=ConnectionError)
    def call(ep: list[str] = ["a", "b", "c"]) -> None:  # noqa: B006
        seen.append(ep[0])
        if ep[0] == "a":
            raise ConnectionError
        raise error

    with pytest.raises(KeyError) as info:
        call()
    assert info.value is error
    assert seen == ["a", "b"]


def test_positional_only_and_keyword_only_parameters() -> None:
    """Fallback works for positional-only and keyword-only parameters."""

    @op(arg_fallback="ep", retries=0)
    def pos(ep: list[int], /, x: int = 0) -> int:
        if ep[0] < 2:
            raise ValueError
        return ep[0] + x

    @op(arg_fallback="ep", retries=0)
    def kw(x: int, *, ep: tuple[int, ...] = (0, 1, 5)) -> int:
        if ep[0] < 2:
            raise ValueError
        return ep[0] + x

    @op(arg_fallback="ep", retries=0)
    def pos_default(a: int = 1, ep: list[int] = [0, 7], /) -> int:  # noqa: B006
        if ep[0] < 2:
            raise ValueError
        return ep[0] + a

    assert pos([0, 1, 2], x=1) == 3
    assert kw(1) == 6
    assert kw(1, ep=(9,)) == 10
    assert pos_default() == 8
    assert pos_default(2) == 9


def test_method_fallback() -> None:
    """Fallback on a method counts self in the parameter position."""

    class Client:
        @op(arg_fallback="hosts", retries=0)
        def get(self, path: str, hosts: list[str] = ["h1", "h2"]) -> str:  # noqa: B006
            if hosts[0] == "h1":
                raise ConnectionError
            return f"{hosts[0]}{path}"

    assert Client().get("/x") == "h2/x"
    assert Client().get("/x", ["h1", "h3"]) == "h3/x"


def test_async_fallback() -> None:
    """Async functions get the same values[i:] fallback semantics."""
    seen: list[list[str]] = []

    @op(arg_fallback="ep", retries=1, _asleep=lambda s: asyncio.sleep(0))
    async def call(ep: list[str] = ["a", "b", "c"]) -> str:  # noqa: B006
        seen.append(ep)
        await asyncio.sleep(0)
        if ep[0] != "c":
            raise ConnectionError
        return ep[0]

    assert asyncio.run(call()) == "c"
    assert seen == [["a", "b", "c"], ["b", "c"], ["c"]]


def test_missing_required_argument_is_the_functions_type_error() -> None:
    """A call missing the fallback argument raises the function's own TypeError."""

    @op(arg_fallback="ep", retries=0, retry_on=ConnectionError)
    def call(ep: list[str]) -> str:
        return ep[0]

    with pytest.raises(TypeError, match="ep"):
        call()  # type: ignore[call-arg]


@given(values=st.lists(st.integers(), min_size=2, max_size=6), data=st.data())
@settings(max_examples=60, deadline=None)
def test_candidates_property(values: list[int], data: st.DataObject) -> None:
    """For any list and first working index k, calls see values[0:], ..., values[k:]."""
    k = data.draw(st.integers(0, len(values) - 1))
    seen: list[list[int]] = []

    @op(arg_fallback="ep", retries=0)
    def call(ep: list[int]) -> int:
        seen.append(ep)
        if len(seen) <= k:
            raise ConnectionError
        return ep[0]

    assert call(values) == values[k]
    assert seen == [values[i:] for i in range(k + 1)]
