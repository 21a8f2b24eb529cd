"""Single flight under faults: interrupted owners, wait cycles, late lookups, fork and exit.

Scenarios that can hang or crash (exit with busy daemon threads, signals, wait
cycles, fork) run in a fresh interpreter through :mod:`faultkit`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.faultkit import run_scenario

from opero import opero
from opero._opero_core import FlightToken
from opero.cache import MISS, CacheInfo

# ---------------------------------------------------------------------------------------
# Clean exit with daemon threads inside the native miss path (D04)

EXIT_SCENARIO = """
    import sys, threading, time
    from opero import opero

    mode = sys.argv[1]

    class Opaque:  # keyed by its Python __hash__ / __eq__
        def __init__(self, v):
            self.v = v

        def __hash__(self):
            return hash(sum(range(50)) + self.v)

        def __eq__(self, other):
            return isinstance(other, Opaque) and other.v == self.v

    hits = []

    @opero(cache=True, retries=0, cache_max_size=100, on_cache_hit=lambda: hits.append(1))
    def double(x):
        if mode == "sleep":
            time.sleep(0.0005)  # releases the GIL inside the cached call
        return x * 2

    @opero(cache=True, retries=0, cache_max_size=50, cache_key=lambda func, x: ("k", x % 70))
    def keyed(x):
        return x

    def busy():
        i = 0
        while True:
            if mode == "python-keys":  # Python code in the key, the hit callback
                double(Opaque(i % 80))
                keyed(i)
            else:
                double(i % 300)  # 300 keys over 100 slots: every call misses
            i += 1

    for _ in range(4):
        threading.Thread(target=busy, daemon=True).start()
    time.sleep(0.3)
    print("exiting")
"""


@pytest.mark.parametrize(("mode", "runs"), [("waits", 20), ("sleep", 8), ("python-keys", 8)])
def test_exit_with_daemon_threads_in_the_miss_path_is_clean(mode: str, runs: int) -> None:
    """Interpreter exit with daemon threads missing a memory cache ends with status 0, every run."""
    for run in range(runs):
        outcome = run_scenario(EXIT_SCENARIO, timeout=30, args=(mode,))
        assert "exception not rethrown" not in outcome.stderr, f"run {run}: {outcome.stderr}"
        assert outcome.returncode == 0, f"run {run}: status {outcome.returncode}\n{outcome.stderr}"
        assert outcome.lines() == ["exiting"]


# ---------------------------------------------------------------------------------------
# An interrupted owner abandons its flight (D08)


class _DictCache:
    """A user backend's cache: one function's entries in a dict."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        return self.data.get(key, MISS)

    def set(self, key: Any, value: Any) -> None:
        self.data[key] = value

    def delete(self, key: Any) -> bool:
        return self.data.pop(key, MISS) is not MISS

    def clear(self) -> None:
        self.data.clear()

    def info(self) -> CacheInfo:
        return CacheInfo(0, 0, None, len(self.data))

    async def aget(self, key: Any) -> Any:
        return self.get(key)

    async def aset(self, key: Any, value: Any) -> None:
        self.set(key, value)

    async def adelete(self, key: Any) -> bool:
        return self.delete(key)


class _DictBackend:
    """A user backend (the docs' protocol) keeping entries in dicts."""

    stable_keys = False

    def open(self, **_options: Any) -> _DictCache:
        return _DictCache()


