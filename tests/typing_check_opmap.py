"""Type-checking fixture for @opmap (checked by mypy and basedpyright in test_opero_typing.py).

Never run. Every line must type-check; the one misuse (a wrong item type)
carries expected ignores (mypy ``list-item``, pyright ``reportArgumentType``) that mypy (with
``warn_unused_ignores``) would flag as unused if the item type were lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import assert_type

from opero import MappedFunction, opmap


@opmap(mode="thread", retries=0)
def double(x: int) -> str:
    """Plain function: MappedFunction[int, str]."""
    return str(x * 2)


@opmap(mode="async", retries=0)
async def fetch(url: str) -> bytes:
    """Async function: the results are what it returns once awaited."""
    return url.encode()


@opmap(mode="thread")
def scaled(x: int, *, scale: int = 1) -> int:
    """Shared keyword arguments keep the item type."""
    return x * scale


async def use() -> list[bytes | Exception]:
    """Awaiting amap gives the results of the awaited function."""
    return await fetch.amap(["a"])


assert_type(double, MappedFunction[int, str])
assert_type(fetch, MappedFunction[str, bytes])
assert_type(double([1, 2]), list[str | Exception])
assert_type(scaled(range(3), scale=2), list[int | Exception])
assert_type(double.imap(iter([1])), Iterator[str | Exception])
assert_type(fetch.aimap(["u"]), AsyncIterator[bytes | Exception])
assert_type(double.failed(double([1])), list[tuple[int, int, Exception]])


double(["not an int"])  # type: ignore[list-item]  # pyright: ignore[reportArgumentType]
