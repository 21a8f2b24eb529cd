"""Hostile pass on @opmap streaming (imap/aimap) and worker setup: each test is an attack.

Scenarios that can hang (forks, kills, signals, exit with a stream open) run in their
own interpreter with a deadline (tests/faultkit.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import opmap_helpers as h
from faultkit import run_scenario
from opero import OpmapFailureWarning, opmap

STREAM_MODES = ["thread", "process", "async", "async_process"]
_TESTS = os.path.dirname(os.path.abspath(__file__))
_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH", "")) if p)}


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


_INIT_DEATH = """
    import json, os, sys, time
    import opmap_helpers as h
    from opero import WorkerStartError, opmap

    init, initargs = (os.abort, ()) if sys.argv[1] == "abort" else (os._exit, (7,))
    f = opmap(mode="async_process", workers=2, retries=0, progress=False,
              initializer=init, initargs=initargs)(h.a_scaled)
    out = {}
    for kind in ("call", "imap"):
        start = time.monotonic()
        try:
            got = f(range(20)) if kind == "call" else list(f.imap(range(20)))
            out[kind] = ["returned", [type(r).__name__ for r in got][:3]]
        except WorkerStartError as exc:
            out[kind] = ["raised", str(exc)]
        out[kind + "_s"] = time.monotonic() - start
    print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["abort", "exit"])
def test_async_process_initializer_that_kills_its_worker_ends_the_map(how: str) -> None:
    """An async_process initializer that kills its process raises WorkerStartError, no hang."""
    pytest.importorskip("aiomultiprocess")
    outcome = run_scenario(_INIT_DEATH, timeout=90, args=(how,), env=_ENV)
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    out = json.loads(outcome.lines()[-1])
    for kind in ("call", "imap"):
        assert out[kind][0] == "raised", out
        assert "exited while running the initializer" in out[kind][1]
        assert out[kind + "_s"] < 30


