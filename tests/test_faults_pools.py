"""@opmap pools under faults: dying workers, interrupts, cancels, bad items, forks, start methods.

Each scenario runs in its own interpreter with a deadline (tests/faultkit.py), so a
hang fails the test instead of the run. Scenarios print one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading

import pytest

import opmap_helpers as h
from faultkit import run_scenario

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fork")

PRELUDE = """
import asyncio, json, os, signal, sys, threading, time, warnings
warnings.simplefilter("ignore")
from opero import opmap, WorkerDiedError

def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)

def kinds(results):
    return [type(r).__name__ if isinstance(r, BaseException) else r for r in results]
"""


def result_of(source: str, timeout: float = 60.0) -> dict:
    """Run ``PRELUDE + source``; return its RESULT, failing with its output when there is none."""
    outcome = run_scenario(PRELUDE + textwrap.dedent(source), timeout=timeout)
    lines = [line[7:] for line in outcome.lines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT (exit {outcome.returncode})\n{outcome.stdout}\n{outcome.stderr}"
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- d03


def test_every_item_killing_its_worker_fails_each_slot_and_pool_recovers():
    """A map whose every item kills its worker fails each slot (WorkerDiedError); then maps work."""
    res = result_of(
        """
        def die(x):
            os.kill(os.getpid(), signal.SIGKILL)

        def ident(x):
            return x

        dying = opmap(mode="process", workers=2, retries=0, progress=False)(die)
        plain = opmap(mode="process", workers=2, retries=0, progress=False)(ident)
        first = kinds(dying(range(40)))
        second = kinds(dying(range(3)))
        third = plain(range(6))
        report(first=first, second=second, third=third)
        """
    )
    assert res["first"] == ["WorkerDiedError"] * 40
    assert res["second"] == ["WorkerDiedError"] * 3
    assert res["third"] == [0, 1, 2, 3, 4, 5]


def test_dead_worker_error_names_pid_and_signal():
    """The WorkerDiedError of a killed item says which process died and by which signal."""
    res = result_of(
        """
        def die_on_2(x):
            if x == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return x

        mapped = opmap(mode="process", workers=2, retries=0, progress=False, chunksize=3)(die_on_2)
        results = mapped(range(6))
        report(kinds=kinds(results), message=str(results[2]))
        """
    )
    assert res["kinds"] == [0, 1, "WorkerDiedError", 3, 4, 5]
    assert "signal 9" in res["message"]


def test_workers_exit_when_the_parent_is_killed():
    """Worker processes notice that their parent died (SIGKILL) and exit instead of lingering."""
    res = result_of(
        """
        import subprocess
        code = "; ".join([
            "import sys",
            "from opero import opmap",
            "from opero._map.process_pool import process_pool",
            "mapped = opmap(mode='process', workers=3, retries=0, progress=False)(abs)",
            "assert mapped(range(6)) == list(range(6))",
            "print(' '.join(map(str, sorted(process_pool(3).pids()))), flush=True)",
            "sys.stdin.read()",
        ])
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        pids = [int(p) for p in child.stdout.readline().split()]
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ")[1][0] != "Z":
                        alive.append(pid)
        report(workers=len(pids), alive=alive)
        """
    )
    assert res["workers"] == 3
    assert res["alive"] == []


# --------------------------------------------------------------------------- d07


def test_sigint_stops_a_thread_map_and_items_not_started_never_start():
    """Ctrl-C during a thread map raises at once; at most `workers` items start afterwards."""
    res = result_of(
        """
        started = []

        def slow(x):
            started.append(x)
            time.sleep(0.1)
            return x

        mapped = opmap(mode="thread", workers=4, retries=0, progress=False)(slow)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            mapped(range(400))
            report(raised=False)
        except KeyboardInterrupt:
            after = time.monotonic() - t0
            at_raise = len(started)
            time.sleep(0.5)
            later = len(started) - at_raise
            again = mapped(range(8))
            report(raised=True, after=after, at_raise=at_raise, later=later, again=again)
        """
    )
    assert res["raised"]
    assert res["later"] <= 4
    assert res["at_raise"] < 100  # 400 items of 0.1 s on 4 threads: far from done
    assert res["after"] < 5.0  # the whole map would take 10 s
    assert res["again"] == list(range(8))


def test_sigint_stops_a_process_map_and_frees_the_pool(tmp_path):
    """Ctrl-C during a process map raises at once, no queued item starts, the next map runs."""
    log = tmp_path / "started.log"
    res = result_of(
        f"""
        LOG = {str(log)!r}

        def slow(x):
            with open(LOG, "a") as f:
                f.write(f"{{x}}\\n")
            time.sleep(0.05)
            return x

        def count():
            with open(LOG) as f:
                return sum(1 for _ in f)

        mapped = opmap(mode="process", workers=2, retries=0, progress=False)(slow)
        mapped(range(2))
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            mapped(range(400))
            report(raised=False)
        except KeyboardInterrupt:
            at_raise = count()
            time.sleep(0.5)
            later = count() - at_raise
            t0 = time.monotonic()
            again = mapped(range(4))
            report(raised=True, at_raise=at_raise, later=later, again=again,
                   next_map=time.monotonic() - t0)
        """
    )
    assert res["raised"]
    assert res["later"] == 0  # the workers running its jobs were stopped, nothing queued ran
    assert res["at_raise"] < 200
    assert res["again"] == [0, 1, 2, 3]
    assert res["next_map"] < 5.0  # 4 items of 0.05 s; 20 s if it queued behind the rest


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_cancelled_amap_returns_promptly(mode):
    """Cancelling `await f.amap(...)` stops the map, so asyncio.run returns soon after."""
    res = result_of(
        f"""
        def slow(x):
            time.sleep(0.1)
            return x

        mapped = opmap(mode={mode!r}, workers=4, retries=0, progress=False)(slow)
        mapped(range(4))
        marks = []

        async def main():
            task = asyncio.create_task(mapped.amap(range(400)))
            await asyncio.sleep(0.3)
            marks.append(time.monotonic())
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        cancelled = asyncio.run(main())
        report(cancelled=cancelled, after=time.monotonic() - marks[0], again=mapped(range(3)))
        """
    )
    assert res["cancelled"]
    assert res["after"] < 5.0  # the map has 10 s of work left
    assert res["again"] == [0, 1, 2]


# --------------------------------------------------------------------------- d10, d09


class NoHash:
    """An unhashable item that pickles."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoHash)


