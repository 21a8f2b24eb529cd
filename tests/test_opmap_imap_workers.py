"""Streaming maps (``imap``) with worker setup (``initializer``) and shared keyword arguments."""

from __future__ import annotations

import itertools

import pytest

import worker_helpers as wh
from opero import OpmapFailureWarning, WorkerStartError, opmap


def _lines(path: str) -> list[str]:
    with open(path) as fh:
        return fh.read().split()


def test_thread_imap_runs_the_initializer_in_each_thread(tmp_path) -> None:
    """In thread mode, ``imap`` runs the initializer once per thread before its items."""
    path = str(tmp_path / "threads")
    f = opmap(
        mode="thread", workers=2, progress=False, initializer=wh.init_thread, initargs=(path, "m")
    )(wh.with_thread_state)
    out = list(itertools.islice(f.imap(itertools.count()), 50))
    assert [x for x, _ in out] == list(range(50))
    assert {state for _, state in out} == {"m"}
    seen = _lines(path)
    assert 1 <= len(seen) <= 2  # at most one per thread that ran items
    assert len(set(seen)) == len(seen)


def test_thread_imap_failing_initializer_fails_items_with_worker_start_error(tmp_path) -> None:
    """A thread initializer that raises fails the streamed items with ``WorkerStartError``."""
    path = str(tmp_path / "tries")
    f = opmap(mode="thread", workers=1, progress=False, initializer=wh.init_fail, initargs=(path,))(
        wh.with_state
    )
    with pytest.warns(OpmapFailureWarning, match="WorkerStartError"):
        out = list(f.imap(range(3)))
    assert len(out) == 3
    assert all(isinstance(r, WorkerStartError) for r in out)


@pytest.mark.slow
def test_process_imap_uses_the_initializer_pool(tmp_path) -> None:
    """In process mode, ``imap`` runs on workers set up by the initializer (once per worker)."""
    path = str(tmp_path / "pids")
    f = opmap(
        mode="process",
        workers=2,
        progress=False,
        initializer=wh.init_process,
        initargs=(path, "model"),
    )(wh.with_state)
    out = list(f.imap(range(40)))
    assert [r[0] for r in out] == list(range(40))
    assert {r[2] for r in out} == {"model"}
    pids = _lines(path)
    assert len(pids) == len(set(pids)) <= 2
    assert {str(r[1]) for r in out} <= set(pids)
