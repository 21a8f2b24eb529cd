"""Worker setup and hygiene on real pools: initializer, max_tasks_per_child, chunksize."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading

import pytest

import worker_helpers as wh
from faultkit import run_scenario
from opero import ConfigurationError, WorkerStartError, opmap
from opero._map import pools as _pools
from opero._map import process_pool as _process_pool


def _lines(path: str) -> list[str]:
    """Return the lines of ``path`` (empty when missing)."""
    try:
        with open(path) as handle:
            return handle.read().split()
    except FileNotFoundError:
        return []


def _result_of(source: str, timeout: float = 90) -> dict:
    """Run ``source`` in a fresh interpreter with a deadline; return its last RESULT json."""
    prelude = (
        "import json, os, sys, time, warnings\nwarnings.simplefilter('ignore')\n"
        "import worker_helpers as wh\nfrom opero import opmap, WorkerStartError\n"
        "def report(**fields):\n    print('RESULT ' + json.dumps(fields), flush=True)\n"
    )
    # The scenario imports this directory's helpers (and spawned workers import them too).
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    outcome = run_scenario(
        prelude + textwrap.dedent(source), timeout=timeout, env={"PYTHONPATH": path}
    )
    found = [line[7:] for line in outcome.lines() if line.startswith("RESULT ")]
    assert found, f"no RESULT (exit {outcome.returncode})\n{outcome.stdout}\n{outcome.stderr}"
    return json.loads(found[-1])


# --------------------------------------------------------------------------- initializer


def test_thread_initializer_runs_once_per_thread(tmp_path):
    """In thread mode the initializer runs once in each thread that runs items, caller included."""
    path = str(tmp_path / "threads")
    f = opmap(
        mode="thread",
        workers=3,
        chunksize=1,
        retries=0,
        progress=False,
        initializer=wh.init_thread,
        initargs=(path, "conn"),
    )(wh.with_thread_state)
    assert f(range(30)) == [(x, "conn") for x in range(30)]
    first = _lines(path)
    assert 1 <= len(first) <= 3
    assert len(set(first)) == len(first)  # never twice in one thread
    assert f(range(30)) == [(x, "conn") for x in range(30)]
    again = _lines(path)
    assert len(set(again)) == len(again)  # the threads kept their setup


def test_process_initializer_runs_once_per_worker_and_is_reused(tmp_path):
    """A process worker runs the initializer once at start; every later job reuses its state."""
    path = str(tmp_path / "pids")
    f = opmap(
        mode="process",
        workers=2,
        chunksize=2,
        retries=0,
        progress=False,
        initializer=wh.init_process,
        initargs=(path, "model"),
    )(wh.with_state)
    first = f(range(20))
    second = f(range(20))
    assert [r[0] for r in first] == list(range(20))
    assert {r[2] for r in first + second} == {"model"}
    started = _lines(path)
    assert len(started) == len(set(started)) <= 2
    assert {str(r[1]) for r in first + second} <= set(started)


def test_pool_with_initializer_is_not_shared(tmp_path):
    """A map without an initializer never runs on workers set up by another map's initializer."""
    path = str(tmp_path / "pids")
    with_init = opmap(
        mode="process",
        workers=2,
        retries=0,
        progress=False,
        initializer=wh.init_process,
        initargs=(path, "A"),
    )(wh.with_state)
    other = opmap(
        mode="process",
        workers=2,
        retries=0,
        progress=False,
        initializer=wh.init_process,
        initargs=(path, "B"),
    )(wh.with_state)
    plain = opmap(mode="process", workers=2, retries=0, progress=False)(wh.with_state)
    assert {r[2] for r in with_init(range(8))} == {"A"}
    assert {r[2] for r in other(range(8))} == {"B"}
    assert {r[2] for r in plain(range(8))} == {None}
    assert {r[2] for r in with_init(range(8))} == {"A"}


def test_async_process_initializer_runs_once_per_worker(tmp_path):
    """An async_process worker runs the initializer once (aiomultiprocess's initializer)."""
    pytest.importorskip("aiomultiprocess")
    path = str(tmp_path / "pids")
    f = opmap(
        mode="async_process",
        workers=2,
        retries=0,
        progress=False,
        initializer=wh.init_process,
        initargs=(path, "model"),
    )(wh.awith_state)
    results = f(range(10)) + f(range(10))
    assert {r[2] for r in results} == {"model"}
    started = _lines(path)
    assert len(started) == len(set(started)) <= 2
    assert {str(r[1]) for r in results} <= set(started)


@pytest.mark.dask
def test_dask_initializer_is_a_worker_plugin(tmp_path):
    """In dask mode the initializer runs once on each worker of a real LocalCluster."""
    distributed = pytest.importorskip("distributed")
    path = str(tmp_path / "pids")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        f = opmap(
            mode="dask",
            client=client,
            chunksize=2,
            retries=0,
            progress=False,
            initializer=wh.init_process,
            initargs=(path, "model"),
        )(wh.with_state)
        results = f(range(20)) + f(range(20))
        assert {r[2] for r in results} == {"model"}
        started = _lines(path)
        assert sorted(started) == sorted(set(started))
        assert len(started) == 2
        assert {str(r[1]) for r in results} <= set(started)