class BadHash:
    """A hashable-looking item whose hash raises an arbitrary exception."""

    def __hash__(self) -> int:
        raise ValueError("no hash today")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BadHash)


MODES = ["thread", "process", "async"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [NoHash, BadHash])
def test_unkeyable_item_fails_only_its_slot(mode, bad):
    """An item whose cache key cannot be built fails in its place; every other item returns."""
    mapped = h.cached_identity[mode]
    items = [1, 2, bad(), 4, 5]
    with pytest.warns(UserWarning, match="1 of 5 items failed"):
        results = mapped(items)
    assert [r for i, r in enumerate(results) if i != 2] == [1, 2, 4, 5]
    assert isinstance(results[2], Exception)
    if mode == "process":  # keyed in the parent: the note names the index
        assert any("item 2" in note for note in getattr(results[2], "__notes__", []))


def test_unpicklable_item_fails_only_its_slot_naming_its_index():
    """In process mode an item that cannot be pickled fails in its place, named by its index."""
    items = [1, 2, 3, 4, threading.Lock(), 6, 7]
    with pytest.warns(UserWarning, match="1 of 7 items failed"):
        results = h.p_identity(items)
    assert [r for i, r in enumerate(results) if i != 4] == [1, 2, 3, 4, 6, 7]
    assert isinstance(results[4], TypeError)
    assert any("item 4" in note for note in results[4].__notes__)


def test_job_of_only_unpicklable_items_fails_them_all():
    """A job whose every item cannot be pickled fails each of them, and the map still returns."""
    items = [threading.Lock(), threading.Lock()]
    with pytest.warns(UserWarning, match="2 of 2 items failed"):
        results = h.p_identity(items)
    assert all(isinstance(r, TypeError) for r in results)


# --------------------------------------------------------------------------- fork


def test_forked_child_builds_its_own_pools_while_a_map_runs():
    """A child forked during a process map (run in another thread) maps with fresh pools."""
    res = result_of(
        """
        def slow(x):
            time.sleep(0.02)
            return x * 2

        p = opmap(mode="process", workers=2, retries=0, progress=False)(slow)
        t = opmap(mode="thread", workers=3, retries=0, progress=False)(slow)
        p(range(2)); t(range(6))
        box = {}
        runner = threading.Thread(target=lambda: box.setdefault("r", p(range(60))))
        runner.start()
        time.sleep(0.2)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = json.dumps({"p": p(range(5)), "t": t(range(5))})
            except BaseException as exc:
                out = json.dumps({"error": repr(exc)})
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 30
        chunks = []
        while time.monotonic() < deadline:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.waitpid(pid, 0)
        runner.join()
        child = json.loads(b"".join(chunks) or b"null")
        report(child=child, parent=box["r"] == [x * 2 for x in range(60)])
        """
    )
    assert res["child"] == {"p": [0, 2, 4, 6, 8], "t": [0, 2, 4, 6, 8]}
    assert res["parent"]