def test_async_process_stream_raises_when_the_initializer_raises(tmp_path: Any) -> None:
    """An async_process stream whose initializer raises raises WorkerStartError (documented)."""
    pytest.importorskip("aiomultiprocess")
    outcome = run_scenario(
        """
        import sys
        import opmap_helpers as h, worker_helpers as wh
        from opero import WorkerStartError, opmap
        f = opmap(mode="async_process", workers=2, retries=0, progress=False,
                  initializer=wh.init_fail, initargs=(sys.argv[1],))(h.a_scaled)
        try:
            got = list(f.imap(range(20)))
            print("returned", [type(r).__name__ for r in got][:2])
        except WorkerStartError as exc:
            print("raised", type(exc.__cause__).__name__)
        """,
        timeout=90,
        env=_ENV,
        args=(str(tmp_path / "tries"),),
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert outcome.lines()[-1] == "raised FileNotFoundError"


@pytest.mark.parametrize("mode", ["thread", "process", "async"])
def test_imap_slow_source_streams_at_its_own_pace(mode: str) -> None:
    """After a fast stream grew the chunks, a source yielding every 20 ms still streams each."""
    outcome = run_scenario(
        """
        import itertools, sys, time
        import opmap_helpers as h
        from opero import opmap

        mode = sys.argv[1]
        f = opmap(mode=mode, workers=2, retries=0, progress=False)(
            h.a_scaled if mode == "async" else h.scaled)
        assert list(f.imap(range(100_000))) == list(range(100_000))  # chunks grow
        grown = f._stream_chunk > 10 or mode == "async"  # async: one item per job

        def slow():
            for i in itertools.count():
                time.sleep(0.02)
                yield i

        start = time.monotonic()
        got = list(itertools.islice(f.imap(slow()), 10))
        print(got == list(range(10)), grown, round(time.monotonic() - start, 2))
        """,
        timeout=60,
        env=_ENV,
        args=(mode,),
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    ok, grown, seconds = outcome.lines()[-1].split()
    assert (ok, grown) == ("True", "True"), outcome.stdout
    # 10 items at 20 ms: 0.2 s; a chunk filled first took 4096 * 20 ms = 80 s.
    assert float(seconds) < 20


def test_imap_with_max_tasks_per_child_grows_its_chunks() -> None:
    """A stream with max_tasks_per_child=1 over 2000 trivial items starts few workers."""
    outcome = run_scenario(
        """
        import worker_helpers as wh
        from opero import opmap

        f = opmap(mode="process", workers=2, retries=0, progress=False,
                  max_tasks_per_child=1)(wh.with_state)
        got = list(f.imap(range(2000)))
        print([x for x, _, _ in got] == list(range(2000)), len({pid for _, pid, _ in got}))
        """,
        timeout=120,
        env=_ENV,
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    ok, pids = outcome.lines()[-1].split()
    assert ok == "True"
    # One job per worker: the chunks double from 1 (about 11 jobs); before, every
    # item was its own job, a process start each (2000 starts, 150x the list call).
    assert int(pids) < 100, pids


@pytest.mark.xfail(
    strict=True,
    reason="the stream pulls its next items in the consumer's thread before it yields: a "
    "source that waits for the consumer (a crawler feeding results back) blocks it for good",
)
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_imap_source_fed_by_the_consumer_does_not_deadlock(mode: str) -> None:
    """A crawler whose next item comes from the last result streams all of them."""
    outcome = run_scenario(
        """
        import queue, sys
        import opmap_helpers as h
        from opero import opmap

        f = opmap(mode=sys.argv[1], workers=2, retries=0, progress=False)(h.scaled)
        todo = queue.Queue()
        todo.put(0)

        def source():
            while (item := todo.get(timeout=3)) is not None:  # 3 s: a deadlock
                yield item

        seen = []
        try:
            for result in f.imap(source()):
                seen.append(result)
                todo.put(result + 1 if result < 5 else None)
            print("ok", seen)
        except queue.Empty:
            print("deadlock", seen)
        """,
        timeout=60,
        env=_ENV,
        args=(mode,),
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert outcome.lines()[-1] == "ok [0, 1, 2, 3, 4, 5]"


@pytest.mark.parametrize("reorder", ["reverse", "sort"])
def test_failed_refuses_results_reordered_in_place(reorder: str) -> None:
    """failed() on results sorted or reversed in place raises TypeError, not wrong items."""
    f = opmap(mode="thread", workers=2, retries=0, progress=False)(h.fail_on_3_and_7)
    with pytest.warns(OpmapFailureWarning):
        results = f(range(10))
    assert [i for i, _, _ in f.failed(results)] == [3, 7]
    if reorder == "reverse":
        results.reverse()
    else:
        results.sort(key=lambda r: isinstance(r, Exception))
    with pytest.raises(TypeError, match="sorted or reversed"):
        f.failed(results)
    # Given the items in the results' new order, it names the right ones again.
    order = list(range(10))[::-1] if reorder == "reverse" else [0, 1, 2, 4, 5, 6, 8, 9, 3, 7]
    assert sorted(item for _, item, _ in f.failed(results, order)) == [3, 7]


@pytest.mark.parametrize("kind", ["call", "imap"])
def test_ctrl_c_with_a_hung_async_process_initializer_lets_the_interpreter_exit(kind: str) -> None:
    """After Ctrl-C stops a map whose initializer never returns, the interpreter still exits."""
    pytest.importorskip("aiomultiprocess")
    outcome = run_scenario(
        """
        import logging, os, signal, sys, threading, time
        import opmap_helpers as h
        from opero import opmap

        logging.basicConfig()
        f = opmap(mode="async_process", workers=2, retries=0, progress=False,
                  initializer=time.sleep, initargs=(3600,))(h.a_scaled)
        threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            f(range(10)) if sys.argv[1] == "call" else list(f.imap(range(10)))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        """,
        timeout=60,
        env=_ENV,
        args=(kind,),
    )
    assert outcome.lines() == ["interrupted"], outcome.stderr[-2000:]
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert "were terminated" in outcome.stderr  # the exit says what it did


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_imap_progress_counts_failures_and_retries(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A streamed map's bar and summary count its failed and retried items, as a call's do."""
    f = opmap(mode=mode, workers=2, retries=1, progress="force", _sleep=lambda s: None)(
        h.fail_on_3_and_7
    )
    with pytest.warns(OpmapFailureWarning):
        results = list(f.imap(range(10)))
    assert [i for i, r in enumerate(results) if isinstance(r, Exception)] == [3, 7]
    err = capsys.readouterr().err.replace("\r", "\n")
    summary = [line for line in err.splitlines() if line.startswith("opmap ")]
    assert len(summary) == 1, err
    assert re.fullmatch(
        r"opmap fail_on_3_and_7: 10 done, 2 failed, 0 cached, 2 retries in [\d.]+ s", summary[0]
    ), summary
    assert "failed=2 retried=2" in err


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_close_from_another_thread_stops_a_blocked_consumer(mode: str) -> None:
    """close() while another thread waits in next() ends that loop and stops pulling items."""
    outcome = run_scenario(
        """
        import itertools, sys, threading, time
        from opero import opmap

        f = opmap(mode=sys.argv[1], workers=2, retries=0, progress=False)(time.sleep)
        pulled = []

        def source():
            for i in itertools.count():
                pulled.append(i)
                yield 0.5

        stream = f.imap(source())
        out = []
        consumer = threading.Thread(target=lambda: out.extend(stream))
        consumer.start()
        time.sleep(0.2)  # the consumer waits for the first 0.5 s items
        try:
            stream.close()
            print("closed")
        except Exception as exc:
            print("close raised", repr(exc))
        consumer.join(20)
        before = len(pulled)
        time.sleep(1.0)
        print(consumer.is_alive(), len(pulled) == before)
        """,
        timeout=60,
        env=_ENV,
        args=(mode,),
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert outcome.lines()[-2:] == ["closed", "False True"], outcome.stdout


@pytest.mark.parametrize("mode", ["process", "async_process"])
@pytest.mark.parametrize("how", ["call", "imap"])
def test_unpicklable_shared_keyword_is_named(mode: str, how: str) -> None:
    """A shared keyword argument that cannot be pickled to workers raises a TypeError naming it."""
    if mode == "async_process":
        pytest.importorskip("aiomultiprocess")
    f = build(mode)
    lock = threading.Lock()
    run = f if how == "call" else (lambda items, **kw: list(f.imap(items, **kw)))
    with pytest.raises(TypeError, match=r"shared keyword argument scale= cannot be pickled"):
        run([1, 2], scale=lock)
    assert f([1, 2], scale=3) == [3, 6]  # the map still works
