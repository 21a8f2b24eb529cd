"""A failed item from a worker process or Dask carries the worker's traceback as its cause."""

from __future__ import annotations

import pickle
import traceback

import pytest

import worker_helpers as wh
from opero import (
    MapError,
    OperoError,
    OpmapFailureWarning,
    RemoteTraceback,
    attempt_errors,
    opmap,
    set_testing,
)


def _line(marker: str) -> int:
    """Return the line number of the helper source line holding ``marker``."""
    with open(wh.__file__) as handle:
        for number, line in enumerate(handle, 1):
            if marker in line:
                return number
    raise AssertionError(marker)


def _assert_worker_line(exc: BaseException, marker: str) -> None:
    """Check the printed exception names the worker file, line and source text."""
    assert isinstance(exc.__cause__, RemoteTraceback)
    printed = "".join(traceback.format_exception(exc))
    assert f'File "{wh.__file__}", line {_line(marker)}' in printed
    assert marker in printed  # the source line itself is shown
    assert "RemoteTraceback" in printed


def test_process_item_carries_worker_traceback():
    """A process-mode failure keeps its type and args and prints the worker's raising line."""
    f = opmap(mode="process", workers=2, retries=0, progress=False, strict=False)(wh.boom)
    with pytest.warns(OpmapFailureWarning, match="failed"):
        results = f([1, 2, 3])
    exc = results[1]
    assert type(exc) is ValueError
    assert exc.args == ("bad item", 2)
    _assert_worker_line(exc, "BOOM-LINE")
    assert results[0] == 1
    assert results[2] == 3


def test_process_retried_item_keeps_opero_note_and_traceback():
    """After retries run out in a worker, opero's note survives the trip with the traceback."""
    f = opmap(mode="process", workers=1, retries=1, progress=False)(wh.boom)
    with set_testing(), pytest.warns(OpmapFailureWarning, match="failed"):
        exc = f([2])[0]
    assert type(exc) is ValueError
    assert exc.__notes__, "opero's note was lost in transit"
    earlier, last = attempt_errors(exc)  # both calls' errors crossed the pipe
    assert earlier.args == ("bad item", 2)
    assert last is exc
    _assert_worker_line(exc, "BOOM-LINE")


def test_unpicklable_exception_gets_a_traceback_too():
    """An exception that does not unpickle becomes an OperoError that still shows the line."""
    f = opmap(mode="process", workers=1, retries=0, progress=False)(wh.unpicklable_boom)
    with pytest.warns(OpmapFailureWarning, match="failed"):
        exc = f([0, 1])[1]
    assert isinstance(exc, OperoError)
    assert "Unpicklable" in str(exc)
    _assert_worker_line(exc, "UNPICKLABLE-LINE")


def test_unpicklable_earlier_attempt_keeps_the_item_type(tmp_path):
    """An earlier attempt's unpicklable error is described; the item keeps its own exception."""
    f = opmap(mode="process", workers=1, retries=1, progress=False)(wh.unpicklable_then_value_error)
    with set_testing(), pytest.warns(OpmapFailureWarning, match="failed"):
        exc = f([(str(tmp_path), 5)])[0]
    assert type(exc) is ValueError
    assert exc.args == ("second call", 5)
    first, last = attempt_errors(exc)
    assert isinstance(first, OperoError)
    assert "Unpicklable" in str(first)
    assert last is exc


def test_async_process_item_carries_worker_traceback():
    """An async_process failure prints the worker's raising line."""
    pytest.importorskip("aiomultiprocess")
    f = opmap(mode="async_process", workers=1, retries=0, progress=False)(wh.aboom)
    with pytest.warns(OpmapFailureWarning, match="failed"):
        results = f([1, 2])
    exc = results[1]
    assert type(exc) is ValueError
    assert exc.args == ("bad async item", 2)
    _assert_worker_line(exc, "ABOOM-LINE")


@pytest.mark.dask
def test_dask_item_carries_worker_traceback():
    """A Dask failure (a worker process of a LocalCluster) prints the worker's raising line."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        f = opmap(mode="dask", client=client, retries=0, progress=False)(wh.boom)
        with pytest.warns(OpmapFailureWarning, match="failed"):
            results = f([1, 2, 3])
    exc = results[1]
    assert type(exc) is ValueError
    assert exc.args == ("bad item", 2)
    _assert_worker_line(exc, "BOOM-LINE")


def test_thread_item_keeps_its_own_traceback():
    """A thread-mode failure is the raised exception itself, its frames intact (no wrapper)."""
    f = opmap(mode="thread", workers=2, retries=0, progress=False)(wh.boom)
    with pytest.warns(OpmapFailureWarning, match="failed"):
        exc = f([2])[0]
    assert not isinstance(exc.__cause__, RemoteTraceback)
    frames = traceback.extract_tb(exc.__traceback__)
    assert (frames[-1].filename, frames[-1].lineno) == (wh.__file__, _line("BOOM-LINE"))


def test_remote_traceback_str_is_the_text():
    """RemoteTraceback's str() is the traceback text it holds, and it pickles."""
    tb = RemoteTraceback('\n"""\nTraceback ...\n"""')
    assert str(tb) == tb.tb == '\n"""\nTraceback ...\n"""'
    assert str(pickle.loads(pickle.dumps(tb))) == tb.tb


def test_map_error_keeps_notes_when_pickled():
    """MapError's notes, results and indices survive pickling."""
    error = MapError("opmap f: 1 of 2 items failed", [ValueError("x")], [1, None], [1])
    error.add_note("a note")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.__notes__ == ["a note"]
    assert copy.results == [1, None]
    assert copy.indices == [1]
    assert str(copy.exceptions[0]) == "x"
