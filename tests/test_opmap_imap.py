"""f.imap / f.aimap: streamed results in every mode, lazy pulling, and a clean stop."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import opmap_helpers as h
from faultkit import run_scenario
from opero import MapError, OpmapFailureWarning, opmap
from opero._map.process_pool import process_pool
from opero._map.stream import MAX_CHUNK

SYNC_MODES = ["thread", "process", "executor"]
ASYNC_MODES = ["async", "async_process"]


def build(mode: str, func: Any = None, **options: Any) -> Any:
    """Return a map of ``func`` (``scaled``, or its async twin) in ``mode``, 2 workers."""
    options.setdefault("retries", 0)
    options.setdefault("progress", False)
    if mode == "executor":
        return opmap(executor=_EXECUTOR, **options)(func or h.scaled)
    if mode in ASYNC_MODES:
        return opmap(mode=mode, workers=2, **options)(func or h.a_scaled)
    return opmap(mode=mode, workers=2, **options)(func or h.scaled)


_EXECUTOR = cf.ThreadPoolExecutor(2, thread_name_prefix="imap-test-executor")


class Counted:
    """An endless source of 0, 1, 2, ... that counts how many items were pulled."""

    def __init__(self, stop: int | None = None) -> None:
        self.pulled = 0
        self.stop = stop

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            if self.stop is not None and i >= self.stop:
                return
            self.pulled += 1
            yield i


@pytest.mark.parametrize("mode", SYNC_MODES + ASYNC_MODES)
def test_imap_yields_in_input_order(mode: str) -> None:
    """Every mode streams one result per item, in input order by default."""
    f = build(mode)
    assert list(f.imap(range(500))) == list(range(500))


@pytest.mark.parametrize("mode", SYNC_MODES + ASYNC_MODES)
def test_imap_unordered_yields_every_result(mode: str) -> None:
    """With ordered=False every result comes exactly once, in completion order."""
    f = build(mode)
    assert sorted(f.imap(range(300), ordered=False)) == list(range(300))


@pytest.mark.parametrize("mode", SYNC_MODES + ASYNC_MODES)
def test_imap_infinite_generator_stops_after_n(mode: str) -> None:
    """An endless generator streams; after N results and close(), nothing more is pulled."""
    f = build(mode)
    source = Counted()
    stream = f.imap(source, scale=3)
    assert list(itertools.islice(stream, 40)) == [3 * i for i in range(40)]
    stream.close()
    pulled = source.pulled
    assert 40 <= pulled <= 40 + 4 * MAX_CHUNK  # at most 2 * workers chunks ahead
    time.sleep(0.2)
    assert source.pulled == pulled


def test_imap_bounds_items_in_flight() -> None:
    """With chunksize=1 and 2 workers, a paused consumer leaves at most 4 items pulled."""
    f = build("thread", h.identity, chunksize=1)
    source = Counted()
    stream = f.imap(source)
    assert next(stream) == 0
    time.sleep(0.1)
    assert source.pulled <= 4
    assert next(stream) == 1
    stream.close()


def test_imap_thread_break_stops_work_and_leaks_no_thread(tmp_path: Any) -> None:
    """Breaking out of a thread imap stops the workers after their item; no thread is added."""
    log = str(tmp_path / "calls")

    def slow(x: int) -> int:
        h.record(log, str(x))
        time.sleep(0.01)
        return x

    f = build("thread", slow)
    list(f.imap(range(4)))  # the shared pool exists before we count threads
    before = set(threading.enumerate())
    for result in f.imap(Counted()):
        if result == 10:
            break
    time.sleep(0.3)
    calls = h.count_lines(log)
    time.sleep(0.3)
    assert h.count_lines(log) == calls  # no item runs after the stop settled
    assert calls <= 4 + 10 + 1 + 2 * 2 * MAX_CHUNK
    assert set(threading.enumerate()) <= before


def test_imap_process_break_keeps_the_pool_and_leaks_no_process() -> None:
    """Breaking out of a process imap leaves the same workers, and the next map runs on them."""
    f = build("process")
    assert f([1, 2]) == [1, 2]
    pids = process_pool(2).pids()
    for result in f.imap(Counted()):
        if result == 500:
            break
    assert f(range(50)) == list(range(50))
    assert process_pool(2).pids() == pids


def test_imap_consumer_exception_stops_the_stream() -> None:
    """An exception in the consumer's loop closes the stream (garbage collection): pulling stops."""
    f = build("thread")
    source = Counted()

    def consume() -> None:
        for result in f.imap(source):
            if result == 20:
                raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer"):
        consume()
    pulled = source.pulled
    time.sleep(0.2)
    assert source.pulled == pulled


