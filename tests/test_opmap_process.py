"""@opmap in process mode: reused pool, by-reference or by-value functions, crashes, cache."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest

import opmap_helpers as h
from opero import MapError, OpmapFailureWarning, WorkerDiedError, opmap
from opero._map.process_pool import process_pool
from opero.errors import RateLimitTimeout


def test_module_level_function_runs_in_workers():
    """A module-level map runs its items in other processes, results in order."""
    assert h.p_square(range(50)) == [x * x for x in range(50)]
    assert os.getpid() not in set(h.p_pid(range(8)))


def test_module_level_function_pickles_by_reference():
    """A module-level map pickles as its module and name, not its code."""
    payload = pickle.dumps(h.p_square)
    assert b"opmap_helpers" in payload
    assert b"p_square" in payload
    assert pickle.loads(payload) is h.p_square


def test_pool_is_reused_across_calls():
    """Two calls run on the same worker processes: no pool is built per call."""
    first = set(h.p_pid(range(40)))
    pool = process_pool(2)
    pids = pool.pids()
    second = set(h.p_pid(range(40)))
    assert process_pool(2) is pool
    assert pool.pids() == pids
    assert first | second <= pids
    assert len(pids) <= 2


def test_workers_honoured():
    """A map with workers=3 runs on at most three distinct processes."""

    @opmap(mode="process", workers=3, retries=0, chunksize=1, progress=False)
    def pid(_x):
        h.busy(0.002)
        return os.getpid()

    pids = set(pid(range(30)))
    assert 1 <= len(pids) <= 3
    assert len(process_pool(3).pids()) <= 3


def test_lambda_and_closure_go_by_value():
    """A lambda and a closure are sent by value through cloudpickle."""
    offset = 7
    add = opmap(mode="process", workers=2, retries=0, progress=False)(lambda x: x + offset)

    def scale(x):
        return x * offset

    scaled = opmap(mode="process", workers=2, retries=0, progress=False)(scale)
    assert add(range(5)) == [7, 8, 9, 10, 11]
    assert scaled(range(5)) == [0, 7, 14, 21, 28]


def test_failures_in_place_and_strict():
    """Worker exceptions come back in place; strict raises a group with the partial results."""
    with pytest.warns(OpmapFailureWarning, match="3 of 6 items failed"):
        results = h.p_fail_odd(range(6))
    assert results[0::2] == [0, 2, 4]
    assert all(isinstance(r, ValueError) for r in results[1::2])

    strict = opmap(mode="process", workers=2, retries=0, strict=True, progress=False)(
        h.p_fail_odd.__wrapped__
    )
    with pytest.raises(MapError) as info:
        strict(range(4))
    assert info.value.results[0::2] == [0, 2]
    assert info.value.indices == [1, 3]


def test_unordered_returns_every_result():
    """ordered=False returns every item's result exactly once."""
    unordered = opmap(mode="process", workers=2, retries=0, ordered=False, progress=False)(
        h.trivial
    )
    assert sorted(unordered(range(100))) == list(range(1, 101))


def test_dying_worker_marks_only_its_item():
    """A worker that exits marks its item failed, the pool is rebuilt, the rest finish."""
    with pytest.warns(OpmapFailureWarning, match="1 of 40 items failed"):
        results = h.p_die_on_13(range(40))
    assert isinstance(results[13], WorkerDiedError)
    assert [r for i, r in enumerate(results) if i != 13] == [x for x in range(40) if x != 13]
    assert h.p_square(range(5)) == [0, 1, 4, 9, 16]


def test_killed_worker_marks_only_its_item():
    """A worker killed by SIGKILL marks its item failed and the map finishes."""
    with pytest.warns(OpmapFailureWarning, match="1 of 12 items failed"):
        results = h.p_kill_on_5(range(12))
    assert isinstance(results[5], WorkerDiedError)
    assert [r for i, r in enumerate(results) if i != 5] == [x for x in range(12) if x != 5]


