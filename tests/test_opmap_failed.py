"""Failures you can act on: MapError and the warning name the first index; f.failed() lists."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator

import pytest

import opmap_helpers as h
from opero import MapError, OpmapFailureWarning
from test_opmap_imap import SYNC_MODES, build


@pytest.mark.parametrize("mode", [*SYNC_MODES, "async"])
def test_warning_names_first_index_exception_and_count(mode: str) -> None:
    """The warning says how many failed, the first index and its exception type and message."""
    f = build(mode, h.fail_on_3_and_7) if mode != "async" else build("thread", h.fail_on_3_and_7)
    with pytest.warns(OpmapFailureWarning) as record:
        f(range(10))
    message = str(record[0].message)
    assert "2 of 10 items failed; the first at index 3: ValueError: bad item 3" in message
    assert "failed(results)" in message


def test_map_error_names_first_index_and_keeps_results() -> None:
    """strict=True raises MapError naming the first failure; its results remember the items."""
    f = build("process", h.fail_on_3_and_7, strict=True)
    with pytest.raises(MapError) as info:
        f(x for x in range(10))
    error = info.value
    assert str(error).startswith(
        "opmap fail_on_3_and_7: 2 of 10 items failed; the first at index 3"
    )
    assert error.indices == [3, 7]
    assert [(i, x, str(e)) for i, x, e in f.failed(error.results)] == [
        (3, 3, "bad item 3"),
        (7, 7, "bad item 7"),
    ]


def test_failed_from_a_generator_and_rerun_in_one_line() -> None:
    """failed() needs no items for a call's results, even from a generator; rerun is one line."""
    f = build("thread", h.fail_on_3_and_7)

    def items() -> Iterator[int]:
        yield from range(10)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        results = f(items())
    failed = f.failed(results)
    assert [(i, x, type(e)) for i, x, e in failed] == [(3, 3, ValueError), (7, 7, ValueError)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        rerun = f([item for _, item, _ in failed])
    assert all(isinstance(r, ValueError) for r in rerun)


def test_failed_with_unordered_results_gives_input_indices() -> None:
    """With ordered=False, failed() still reports each failure's input index and item."""
    f = build("thread", h.fail_on_3_and_7, ordered=False, chunksize=1)
    with pytest.warns(OpmapFailureWarning, match="the first at index 3"):
        results = f([10, 11, 12, 3, 13, 14, 15, 7])
    assert [(i, x) for i, x, _ in f.failed(results)] == [(3, 3), (7, 7)]


def test_failed_with_explicit_items_for_any_list() -> None:
    """A list that does not remember its items (a collected stream) takes them as an argument."""
    f = build("thread", h.fail_on_3_and_7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        streamed = list(f.imap(range(10)))
    with pytest.raises(TypeError, match=r"failed\(results, items\)"):
        f.failed(streamed)
    assert [i for i, _, _ in f.failed(streamed, range(10))] == [3, 7]
    with pytest.raises(TypeError, match="10 results for 3 items"):
        f.failed(streamed, [1, 2, 3])


def test_results_stay_a_list_and_pickle() -> None:
    """The results compare and pickle as a list, and still name their failures once unpickled."""
    f = build("thread", h.fail_on_3_and_7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        results = f(range(5))
    assert isinstance(results, list)
    assert results[:3] == [0, 2, 4]
    back = pickle.loads(pickle.dumps(results))
    assert [i for i, _, _ in f.failed(back)] == [3]


def test_hostile_str_does_not_hide_the_report() -> None:
    """An exception whose __str__ raises still gives a warning naming its type and index."""

    class Hostile(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    def boom(x: int) -> int:
        if x == 2:
            raise Hostile
        return x

    f = build("thread", boom)
    with pytest.warns(OpmapFailureWarning, match=r"index 2: Hostile: <str\(\) failed>"):
        f(range(4))


def test_long_messages_are_cut_short() -> None:
    """A huge exception message is cut in the summary line (the exception itself keeps it)."""

    def boom(x: int) -> int:
        raise ValueError("x" * 10_000)

    f = build("thread", boom)
    with pytest.warns(OpmapFailureWarning) as record:
        results = f([1])
    assert len(str(record[0].message)) < 400
    assert len(str(results[0])) == 10_000