def test_imap_ctrl_c_stops_a_process_stream() -> None:
    """Ctrl-C in the consumer's loop stops a process imap; the pool serves the next map."""
    outcome = run_scenario(
        """
        import itertools, os, signal, sys
        sys.path.insert(0, "tests")
        import opmap_helpers as h
        from opero import opmap

        f = opmap(mode="process", workers=2, retries=0, progress=False)(h.scaled)
        pulled = [0]
        def source():
            for i in itertools.count():
                pulled[0] += 1
                yield i
        try:
            for r in f.imap(source()):
                if r == 300:
                    signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            print("interrupted")
        seen = pulled[0]
        print("rerun", f(range(5)) == [0, 1, 2, 3, 4])
        print("stopped", pulled[0] == seen)
        """,
        timeout=120,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["interrupted", "rerun True", "stopped True"]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_imap_serves_cached_items_without_work(mode: str, tmp_path: Any) -> None:
    """Cached items are yielded without running the function; results are stored as they come."""
    log = str(tmp_path / "calls")
    f = build(mode, h.logged_scaled, cache=True)
    first = list(f.imap([(log, i) for i in range(30)], scale=2))
    assert first == [2 * i for i in range(30)]
    assert h.count_lines(log) == 30
    again = list(f.imap([(log, i) for i in range(40)], scale=2))
    assert again == [2 * i for i in range(40)]
    assert h.count_lines(log) == 40  # only the 10 new items ran


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_imap_failures_are_yielded_and_warned(mode: str) -> None:
    """A failed item yields its exception in place; the end warns, naming the first index."""
    f = build(mode, h.fail_on_3_and_7)
    with pytest.warns(OpmapFailureWarning, match=r"2 of 10 items failed; the first at index 3"):
        results = list(f.imap(range(10)))
    assert [type(r).__name__ for r in results].count("ValueError") == 2
    assert isinstance(results[3], ValueError)
    assert isinstance(results[7], ValueError)
    assert results[4] == 8


def test_imap_strict_raises_after_the_last_result() -> None:
    """With strict=True every result is yielded first, then MapError names the first failure."""
    f = build("thread", h.fail_on_3_and_7, strict=True)
    seen: list[Any] = []
    with pytest.raises(MapError, match=r"first at index 3: ValueError: bad item 3") as info:
        seen.extend(f.imap(range(10)))
    assert len(seen) == 10
    assert info.value.indices == [3, 7]
    assert [str(e) for e in info.value.exceptions] == ["bad item 3", "bad item 7"]


def test_imap_rejects_bad_arguments_at_once() -> None:
    """A str, a non-iterable, a positional extra and a bad ordered fail at the call, not later."""
    f = build("thread")
    with pytest.raises(TypeError, match="one character at a time"):
        f.imap("abc")
    with pytest.raises(TypeError, match="iterable of items"):
        f.imap(3)
    with pytest.raises(TypeError, match="keyword only"):
        f.imap([1], 2)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="ordered=1 must be True or False"):
        f.imap([1], ordered=1)


def test_imap_source_error_reaches_the_consumer() -> None:
    """An exception raised by the items' generator propagates to the consumer's loop."""

    def broken() -> Iterator[int]:
        yield 1
        raise LookupError("source broke")

    f = build("thread")
    with pytest.raises(LookupError, match="source broke"):
        list(f.imap(broken()))


@pytest.mark.parametrize("mode", SYNC_MODES + ASYNC_MODES)
def test_aimap_streams_from_a_sync_iterable(mode: str) -> None:
    """An aimap loop yields every result in order from async code, in every mode."""
    f = build(mode)

    async def main() -> list[Any]:
        return [r async for r in f.aimap(range(200), scale=2)]

    assert asyncio.run(main()) == [2 * i for i in range(200)]


def test_aimap_takes_an_async_iterable_and_stops_on_break() -> None:
    """An async generator feeds aimap lazily; leaving the loop stops pulling from it."""
    f = build("async")
    pulled = [0]

    async def source() -> Any:
        for i in itertools.count():
            pulled[0] += 1
            yield i

    async def main() -> list[Any]:
        out = []
        stream = f.aimap(source(), ordered=True)
        async for r in stream:
            out.append(r)
            if len(out) == 25:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        seen = pulled[0]
        await asyncio.sleep(0.05)
        assert pulled[0] == seen
        return out

    assert asyncio.run(main()) == list(range(25))
    assert pulled[0] <= 25 + 2