def test_unpicklable_result_fails_only_its_item():
    """A result that cannot be pickled fails its own item, not the rest of its job."""
    with pytest.warns(OpmapFailureWarning, match="1 of 10 items failed"):
        results = h.p_unpicklable_on_4(range(10))
    assert [r for i, r in enumerate(results) if i != 4] == [x for x in range(10) if x != 4]
    assert isinstance(results[4], Exception)
    assert "pickl" in str(results[4]).lower()


def test_cache_in_parent_skips_dispatch(tmp_path):
    """Cached items are not dispatched; worker results are stored in the parent's cache."""
    log = str(tmp_path / "calls")
    first = h.p_cached_logged([(log, x) for x in range(5)])
    assert first == [0, 2, 4, 6, 8]
    assert h.count_lines(log) == 5
    second = h.p_cached_logged([(log, x) for x in range(8)])
    assert second == [2 * x for x in range(8)]
    assert h.count_lines(log) == 8
    assert h.p_cached_logged.item_function((log, 6)) == 12
    assert h.count_lines(log) == 8


def test_rate_limit_is_global_across_processes():
    """Two worker processes share one bucket: exactly `rate_burst` items get a token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        results = h.p_rate_limited(range(20))
    granted = [r for r in results if not isinstance(r, BaseException)]
    assert len(granted) == 5
    assert all(isinstance(r, RateLimitTimeout) for r in results if r not in granted)


def test_retries_run_in_workers(tmp_path):
    """Retries apply per item inside the workers (first call fails, retry succeeds)."""
    base = str(tmp_path / "flaky")
    assert h.p_flaky([(base, x) for x in range(6)]) == list(range(6))
    assert all(os.path.exists(f"{base}.{x}") for x in range(6))


def test_process_executor_is_accepted():
    """A user's ProcessPoolExecutor runs the batches of a by-reference function."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        square = opmap(executor=pool, retries=0, progress=False)(h.trivial)
        assert square(range(10)) == list(range(1, 11))


def test_progress_counts_cache_hits(tmp_path, capsys):
    """The forced progress bar counts every item, cache hits served by the parent included."""
    pytest.importorskip("tqdm")
    log = str(tmp_path / "calls")
    shown = opmap(mode="process", workers=2, retries=0, cache=True, progress="force")(
        h.p_cached_logged.__wrapped__
    )
    shown([(log, x) for x in range(4)])
    capsys.readouterr()
    shown([(log, x) for x in range(10)])
    assert "10/10" in capsys.readouterr().err
    assert h.count_lines(log) == 10


def test_cache_stores_successes_only_and_counts_each_item_once():
    """Failed items are never stored, cached ones are not recomputed, counters stay exact."""
    hits: list[int] = []
    fm = opmap(
        mode="process",
        workers=2,
        retries=0,
        cache=True,
        progress=False,
        chunksize=3,
        on_cache_hit=lambda: hits.append(1),
    )(h.p_fail_odd.__wrapped__)
    with pytest.warns(OpmapFailureWarning, match="5 of 10 items failed"):
        first = fm(range(10))
    assert [r for r in first if not isinstance(r, Exception)] == [0, 2, 4, 6, 8]
    info = fm.item_function.cache_info()
    assert (info.hits, info.misses, info.currsize) == (0, 10, 5)
    with pytest.warns(OpmapFailureWarning, match="6 of 12 items failed"):
        second = fm(range(12))
    assert second[:10:2] == [0, 2, 4, 6, 8]
    assert second[10] == 10
    info = fm.item_function.cache_info()
    assert (info.hits, info.misses, info.currsize) == (5, 17, 6)
    assert len(hits) == 5
    assert fm(range(0, 12, 2)) == [0, 2, 4, 6, 8, 10]  # every item served by the parent
    assert fm.item_function.cache_info().hits == 11
    assert len(hits) == 11