# --------------------------------------------------------------------------- start methods


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_process_map_on_every_start_method(method):
    """Process maps, dying workers and the shared rate limit work on fork, spawn and forkserver."""
    res = result_of(
        f"""
        import multiprocessing
        multiprocessing.set_start_method({method!r})

        def maybe_die(x):
            if x == 3:
                os._exit(7)
            return x + 1

        mapped = opmap(mode="process", workers=2, retries=0, progress=False)(maybe_die)
        first = kinds(mapped(range(8)))
        second = mapped([0, 1])
        limited = opmap(mode="process", workers=2, retries=0, progress=False, chunksize=1,
                        rate_limit=20)(abs)
        limited([0, 0])  # workers up before the clock starts
        t0 = time.monotonic()
        third = limited(range(8))
        report(first=first, second=second, third=third, elapsed=time.monotonic() - t0)
        """,
        timeout=120,
    )
    assert res["first"] == [1, 2, 3, "WorkerDiedError", 5, 6, 7, 8]
    assert res["second"] == [1, 2]
    assert res["third"] == list(range(8))
    # 20 calls/s shared by both workers: 8 more calls need at least 7 intervals of 0.05 s.
    assert res["elapsed"] >= 0.34


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_script_without_main_guard_fails_at_once(tmp_path, method):
    """Without `if __name__ == "__main__":` a spawn/forkserver map fails fast, naming the fix."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import multiprocessing\n"
        f"multiprocessing.set_start_method({method!r}, force=True)\n"
        "from opero import opmap\n"
        "def ident(x):\n"
        "    return x\n"
        "mapped = opmap(mode='process', workers=2, retries=0, progress=False)(ident)\n"
        "try:\n"
        "    mapped(range(4))\n"
        "except Exception as exc:\n"
        "    if multiprocessing.current_process().name != 'MainProcess':\n"
        "        raise\n"
        "    print('RAISED', type(exc).__name__, str(exc).replace(chr(10), ' '), flush=True)\n"
    )
    outcome = run_scenario(
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
        args=(str(script),),
        timeout=90,
    )
    raised = [line for line in outcome.lines() if line.startswith("RAISED")]
    assert raised, outcome.stdout + outcome.stderr
    assert "WorkerStartError" in raised[-1]
    assert "__main__" in raised[-1]


# --------------------------------------------------------------------------- sharing, dispatcher


def test_maps_from_several_threads_share_one_process_pool():
    """Maps called at once from several threads on one pool each get their own results."""
    res = result_of(
        """
        def tagged(item):
            time.sleep(0.001)
            return item[0] * 1000 + item[1]

        mapped = opmap(mode="process", workers=2, retries=0, progress=False, chunksize=3)(tagged)
        out = {}

        def go(tag):
            out[tag] = mapped([(tag, i) for i in range(50)])

        threads = [threading.Thread(target=go, args=(tag,)) for tag in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = all(out[tag] == [tag * 1000 + i for i in range(50)] for tag in range(6))
        report(ok=ok, maps=len(out))
        """
    )
    assert res == {"ok": True, "maps": 6}


def test_a_failing_dispatcher_fails_the_map_instead_of_hanging_it():
    """If the pool's dispatcher thread fails, the map raises OperoError and the next map works."""
    res = result_of(
        """
        from opero._map import process_pool as _process_pool
        from opero.errors import OperoError

        mapped = opmap(mode="process", workers=2, retries=0, progress=False)(abs)
        mapped([-1])
        real = _process_pool.ProcessPool._feed
        calls = []

        def broken(self):
            if not calls:
                calls.append(1)
                raise RuntimeError("injected")
            return real(self)

        _process_pool.ProcessPool._feed = broken
        try:
            mapped(range(-5, 0))
            first = "returned"
        except OperoError as exc:
            first = str(exc)
        report(first=first, again=mapped(range(-3, 0)))
        """
    )
    assert "dispatcher failed" in res["first"]
    assert "injected" in res["first"]
    assert res["again"] == [3, 2, 1]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_repeated_interrupts_at_any_point_leave_the_pool_whole(mode):
    """Ctrl-C landing anywhere in 40 maps (queuing, starting, running) leaves a whole pool."""
    outcome = run_scenario(
        PRELUDE
        + textwrap.dedent(
            f"""
            import random
            from opero._map.process_pool import process_pool

            def slow(x):
                time.sleep(0.002)
                return x

            mapped = opmap(mode={mode!r}, workers=3, retries=0, progress=False, chunksize=5)(slow)
            random.seed(7)
            wrong = 0
            for _ in range(40):
                timer = threading.Timer(random.uniform(0.0, 0.05), os.kill,
                                        (os.getpid(), signal.SIGINT))
                try:  # the signal may land anywhere from start() on, even after the map
                    timer.start()
                    wrong += mapped(range(300)) != list(range(300))
                    timer.join()
                    time.sleep(0.05)
                except KeyboardInterrupt:
                    pass
                timer.join()
            final = mapped(range(50)) == list(range(50))
            report(wrong=wrong, final=final, workers=len(process_pool(3).pids()))
            """
        ),
        timeout=120,
    )
    lines = [line[7:] for line in outcome.lines() if line.startswith("RESULT ")]
    assert lines, outcome.stdout + outcome.stderr
    res = json.loads(lines[-1])
    assert res["wrong"] == 0
    assert res["final"]
    assert res["workers"] == (3 if mode == "process" else 0)
    assert "Traceback" not in outcome.stderr  # no worker died of a half-built pool


def test_item_that_cannot_be_unpickled_in_the_worker_fails_only_its_slot():
    """An item that pickles but fails to unpickle in the worker fails alone, named by index."""
    items = [1, 2, h.BadInWorker(), 4, 5]
    with pytest.warns(UserWarning, match="1 of 5 items failed"):
        results = h.p_identity(items)
    assert [r for i, r in enumerate(results) if i != 2] == [1, 2, 4, 5]
    assert isinstance(results[2], ValueError)
    assert any("item 2" in note for note in results[2].__notes__)


def test_result_that_cannot_be_unpickled_in_the_parent_fails_only_its_slot():
    """A result the parent cannot unpickle fails its own item; the rest of its job returns."""
    with pytest.warns(UserWarning, match="1 of 10 items failed"):
        results = h.p_bad_result_on_5(range(10))
    assert [r for i, r in enumerate(results) if i != 5] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert isinstance(results[5], ValueError)


def test_a_worker_that_cannot_be_started_fails_the_map_at_once():
    """If no worker process can be started, the map raises WorkerStartError; a later map works."""
    res = result_of(
        """
        from opero._map import process_pool as _process_pool
        from opero.errors import OperoError

        real = _process_pool.ProcessPool._spawn

        def refuse(self):
            raise OSError(24, "Too many open files")

        _process_pool.ProcessPool._spawn = refuse
        mapped = opmap(mode="process", workers=2, retries=0, progress=False)(abs)
        try:
            mapped(range(-4, 0))
            first = "returned"
        except OperoError as exc:
            first = f"{type(exc).__name__}: {exc}"
        _process_pool.ProcessPool._spawn = real
        report(first=first, again=mapped(range(-3, 0)))
        """
    )
    assert res["first"].startswith("WorkerStartError")
    assert "Too many open files" in res["first"]
    assert res["again"] == [3, 2, 1]


def test_cancelled_amap_on_an_executor_cancels_the_jobs_not_started():
    """Cancelling `await f.amap(...)` with executor= cancels its queued jobs and returns soon."""
    res = result_of(
        """
        from concurrent.futures import ThreadPoolExecutor

        started = []

        def slow(x):
            started.append(x)
            time.sleep(0.1)
            return x

        executor = ThreadPoolExecutor(2)
        mapped = opmap(executor=executor, retries=0, progress=False, chunksize=1)(slow)
        marks = []

        async def main():
            task = asyncio.create_task(mapped.amap(range(200)))
            await asyncio.sleep(0.3)
            marks.append(time.monotonic())
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        cancelled = asyncio.run(main())
        after = time.monotonic() - marks[0]
        at_return = len(started)
        time.sleep(0.3)
        report(cancelled=cancelled, after=after, later=len(started) - at_return,
               started=at_return)
        """
    )
    assert res["cancelled"]
    assert res["after"] < 5.0  # 10 s of work were queued
    assert res["started"] < 50
    assert res["later"] == 0


def test_a_second_dispatcher_thread_on_one_pool_returns_at_once():
    """A duplicate dispatcher (its start was interrupted) exits; maps stay correct."""
    res = result_of(
        """
        from opero._map.process_pool import process_pool

        mapped = opmap(mode="process", workers=2, retries=0, progress=False, chunksize=1)(abs)
        mapped([-1, -2])
        extra = threading.Thread(target=process_pool(2)._dispatch)
        extra.start()
        extra.join(10)
        ok = all(mapped(range(-40, 0)) == list(range(40, 0, -1)) for _ in range(20))
        report(extra_alive=extra.is_alive(), ok=ok)
        """
    )
    assert res == {"extra_alive": False, "ok": True}