def _args_key(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Key a call by its arguments alone (the tests' local functions close over events)."""
    return (args, tuple(sorted(kwargs.items())))


def backend_options(name: str, tmp_path: Path) -> dict[str, Any]:
    """Return the @opero cache options of one backend under test."""
    if name == "memory":
        return {}
    if name == "disk":
        # A local function closing over a threading.Event has no stable identity for a
        # shared cache (docs/caching.md, "Function identity"): it names its key itself.
        return {"cache_backend": "disk", "cache_dir": str(tmp_path), "cache_key": _args_key}
    return {"cache_backend": _DictBackend()}


@pytest.mark.parametrize("backend", ["memory", "disk", "custom"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_an_interrupted_owner_leaves_a_waiter_to_compute(
    backend: str, interrupt: type[BaseException], tmp_path: Path
) -> None:
    """A non-Exception BaseException stays in the owner's thread; waiters get the value."""
    calls: list[str] = []
    waiters_in = threading.Event()

    @opero(cache=True, retries=0, **backend_options(backend, tmp_path))
    def load(key: str) -> str:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "owner":
            waiters_in.wait(5)
            time.sleep(0.2)  # the waiters are now waiting on this flight
            raise interrupt()
        return "value"

    got: dict[str, str] = {}

    def call() -> None:
        name = threading.current_thread().name
        try:
            got[name] = load("cfg")
        except BaseException as exc:  # what reaches each thread is the point
            got[name] = type(exc).__name__

    owner = threading.Thread(target=call, name="owner")
    owner.start()
    while not calls:
        time.sleep(0.005)
    waiters = [threading.Thread(target=call, name=f"w{i}") for i in range(3)]
    for waiter in waiters:
        waiter.start()
    waiters_in.set()
    for thread in (owner, *waiters):
        thread.join(10)
    assert got.pop("owner") == interrupt.__name__
    assert got == {"w0": "value", "w1": "value", "w2": "value"}
    assert calls[0] == "owner"
    assert 2 <= len(calls) <= 4  # the owner, then one waiter per abandoned flight at most


def test_an_exception_of_the_owner_still_reaches_the_waiters() -> None:
    """An ordinary Exception of the owner is shared with the waiters (not recomputed)."""
    calls = []
    release = threading.Event()

    @opero(cache=True, retries=0)
    def load(key: str) -> str:
        calls.append(key)
        release.wait(5)
        raise ValueError("boom")

    got: list[str] = []

    def call() -> None:
        try:
            load("cfg")
        except ValueError as exc:
            got.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(4)]
    threads[0].start()
    while not calls:
        time.sleep(0.005)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(10)
    assert got == ["boom"] * 4
    assert calls == ["cfg"]


SIGINT_SCENARIO = """
    import contextlib, os, signal, threading, time
    from opero import opero

    @opero(cache=True, retries=0)
    def load(key):
        time.sleep(0.3)
        return "value"

    got = []

    def worker():
        try:
            got.append(load("cfg"))
        except BaseException as exc:
            got.append(type(exc).__name__)

    workers = [threading.Thread(target=worker) for _ in range(3)]
    threading.Timer(0.05, lambda: [w.start() for w in workers]).start()
    threading.Timer(0.15, os.kill, (os.getpid(), signal.SIGINT)).start()
    interrupted = False
    try:
        load("cfg")
    except KeyboardInterrupt:
        interrupted = True
    for w in workers:
        w.join(10)
    print(interrupted, sorted(got))
"""


def test_ctrl_c_of_the_owner_is_not_raised_in_the_waiting_threads() -> None:
    """SIGINT interrupts only the main thread's computation; the waiters return the value."""
    outcome = run_scenario(SIGINT_SCENARIO, timeout=60)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["True ['value', 'value', 'value']"]


def test_a_cancelled_owner_task_leaves_a_waiting_task_to_compute() -> None:
    """Cancelling the computing task makes a waiting task compute, not inherit the cancellation."""
    calls: list[int] = []

    @opero(cache=True, retries=0)
    async def load(key: str) -> str:
        calls.append(1)
        await asyncio.sleep(0.2)
        return "value"

    async def main() -> list[Any]:
        owner = asyncio.create_task(load("cfg"))
        await asyncio.sleep(0.05)
        waiters = [asyncio.create_task(load("cfg")) for _ in range(3)]
        await asyncio.sleep(0.05)
        owner.cancel()
        results = await asyncio.gather(owner, *waiters, return_exceptions=True)
        return [type(r).__name__ if isinstance(r, BaseException) else r for r in results]

    assert asyncio.run(main()) == ["CancelledError", "value", "value", "value"]
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------
# Wait cycles across threads (D13)

CYCLE_SCENARIO = """
    import sys, tempfile, threading
    from opero import opero

    first, second = sys.argv[1], sys.argv[2]
    cache_dir = tempfile.mkdtemp()

    def options(kind):
        if kind == "disk":
            return {"cache_backend": "disk", "cache_dir": cache_dir}
        return {}

    both_inside = threading.Barrier(2, timeout=10)

    @opero(cache=True, retries=0, **options(first))
    def user(uid):
        if threading.current_thread().name != "A":
            return {"uid": uid, "account": None}
        both_inside.wait()  # thread B is now computing account(uid)
        return {"uid": uid, "account": account(uid)}

    @opero(cache=True, retries=0, **options(second))
    def account(uid):
        if threading.current_thread().name != "B":
            return {"uid": uid, "owner": None}
        both_inside.wait()  # thread A is now computing user(uid)
        return {"uid": uid, "owner": user(uid)}

    out = {}
    a = threading.Thread(target=lambda: out.__setitem__("A", user(1)), name="A", daemon=True)
    b = threading.Thread(target=lambda: out.__setitem__("B", account(1)), name="B", daemon=True)
    a.start(); b.start()
    a.join(20); b.join(20)
    print(sorted(out))
    print(out["A"]["account"]["uid"], out["B"]["owner"]["uid"])
"""


@pytest.mark.parametrize(
    ("first", "second"),
    [("memory", "memory"), ("disk", "disk"), ("memory", "disk"), ("disk", "memory")],
)
def test_a_wait_cycle_across_threads_computes_directly(first: str, second: str) -> None:
    """user(1) -> account(1) in one thread and account(1) -> user(1) in another both finish."""
    outcome = run_scenario(CYCLE_SCENARIO, timeout=60, args=(first, second))
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["['A', 'B']", "1 1"]


THREE_CYCLE_SCENARIO = """
    import threading
    from opero import opero

    inside = threading.Barrier(3, timeout=10)
    calls = []

    def make(name, nxt):
        @opero(cache=True, retries=0)
        def step(uid):
            calls.append(name)
            if threading.current_thread().name != name:
                return [name]
            inside.wait()  # every thread now computes its own step
            return [name, *steps[nxt](uid)]
        return step

    steps = {"a": make("a", "b"), "b": make("b", "c"), "c": make("c", "a")}
    out = {}
    threads = [
        threading.Thread(target=lambda n=n: out.__setitem__(n, steps[n](1)), name=n, daemon=True)
        for n in "abc"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    print(sorted(out), all(len(v) >= 2 for v in out.values()))
"""


def test_a_three_thread_wait_cycle_finishes() -> None:
    """Steps a -> b -> c -> a, each entered from its own thread, finish instead of deadlocking."""
    outcome = run_scenario(THREE_CYCLE_SCENARIO, timeout=60)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["['a', 'b', 'c'] True"]


def test_a_wait_cycle_across_tasks_computes_directly() -> None:
    """Two async cached functions needing each other, from two tasks, both finish."""

    @opero(cache=True, retries=0)
    async def user(uid: int) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        name = asyncio.current_task().get_name()  # type: ignore[union-attr]
        return {"uid": uid, "account": await account(uid) if name == "A" else None}

    @opero(cache=True, retries=0)
    async def account(uid: int) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        name = asyncio.current_task().get_name()  # type: ignore[union-attr]
        return {"uid": uid, "owner": await user(uid) if name == "B" else None}

    async def main() -> list[Any]:
        a = asyncio.create_task(user(1), name="A")
        b = asyncio.create_task(account(1), name="B")
        return list(await asyncio.wait_for(asyncio.gather(a, b), 10))

    got_user, got_account = asyncio.run(main())
    assert got_user["account"]["owner"]["uid"] == 1
    assert got_account["owner"]["account"] is None


def test_flight_tokens_refuse_the_wait_that_closes_a_cycle() -> None:
    """A thread may wait on another's token unless that thread waits on it."""
    mine = FlightToken()
    assert mine.owner == threading.get_ident()
    assert not mine.wait_begin()  # waiting on yourself
    theirs: list[FlightToken] = []
    made = threading.Event()
    release = threading.Event()
    answer: list[bool] = []

    def other() -> None:
        theirs.append(FlightToken())
        made.set()
        release.wait(5)
        answer.append(mine.wait_begin())  # would close the cycle: refused
        theirs[0].finish()

    thread = threading.Thread(target=other)
    thread.start()
    made.wait(5)
    assert theirs[0].wait_begin()  # this thread now waits on the other one
    release.set()
    thread.join(5)
    theirs[0].wait_end()
    assert answer == [False]
    assert theirs[0].done
    assert not theirs[0].forked


# ---------------------------------------------------------------------------------------
# The winner of a flight looks at the cache again (D14)


class _LateMissCache(_DictCache):
    """A GET from thread "B" answers MISS only after thread "A" has stored and left."""

    def __init__(self) -> None:
        super().__init__()
        self.a: threading.Thread | None = None

    def get(self, key: Any) -> Any:
        value = super().get(key)
        if threading.current_thread().name == "B" and self.a is not None:
            self.a.join(10)  # the answer arrives after A stored the value and left
        return value


class _LateMissBackend:
    stable_keys = False

    def __init__(self) -> None:
        self.cache = _LateMissCache()

    def open(self, **_options: Any) -> _LateMissCache:
        return self.cache


class _LateMissRedis(redis.Redis):
    """A client whose GET replies from thread "B" arrive after thread "A" has left."""

    a: threading.Thread | None = None

    def get(self, name: Any) -> Any:
        value = super().get(name)
        if threading.current_thread().name == "B" and _LateMissRedis.a is not None:
            _LateMissRedis.a.join(10)
        return value


def late_second_caller(options: dict[str, Any], set_a: Any) -> list[str]:
    """Return the computations when B's lookup reads before A stores but answers after A left."""
    calls: list[str] = []
    b_read = threading.Event()

    @opero(cache=True, retries=0, **options)
    def report(day: str) -> str:
        calls.append(threading.current_thread().name)
        b_read.wait(0.3)  # B's lookup reads while this computation runs
        return f"report {day}"

    results: dict[str, str] = {}
    a = threading.Thread(target=lambda: results.__setitem__("A", report("mon")), name="A")
    b = threading.Thread(target=lambda: results.__setitem__("B", report("mon")), name="B")
    set_a(a)
    a.start()
    while not calls:
        time.sleep(0.005)
    b.start()
    time.sleep(0.1)
    b_read.set()
    a.join(10)
    b.join(10)
    assert results == {"A": "report mon", "B": "report mon"}
    return calls


def test_a_custom_backend_flight_rechecks_the_cache() -> None:
    """A miss answered after another thread stored the value returns it instead of recomputing."""
    backend = _LateMissBackend()

    def set_a(a: threading.Thread) -> None:
        backend.cache.a = a

    assert late_second_caller({"cache_backend": backend}, set_a) == ["A"]


def test_a_redis_flight_rechecks_the_cache(redis_url: str) -> None:
    """On Redis a late MISS reply does not recompute a value stored meanwhile."""
    client = _LateMissRedis.from_url(redis_url)

    def set_a(a: threading.Thread) -> None:
        _LateMissRedis.a = a

    try:
        options = {"cache_backend": "redis", "cache_redis_url": client, "cache_key": _args_key}
        assert late_second_caller(options, set_a) == ["A"]
    finally:
        _LateMissRedis.a = None
        client.close()


class _GatedCache(_DictCache):
    """A GET answers only once ``gate`` is set (what it read before stays the answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = threading.Event()
        self.gate = threading.Event()

    def get(self, key: Any) -> Any:
        value = super().get(key)
        if threading.current_thread().name == "B":
            self.read.set()
            self.gate.wait(10)
        return value


class _GatedBackend:
    stable_keys = False

    def __init__(self) -> None:
        self.cache = _GatedCache()

    def open(self, **_options: Any) -> _GatedCache:
        return self.cache


def test_a_value_stored_outside_a_flight_is_found_by_the_winner() -> None:
    """A value stored by cache_store (as @opmap does) during a lookup is returned, not computed."""
    backend = _GatedBackend()
    calls: list[str] = []

    @opero(cache=True, retries=0, cache_backend=backend)
    def report(day: str) -> str:
        calls.append(day)
        return f"computed {day}"

    got: list[str] = []
    b = threading.Thread(target=lambda: got.append(report("mon")), name="B")
    b.start()
    assert backend.cache.read.wait(10)  # B's lookup has read: MISS
    report.__opero__.cache_store(("mon",), {}, "stored mon")
    backend.cache.gate.set()
    b.join(10)
    assert got == ["stored mon"]
    assert calls == []


def test_disk_single_flight_computes_each_key_once_under_load(tmp_path: Path) -> None:
    """16 threads calling each of 300 keys at random moments compute every key exactly once."""
    import random
    from collections import Counter

    calls: Counter[int] = Counter()
    lock = threading.Lock()

    @opero(
        cache=True, cache_backend="disk", cache_dir=str(tmp_path), retries=0, cache_key=_args_key
    )
    def compute(key: int) -> int:
        with lock:
            calls[key] += 1
        time.sleep(0.005)
        return key

    rounds, threads = 300, 16
    barrier = threading.Barrier(threads)
    wrong: list[int] = []

    def worker() -> None:
        rng = random.Random()
        for key in range(rounds):
            barrier.wait(30)
            time.sleep(rng.uniform(0, 0.008))
            if compute(key) != key:
                wrong.append(key)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    assert not wrong
    assert len(calls) == rounds
    assert {key: n for key, n in calls.items() if n > 1} == {}


# ---------------------------------------------------------------------------------------
# fork() while threads use a cached function (D02)

FORK_SCENARIO = """
    import os, signal, sys, tempfile, threading, time, warnings
    from opero import opero
    from opero.cache import MISS, CacheInfo

    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads

    def fork_and_call(call, limit):
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(limit)
                call()
                os._exit(0)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            return "hung"
        return "finished" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"

    class LruCache:  # a user backend's cache: 100 entries, Python-level single flight
        def __init__(self):
            self.data = {}

        def get(self, key):
            return self.data.get(key, MISS)

        def set(self, key, value):
            self.data[key] = value
            while len(self.data) > 100:
                self.data.pop(next(iter(self.data)), None)

        def delete(self, key):
            return self.data.pop(key, MISS) is not MISS

        def clear(self):
            self.data.clear()

        def info(self):
            return CacheInfo(0, 0, 100, len(self.data))

    class LruBackend:
        stable_keys = False

        def open(self, **options):
            return LruCache()

    def options(kind):
        if kind == "disk":
            return {"cache_backend": "disk", "cache_dir": tempfile.mkdtemp()}
        if kind == "custom":
            return {"cache_backend": LruBackend()}
        return {"cache_max_size": 100}

    case, kind = sys.argv[1], sys.argv[2]
    if case == "busy":
        @opero(cache=True, retries=0, **options(kind))
        def double(x):
            return x * 2

        stop = threading.Event()

        def busy():
            i = 0
            while not stop.is_set():
                double(i % 300)
                i += 1

        threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        outcomes = []
        for _ in range(int(sys.argv[3])):
            time.sleep(0.01)
            outcomes.append(fork_and_call(lambda: [double(i) for i in range(300)], 10))
        stop.set()
        for t in threads:
            t.join(10)
        print(sorted(set(outcomes)), len(outcomes))
    elif case == "inflight":
        @opero(cache=True, retries=0, **options(kind))
        def load(key):
            time.sleep(1.0)
            return f"value of {key}"

        helper = threading.Thread(target=load, args=("cfg",), daemon=True)
        helper.start()
        time.sleep(0.2)  # the helper is now computing "cfg"
        print(fork_and_call(lambda: load("cfg"), 15))
        helper.join(10)
        print(load("cfg"))
    else:  # the computing thread itself forks; the child uses the key and the flight
        forked, results = [], []
        computing = threading.Event()

        @opero(cache=True, retries=0, **options(kind))
        def load(key):
            if not forked:
                forked.append(True)
                computing.set()
                time.sleep(0.2)  # the waiter thread now waits on this flight
                results.append(fork_and_call(lambda: load("cfg"), 15))
            return f"value of {key}"

        def wait_then_call():
            computing.wait(5)
            results.append(load("cfg"))

        waiter = threading.Thread(target=wait_then_call, daemon=True)
        waiter.start()
        first = load("cfg")
        waiter.join(10)
        print(results[0], first, results[-1])
"""


@pytest.mark.parametrize("kind", ["memory", "custom"])
def test_forked_children_of_busy_threads_finish_their_calls(kind: str) -> None:
    """Forks while four threads miss the cache leave every child able to use it."""
    outcome = run_scenario(FORK_SCENARIO, timeout=120, args=("busy", kind, "40"))
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["['finished'] 40"]


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_child_forked_during_a_call_computes_the_key_itself(kind: str) -> None:
    """A key in flight in a parent thread at fork time is computed by the child, not waited on."""
    outcome = run_scenario(FORK_SCENARIO, timeout=60, args=("inflight", kind))
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["finished", "value of cfg"]


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_the_computing_thread_may_fork(kind: str) -> None:
    """A child forked by the thread computing a key can call it; the parent's flight completes."""
    outcome = run_scenario(FORK_SCENARIO, timeout=60, args=("self", kind))
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["finished value of cfg value of cfg"]


STUCK_OWNER_SCENARIO = """
    import threading
    from opero._pipeline.singleflight import ThreadFlight, _Flight

    flight = ThreadFlight()

    def interrupted_owner(key, value=None, abandoned=False):
        # What an owner leaves when a second Ctrl-C stops it right after it
        # finished its token: outcome published, event unset, still listed.
        def own():
            stuck = flight._flights[key] = _Flight()
            stuck.value, stuck.abandoned = value, abandoned
            stuck.token.finish()
        thread = threading.Thread(target=own)
        thread.start()
        thread.join()

    interrupted_owner("done", value="published")
    interrupted_owner("abandoned", abandoned=True)
    print(flight.do("done", lambda: "computed"))
    print(flight.do("abandoned", lambda: "computed"))
    print(sorted(flight._flights))
"""


def test_an_owner_stopped_before_cleaning_up_leaves_no_caller_stuck() -> None:
    """A finished flight left listed with its event unset is read, or taken over when abandoned."""
    outcome = run_scenario(STUCK_OWNER_SCENARIO, timeout=30)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["published", "computed", "[]"]