def test_aimap_cancellation_stops_the_stream() -> None:
    """Cancelling the task that runs an aimap loop stops the map; nothing more is pulled."""
    f = build("thread")
    source = Counted()

    async def consume() -> None:
        async for _ in f.aimap(source):
            await asyncio.sleep(0.001)

    async def main() -> int:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = source.pulled
        await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(main())
    assert seen > 0
    time.sleep(0.1)
    assert source.pulled == seen


def test_imap_progress_bar_counts_without_a_total(capsys: Any) -> None:
    """progress='force' streams with a bar of unknown total that counts every item."""
    pytest.importorskip("tqdm")
    f = build("thread", progress="force")
    assert list(f.imap(iter(range(50)))) == list(range(50))
    err = capsys.readouterr().err
    assert "50item" in err  # counted to 50 with no total ("50/50" would show a total)
    assert "50/50" not in err


def test_imap_no_failures_no_warning() -> None:
    """A stream without failures emits no warning."""
    f = build("process")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(f.imap(range(2000))) == sum(range(2000))


class Unhashable:
    """An item whose cache key cannot be built (its __hash__ raises)."""

    def __hash__(self) -> int:
        raise RuntimeError("no hash for you")

    def __reduce__(self) -> Any:
        return (Unhashable, ())


def test_imap_unkeyable_item_fails_in_place_naming_its_index() -> None:
    """In a cached process stream, an item that cannot be keyed fails alone, its index named."""
    f = build("process", h.identity, cache=True, chunksize=2)
    with pytest.warns(OpmapFailureWarning, match="the first at index 5"):
        results = list(f.imap([0, 1, 2, 3, 4, Unhashable(), 6]))
    assert results[:5] == [0, 1, 2, 3, 4]
    assert results[6] == 6
    error = results[5]
    assert isinstance(error, Exception)
    assert any("item 5" in note for note in getattr(error, "__notes__", []))


def test_imap_unpicklable_item_fails_alone() -> None:
    """In a process stream, an item that cannot be pickled fails in its place; the rest run."""
    f = build("process", h.identity)
    with pytest.warns(OpmapFailureWarning, match="the first at index 1: TypeError"):
        results = list(f.imap([1, threading.Lock(), 3]))
    assert results[0] == 1
    assert results[2] == 3
    assert isinstance(results[1], TypeError)


def test_nested_imap_in_a_thread_map_makes_progress() -> None:
    """An imap inside a thread-mode map item finishes (its consumer runs jobs itself)."""
    inner = build("thread", h.identity)

    def total(n: int) -> int:
        return sum(inner.imap(range(n)))

    outer = build("thread", total)
    assert list(outer.imap(range(12))) == [n * (n - 1) // 2 for n in range(12)]


def test_chunks_grow_for_trivial_items_and_the_next_stream_starts_there() -> None:
    """Trivial items travel in big chunks after the first job; a later stream starts big."""
    f = build("thread", h.identity)
    first = Counted()
    stream = f.imap(first)
    assert next(stream) == 0
    assert first.pulled <= 4  # the first chunks are one item each: slow items start at once
    stream.close()
    assert sum(f.imap(range(20_000))) == sum(range(20_000))
    learned = f._stream_chunk
    assert learned > 16
    second = Counted()
    stream = f.imap(second)
    assert next(stream) == 0
    assert second.pulled >= learned
    stream.close()


def test_imap_raises_when_no_worker_process_can_start() -> None:
    """A process pool that cannot start a worker makes the stream raise WorkerStartError."""
    outcome = run_scenario(
        """
        from opero import opmap
        from opero._map import process_pool as _process_pool

        real = _process_pool.ProcessPool._spawn

        def refuse(self):
            raise OSError(24, "Too many open files")

        _process_pool.ProcessPool._spawn = refuse
        mapped = opmap(mode="process", workers=2, retries=0, progress=False)(abs)
        try:
            print("returned", list(mapped.imap(range(-4, 0))))
        except Exception as exc:
            print(type(exc).__name__, "Too many open files" in str(exc))
        _process_pool.ProcessPool._spawn = real
        print("again", list(mapped.imap(range(-3, 0))))
        """,
        timeout=120,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["WorkerStartError True", "again [3, 2, 1]"]