def test_thread_initializer_failure_ends_the_map():
    """A raising initializer in thread mode raises WorkerStartError with it as the cause."""
    calls = []

    def init() -> None:
        calls.append(1)
        raise FileNotFoundError("model.bin")

    f = opmap(mode="thread", workers=2, retries=0, progress=False, initializer=init)(wh.boom)
    with pytest.raises(WorkerStartError, match="initializer raised") as info:
        f(range(100))
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert 1 <= len(calls) <= 2


@pytest.mark.skipif(sys.platform == "win32", reason="fork and process groups")
def test_process_initializer_failure_ends_the_map_quickly(tmp_path):
    """A raising initializer fails a process map with WorkerStartError: no hang, no respawn loop."""
    res = _result_of(
        f"""
        from opero import RemoteTraceback
        path = {str(tmp_path / "tries")!r}
        f = opmap(mode="process", workers=2, retries=0, progress=False,
                  initializer=wh.init_fail, initargs=(path,))(wh.with_state)
        outcomes = []
        for _ in range(2):
            start = time.monotonic()
            try:
                f(range(50))
            except WorkerStartError as exc:
                outcomes.append([type(exc.__cause__).__name__,
                                 isinstance(exc.__cause__.__cause__, RemoteTraceback),
                                 time.monotonic() - start])
        time.sleep(0.5)
        tries = len(open(path).read().split())
        ok = opmap(mode="process", workers=2, retries=0, progress=False)(wh.with_state)
        report(outcomes=outcomes, tries=tries, after=[r[0] for r in ok(range(4))])
        """
    )
    assert [o[:2] for o in res["outcomes"]] == [["FileNotFoundError", True]] * 2
    assert all(o[2] < 30 for o in res["outcomes"])
    assert 2 <= res["tries"] <= 4  # at most one start per worker and call
    assert res["after"] == [0, 1, 2, 3]


@pytest.mark.skipif(sys.platform == "win32", reason="fork and process groups")
def test_async_process_initializer_failure_ends_the_map(tmp_path):
    """A raising initializer fails an async_process map with WorkerStartError, not a hang."""
    pytest.importorskip("aiomultiprocess")
    res = _result_of(
        f"""
        path = {str(tmp_path / "tries")!r}
        f = opmap(mode="async_process", workers=2, retries=0, progress=False,
                  initializer=wh.init_fail, initargs=(path,))(wh.awith_state)
        try:
            f(range(20))
            report(raised=None)
        except WorkerStartError as exc:
            time.sleep(0.5)
            report(raised=type(exc.__cause__).__name__, tries=len(open(path).read().split()))
        """
    )
    assert res["raised"] == "FileNotFoundError"
    assert 1 <= res["tries"] <= 2


