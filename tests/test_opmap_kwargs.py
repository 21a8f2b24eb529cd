"""Shared keyword arguments: f(items, scale=2) calls func(item, scale=2) in every mode."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

import opmap_helpers as h
from opero import opmap
from test_opmap_imap import ASYNC_MODES, SYNC_MODES, build


@pytest.mark.parametrize("mode", SYNC_MODES + ASYNC_MODES)
def test_call_amap_imap_aimap_pass_shared_keywords(mode: str) -> None:
    """Every way of calling a map hands the same keywords to every item."""
    f = build(mode)
    expected = [3 * i + 1 for i in range(20)]
    assert f(range(20), scale=3, offset=1) == expected
    assert list(f.imap(range(20), scale=3, offset=1)) == expected

    async def main() -> tuple[list[Any], list[Any]]:
        listed = await f.amap(range(20), scale=3, offset=1)
        streamed = [r async for r in f.aimap(range(20), scale=3, offset=1)]
        return listed, streamed

    assert asyncio.run(main()) == (expected, expected)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_shared_keywords_are_part_of_the_cache_key(mode: str, tmp_path: Any) -> None:
    """f([x], scale=2) and f([x], scale=3) do not share a cache entry; a repeat is a hit."""
    log = str(tmp_path / "calls")
    f = build(mode, h.logged_scaled, cache=True)
    items = [(log, 5)]
    assert f(items, scale=2) == [10]
    assert f(items, scale=3) == [15]
    assert f(items, scale=2) == [10]
    assert list(f.imap(items, scale=3)) == [15]
    assert h.count_lines(log) == 2
    assert f.item_function.cache_info().hits == 2


class CountsPickles:
    """A keyword value that counts how many times the parent pickles it."""

    pickled = 0

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        CountsPickles.pickled += 1
        return (int, (self.value,))


def test_process_keywords_are_pickled_once_per_map_not_per_item() -> None:
    """A shared keyword travels to process workers once per map, not with every item."""
    f = opmap(mode="process", workers=2, retries=0, progress=False, chunksize=10)(h.scaled)
    CountsPickles.pickled = 0
    assert f(range(100), scale=CountsPickles(2)) == [2 * i for i in range(100)]
    assert CountsPickles.pickled == 1
    CountsPickles.pickled = 0
    assert list(f.imap(range(100), scale=CountsPickles(2))) == [2 * i for i in range(100)]
    assert CountsPickles.pickled == 1


def test_positional_extras_are_refused_with_the_fix() -> None:
    """A positional extra argument is a TypeError that says to pass it by keyword."""
    f = build("thread")
    with pytest.raises(TypeError, match=r"keyword only.*scale=2"):
        f(range(3), 2)  # type: ignore[arg-type]

    async def main() -> None:
        await f.amap(range(3), 2)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="positional extras are not supported"):
        asyncio.run(main())


def test_unknown_keyword_fails_the_call_not_every_item() -> None:
    """A keyword the function does not take is one TypeError at the call, naming it."""
    f = build("process")
    with pytest.raises(TypeError, match="bogus"):
        f(range(3), bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        f.imap(range(3), bogus=1)


def test_ordered_is_imap_s_own_keyword() -> None:
    """The ordered= of imap is its own: it orders the stream and never reaches the function."""

    def takes_ordered(x: int, ordered: str = "no") -> str:
        return f"{x}{ordered}"

    f = build("thread", takes_ordered)
    assert f([1], ordered="yes") == ["1yes"]  # the list call passes it through
    assert sorted(f.imap([1, 2], ordered=False)) == ["1no", "2no"]


def test_keywords_pickle_with_the_worker_target() -> None:
    """The worker target carries the keywords, so a process worker rebuilds the partial call."""
    from opero._map.decorator import _WorkerTarget

    f = build("thread")
    target = pickle.loads(pickle.dumps(_WorkerTarget(f, None, kwargs={"scale": 4})))
    assert target.kwargs == {"scale": 4}
    assert target.resolve()(3) == 12
