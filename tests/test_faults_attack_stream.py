"""Hostile pass on @opmap streaming (imap/aimap) and worker setup: each test is an attack.

Scenarios that can hang (forks, kills, signals, exit with a stream open) run in their
own interpreter with a deadline (tests/faultkit.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import opmap_helpers as h
from opero import opmap

STREAM_MODES = ["thread", "process", "async", "async_process"]


def build(mode: str, **options: Any) -> Any:
    """Return ``scaled`` (or its async twin) mapped in ``mode`` with 2 workers, no retries."""
    options.setdefault("retries", 0)
    options.setdefault("progress", False)
    func = h.a_scaled if mode.startswith("async") else h.scaled
    return opmap(mode=mode, workers=2, **options)(func)


def _broken(n: int, bad: int) -> Iterator[int]:
    """Yield ``0..n-1`` but raise at ``bad``."""
    for i in range(n):
        if i == bad:
            raise LookupError(f"source broke at {i}")
        yield i


async def _abroken(n: int, bad: int) -> AsyncIterator[int]:
    """Yield what :func:`_broken` yields, asynchronously."""
    for i in _broken(n, bad):
        yield i


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("bad", [0, 1, 5, 300])
def test_imap_source_error_comes_after_the_pulled_results(mode: str, bad: int) -> None:
    """When the items' generator raises, imap yields every pulled item's result, then raises."""
    f = build(mode)
    got: list[Any] = []
    stream = f.imap(_broken(1000, bad))
    with pytest.raises(LookupError, match=f"source broke at {bad}"):
        got.extend(stream)
    assert got == list(range(bad))


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("source", [_broken, _abroken])
def test_aimap_source_error_comes_after_the_pulled_results(mode: str, source: Any) -> None:
    """When aimap's (async) generator raises, every pulled item's result comes first."""
    f = build(mode)
    got: list[Any] = []

    async def main() -> None:
        async for r in f.aimap(source(1000, 57)):
            got.append(r)

    with pytest.raises(LookupError, match="source broke at 57"):
        asyncio.run(main())
    assert got == list(range(57))