@pytest.mark.dask
def test_dask_initializer_failure_is_a_start_error():
    """A raising initializer on Dask workers raises WorkerStartError before any item runs."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        f = opmap(
            mode="dask",
            client=client,
            retries=0,
            progress=False,
            initializer=wh.init_fail,
            initargs=(os.devnull,),
        )(wh.with_state)
        with pytest.raises(WorkerStartError, match="initializer raised on a Dask worker"):
            f(range(4))


# --------------------------------------------------------------------------- max_tasks_per_child


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_max_tasks_per_child_recycles_without_loss_or_repeat(tmp_path):
    """Workers are replaced after N jobs; every item runs exactly once and comes back in order."""
    path = str(tmp_path / "ran")
    f = opmap(
        mode="process",
        workers=2,
        chunksize=1,
        max_tasks_per_child=2,
        retries=0,
        progress=False,
    )(wh.logged_pid)
    results = f([(path, x) for x in range(12)])
    assert [r[0] for r in results] == list(range(12))
    assert sorted(int(x) for x in _lines(path)) == list(range(12))  # once each
    pids = [r[1] for r in results]
    assert len(set(pids)) >= 6  # 12 jobs, at most 2 per worker
    assert all(pids.count(p) <= 2 for p in set(pids))


# --------------------------------------------------------------------------- chunksize


def test_chunksize_overrides_batching_in_every_pool_mode(monkeypatch):
    """chunksize= sets the job size of process, async_process and dask and the thread batch."""
    seen: dict[str, list[int]] = {}
    real_thread = _pools.run_thread_items
    real_process = _process_pool.run_process_jobs
    real_aio = _pools.run_aio_process_jobs

    def spy_thread(fn, items, workers, batch, *args, **kwargs):
        seen["thread"] = [batch]
        return real_thread(fn, items, workers, batch, *args, **kwargs)

    def spy_process(pool, target, jobs, *args, **kwargs):
        seen["process"] = [len(job) for job in jobs]
        return real_process(pool, target, jobs, *args, **kwargs)

    async def spy_aio(workers, target, jobs, *args, **kwargs):
        seen["async_process"] = [len(job) for job in jobs]
        return await real_aio(workers, target, jobs, *args, **kwargs)

    monkeypatch.setattr(_pools, "run_thread_items", spy_thread)
    monkeypatch.setattr(_process_pool, "run_process_jobs", spy_process)
    monkeypatch.setattr(_pools, "run_aio_process_jobs", spy_aio)
    opts = {"workers": 2, "chunksize": 7, "retries": 0, "progress": False}
    assert opmap(mode="thread", **opts)(wh.boom)(range(3, 40)) == list(range(3, 40))
    assert opmap(mode="process", **opts)(wh.boom)(range(3, 40)) == list(range(3, 40))
    assert opmap(mode="async_process", **opts)(wh.aboom)(range(3, 40)) == list(range(3, 40))
    assert seen["thread"] == [7]
    assert seen["process"] == [7, 7, 7, 7, 7, 2]
    assert seen["async_process"] == [7, 7, 7, 7, 7, 2]


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"chunksize": 0}, "chunksize=0"),
        ({"chunksize": 2.5}, "chunksize=2.5"),
        ({"mode": "process", "max_tasks_per_child": 0}, "max_tasks_per_child=0"),
        ({"mode": "process", "max_tasks_per_child": True}, "max_tasks_per_child=True"),
        ({"max_tasks_per_child": 5}, "max_tasks_per_child= recycles"),
        ({"initializer": "setup"}, "initializer='setup'"),
        ({"initializer": print, "initargs": "abc"}, "initargs='abc'"),
        ({"initargs": (1,)}, "initargs= is given without initializer="),
        ({"mode": "async", "initializer": print}, "mode='async'"),
        (
            {"mode": "process", "initializer": wh.init_process, "initargs": (threading.Lock(),)},
            "pickled",
        ),
    ],
)
def test_bad_worker_options_are_configuration_errors(options, named):
    """A bad initializer, initargs, max_tasks_per_child or chunksize fails at decoration."""
    with pytest.raises(ConfigurationError, match=named.replace("(", r"\(").replace("?", r"\?")):
        opmap(progress=False, **options)(wh.with_state)


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_script_global_set_by_initializer_is_seen_by_the_function(tmp_path, method):
    """In a script (functions sent by value), the global the initializer sets is the one read."""
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, os, warnings
            from opero import opmap

            MODEL = {{}}

            def load(name):
                MODEL["name"] = name
                MODEL["pid"] = os.getpid()

            @opmap(mode="process", workers=2, retries=0, progress=False,
                   initializer=load, initargs=("weights",))
            def predict(x):
                return x, MODEL.get("name"), MODEL.get("pid") == os.getpid()

            if __name__ == "__main__":
                multiprocessing.set_start_method({method!r}, force=True)
                warnings.simplefilter("ignore")
                print("RESULT", predict(range(6)) == [(x, "weights", True) for x in range(6)])
                print("PARENT", MODEL)
            """
        )
    )
    outcome = run_scenario(
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
        args=(str(script),),
        timeout=120,
    )
    assert "RESULT True" in outcome.stdout, outcome.stdout + outcome.stderr
    assert "PARENT {}" in outcome.stdout  # the parent never ran the initializer


@pytest.mark.skipif(sys.platform == "win32", reason="fork and process groups")
def test_initializer_that_exits_the_worker_ends_the_map():
    """An initializer that kills its worker fails the map with WorkerStartError naming it."""
    res = _result_of(
        """
        f = opmap(mode="process", workers=2, retries=0, progress=False,
                  initializer=wh.init_exit)(wh.with_state)
        try:
            f(range(10))
            report(raised=None)
        except WorkerStartError as exc:
            report(raised=str(exc), notes=getattr(exc, "__notes__", []))
        """
    )
    assert "exit code 7" in res["raised"]
    assert any("initializer" in note for note in res["notes"])


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
def test_interrupt_during_a_slow_initializer_stops_the_map():
    """Ctrl-C while workers are still in their initializer stops the map; the pool is usable."""
    res = _result_of(
        """
        import signal, threading
        f = opmap(mode="process", workers=2, retries=0, progress=False,
                  initializer=wh.init_sleep, initargs=(60,))(wh.with_state)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            f(range(10))
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "interrupted"
        took = time.monotonic() - start
        plain = opmap(mode="process", workers=2, retries=0, progress=False)(wh.with_state)
        report(outcome=outcome, took=took, after=[r[0] for r in plain(range(3))])
        """,
        timeout=60,
    )
    assert res["outcome"] == "interrupted"
    assert res["took"] < 20
    assert res["after"] == [0, 1, 2]
