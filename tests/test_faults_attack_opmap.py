"""Hostile pass on @opmap pools and the rate limiters: each test is an attack that broke a build.

Scenarios that can hang (forks, kills, signals) run in their own interpreter with a
deadline (tests/faultkit.py).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import pickle
import sys
from typing import TYPE_CHECKING, Any

import pytest

from faultkit import run_scenario
from opero._ratelimit import SharedTokenBucket
from opero._ratelimit.redis import RedisRateLimiter

if TYPE_CHECKING:
    from conftest import RedisServer  # noqa: F401


# ------------------------------------------------------------ SharedTokenBucket


def test_shared_bucket_lowered_rate_frees_no_extra_burst() -> None:
    """After a burst at 100/s, a drop to 1/s repays the owed tokens at 1/s: no free grants."""
    bucket = SharedTokenBucket(rate=100.0, burst=10)
    try:
        assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
        waits = [bucket.reserve(1.0) for _ in range(5)]
        # The 10 owed tokens take 10 s at 1/s, minus the 9 s of burst tolerance.
        assert all(w > 0.5 for w in waits), waits
        for k in range(1, 5):
            assert waits[k] - waits[k - 1] == pytest.approx(1.0, abs=1e-3)
    finally:
        bucket.close()


def test_shared_bucket_raised_rate_keeps_booked_starts() -> None:
    """After 20 calls booked at 50/s, a rise to 100/s starts the next one after the last booked."""
    bucket = SharedTokenBucket(rate=50.0, burst=1)
    try:
        booked = [bucket.reserve() for _ in range(21)]
        assert booked[20] == pytest.approx(0.4, abs=0.05)
        nxt = bucket.reserve(100.0)
        assert nxt - booked[20] == pytest.approx(0.01, abs=1e-3)
    finally:
        bucket.close()


def test_shared_bucket_alternating_rates_keep_the_window_bound() -> None:
    """Two processes' rates alternating on one bucket never grant more than burst + rate*T."""
    bucket = SharedTokenBucket(rate=1.0, burst=5)
    try:
        waits = [bucket.reserve(1.0 if i % 2 else 1000.0) for i in range(40)]
        # Whatever the order of rates, the free grants cannot exceed the burst plus what
        # the fastest rate earns over the (tiny) time this loop takes.
        assert sum(1 for w in waits if w == 0.0) <= 5 + 2
    finally:
        bucket.close()


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan, math.inf, 1e-320])
def test_shared_bucket_rejects_a_bad_rate_per_decision(rate: float) -> None:
    """reserve(rate) with NaN, 0, a negative, inf or a denormal rate raises, not lifts the limit."""
    bucket = SharedTokenBucket(rate=0.001, burst=1)
    try:
        assert bucket.reserve() == 0.0
        with pytest.raises(ValueError, match="rate"):
            bucket.reserve(rate)
        # The state is intact: the next token is still ~1000 s away.
        assert bucket.reserve() > 900.0
    finally:
        bucket.close()


def _reserve_at(bucket: SharedTokenBucket, rate: float, n: int, out: multiprocessing.Queue) -> None:
    """Reserve ``n`` tokens at ``rate`` in a child; report how many were free."""
    out.put(sum(1 for _ in range(n) if bucket.reserve(rate) == 0.0))


def test_shared_bucket_lowered_rate_across_processes() -> None:
    """A child lowering the rate after the parent's burst gets no free token from the old debt."""
    ctx = multiprocessing.get_context("spawn")
    # The parent's burst leaves 100 s of debt at 0.1/s, ample for a child's start-up.
    bucket = SharedTokenBucket(rate=0.1, burst=10)
    try:
        assert sum(1 for _ in range(10) if bucket.reserve() == 0.0) == 10
        out = ctx.Queue()
        copy = pickle.loads(pickle.dumps(bucket))
        proc = ctx.Process(target=_reserve_at, args=(copy, 0.001, 5, out))
        proc.start()
        free = out.get(timeout=60)
        proc.join(timeout=60)
        assert free == 0
    finally:
        bucket.close()


def test_shared_bucket_survives_its_state_file_being_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A process attaching after the state file was removed starts a new one (logged), no error."""
    import os

    bucket = SharedTokenBucket(rate=0.001, burst=2)
    try:
        assert bucket.reserve() == 0.0
        os.unlink(bucket.path)
        copy = pickle.loads(pickle.dumps(bucket))  # attaches afresh, like a new worker
        with caplog.at_level("WARNING", logger="opero"):
            assert copy.reserve() == 0.0
        assert any("had been removed" in r.getMessage() for r in caplog.records)
        # The new file is shared by every later attacher: its state holds the decision.
        later = pickle.loads(pickle.dumps(bucket))
        assert later.reserve() == 0.0
        assert later.reserve() > 900.0
        copy.close()
        later.close()
    finally:
        bucket.close()
    assert not os.path.exists(bucket.path)


# ------------------------------------------------------------ Redis GCRA


@pytest.mark.redis
def test_redis_lowered_rate_frees_no_extra_burst(redis_url: str) -> None:
    """After a burst at 100/s, a drop to 1/s repays the owed tokens at 1/s: no free grants."""
    limiter = RedisRateLimiter("attack-lower", rate=100, burst=10, url=redis_url)
    assert [limiter.reserve() for _ in range(10)] == [0.0] * 10
    waits = [limiter.reserve(1.0) for _ in range(5)]
    # Round trips take real time, so a little of the debt is repaid meanwhile, but
    # none of it turns into free grants (it gave 9 before the fix).
    assert all(w > 0.2 for w in waits), waits
    for k in range(1, 5):
        assert waits[k] - waits[k - 1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.redis
def test_redis_raised_rate_keeps_booked_starts(redis_url: str) -> None:
    """After 20 calls booked at 50/s, a rise to 100/s starts the next one after the last booked."""
    limiter = RedisRateLimiter("attack-raise", rate=50, burst=1, url=redis_url)
    starts = [sum(limiter.reserve_with_time()) for _ in range(21)]
    now, wait = limiter.reserve_with_time(100.0)
    assert now + wait - starts[20] == pytest.approx(0.01, abs=1e-5)


@pytest.mark.redis
def test_redis_reads_the_state_of_older_versions(redis_url: str) -> None:
    """A bare arrival time (the format before 3.0) is read as booked at the current interval."""
    import redis

    limiter = RedisRateLimiter("attack-old", rate=1, burst=1, url=redis_url)
    now, wait = limiter.reserve_with_time()
    assert wait == 0.0
    raw = redis.Redis.from_url(redis_url)
    # What the old script stored after that one call: TAT = now + 1 s, in microseconds.
    raw.set("{opero:rl:attack-old}", str(int(now * 1e6) + 1_000_000), px=5000)
    assert limiter.reserve() == pytest.approx(1.0, abs=0.1)


# ------------------------------------------------------------ process pool

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX fork and signals")


def _result(source: str, timeout: float = 90.0) -> dict[str, Any]:
    """Run a scenario; return the JSON of its last ``RESULT`` line."""
    outcome = run_scenario(source, timeout=timeout)
    lines = [line[7:] for line in outcome.lines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT (exit {outcome.returncode})\n{outcome.stdout}\n{outcome.stderr}"
    return dict(json.loads(lines[-1]))


@POSIX
@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit"])
def test_result_whose_unpickling_raises_a_base_exception_fails_only_its_item(raised: str) -> None:
    """A result raising KeyboardInterrupt/SystemExit when unpickled fails its item, not the pool."""
    result = _result(
        f"""
        import json, threading, time, warnings
        warnings.simplefilter("ignore")
        from opero import opmap

        def hostile():
            raise {raised}("raised by a result's __reduce__")

        class Hostile:
            def __reduce__(self):
                return (hostile, ())

        def f(x):
            if x == "bad":
                return Hostile()
            if x == "slow":
                time.sleep(1.0)
            return x

        if __name__ == "__main__":
            m = opmap(mode="process", workers=2, progress=False)(f)
            other = {{}}
            t = threading.Thread(target=lambda: other.setdefault("r", m(["slow", 1, 2])))
            t.start()
            time.sleep(0.3)
            mine = m(["bad", 5])
            t.join(60)
            print("RESULT " + json.dumps({{
                "mine": [type(r).__name__ if isinstance(r, BaseException) else r for r in mine],
                "note": str(mine[0]),
                "other": other.get("r"),
                "again": m([7, 8]),
            }}), flush=True)
        """
    )
    assert result["mine"] == ["OperoError", 5]
    assert raised in result["note"]
    assert result["other"] == ["slow", 1, 2]
    assert result["again"] == [7, 8]


@POSIX
def test_process_pool_starts_only_the_workers_its_jobs_need() -> None:
    """workers=10**6 over three items starts three processes, not a million (a fork bomb)."""
    result = _result(
        """
        import json, warnings
        warnings.simplefilter("ignore")
        from opero import opmap
        from opero._map.process_pool import process_pool

        def f(x):
            return x * 2

        if __name__ == "__main__":
            huge = opmap(mode="process", workers=10**6, chunksize=1, progress=False)(f)
            out = huge([1, 2, 3])
            started = len(process_pool(10**6).pids())
            for w in range(1, 9):  # one pool per worker count, each asked for one item
                opmap(mode="process", workers=w, progress=False)(f)([w])
            total = sum(len(process_pool(w).pids()) for w in range(1, 9))
            print("RESULT " + json.dumps({"out": out, "started": started, "total": total}))
        """
    )
    assert result["out"] == [2, 4, 6]
    assert 1 <= result["started"] <= 3
    assert result["total"] == 8


@POSIX
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_callable_rate_that_fails_fails_the_items_in_every_mode(mode: str) -> None:
    """A rate_limit callable that raises or returns NaN fails each item, as in thread mode."""
    result = _result(
        f"""
        import json, warnings
        warnings.simplefilter("ignore")
        from opero import opmap

        def down():
            raise RuntimeError("quota service down")

        def nan():
            return float("nan")

        def f(x):
            return x

        if __name__ == "__main__":
            out = {{}}
            for rate in (down, nan):
                m = opmap(mode={mode!r}, workers=2, rate_limit=rate, retries=0, progress=False)(f)
                try:
                    out[rate.__name__] = [type(r).__name__ for r in m([1, 2])]
                except BaseException as exc:
                    out[rate.__name__] = "raised " + type(exc).__name__
            print("RESULT " + json.dumps(out), flush=True)
        """
    )
    assert result == {
        "down": ["RuntimeError", "RuntimeError"],
        "nan": ["ConfigurationError", "ConfigurationError"],
    }


@POSIX
def test_async_process_worker_death_fails_only_the_items_that_killed_it() -> None:
    """An async_process worker killed by os._exit, SIGKILL or a segfault fails only its item."""
    result = _result(
        """
        import asyncio, ctypes, json, os, signal, warnings
        warnings.simplefilter("ignore")
        from opero import opmap

        async def f(x):
            if x == 5:
                os._exit(9)
            if x == 17:
                os.kill(os.getpid(), signal.SIGKILL)
            if x == 30:
                ctypes.string_at(0)
            await asyncio.sleep(0.001)
            return x * 2

        if __name__ == "__main__":
            m = opmap(mode="async_process", workers=2, retries=0, progress=False)(f)
            out = m(range(40))
            print("RESULT " + json.dumps({
                "failed": [i for i, r in enumerate(out) if isinstance(r, BaseException)],
                "kinds": sorted({type(r).__name__ for r in out if isinstance(r, BaseException)}),
                "right": all(r == 2 * i for i, r in enumerate(out)
                             if not isinstance(r, BaseException)),
                "again": m([1, 2]),
            }), flush=True)
        """,
        timeout=120,
    )
    assert result["failed"] == [5, 17, 30]
    assert result["kinds"] == ["WorkerDiedError"]
    assert result["right"] is True
    assert result["again"] == [2, 4]


@POSIX
def test_ctrl_c_stops_an_async_process_map() -> None:
    """Ctrl-C during an async_process map stops its queued items: no item starts afterwards."""
    result = _result(
        """
        import json, os, signal, tempfile, threading, time, warnings
        warnings.simplefilter("ignore")
        from opero import opmap

        LOG = os.path.join(tempfile.mkdtemp(), "started")

        async def f(x):
            with open(LOG, "a") as log:
                log.write(f"{x}\\n")
            time.sleep(0.05)  # blocks its worker: items run one after another
            return x

        if __name__ == "__main__":
            m = opmap(mode="async_process", workers=2, retries=0, progress=False)(f)
            assert m([1, 2]) == [1, 2]
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            t0 = time.monotonic()
            try:
                m(range(400))
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            took = time.monotonic() - t0
            time.sleep(0.5)  # items already running finish
            with open(LOG) as log:
                at_stop = len(log.read().split())
            time.sleep(1.5)
            with open(LOG) as log:
                later = len(log.read().split())
            print("RESULT " + json.dumps({
                "interrupted": interrupted, "took": took, "at_stop": at_stop, "later": later,
                "again": m([7, 8]),
            }), flush=True)
        """,
        timeout=120,
    )
    assert result["interrupted"] is True
    assert result["later"] == result["at_stop"], "items kept starting after the interrupt"
    assert result["at_stop"] < 400
    assert result["again"] == [7, 8]


@POSIX
def test_nested_process_map_names_the_fix() -> None:
    """A process map called inside a process-map worker fails with an error saying what to use."""
    result = _result(
        """
        import json, warnings
        warnings.simplefilter("ignore")
        from opero import opmap

        def inner(x):
            return x + 1

        def outer(x):
            return opmap(mode="process", workers=2, retries=0, progress=False)(inner)([x])

        if __name__ == "__main__":
            out = opmap(mode="process", workers=2, retries=0, progress=False)(outer)([1, 2])
            errors = [[type(r).__name__, str(r)] for r in out]
            print("RESULT " + json.dumps({"errors": errors}), flush=True)
        """
    )
    errors = result["errors"]
    assert [kind for kind, _ in errors] == ["WorkerStartError", "WorkerStartError"]
    assert all("mode='thread'" in message for _, message in errors)


def test_shared_bucket_alternating_rates_do_not_inflate_the_debt() -> None:
    """Rates going down and up 200 times keep the debt to the tokens reserved (no explosion)."""
    bucket = SharedTokenBucket(rate=200.0, burst=5)
    try:
        waits = [bucket.reserve(200.0 if i % 2 == 0 else 2.0) for i in range(400)]
        # 400 tokens, at worst all at the slow interval: 200 s (it was 1e112 s).
        assert all(math.isfinite(w) and w <= 200.0 for w in waits), max(waits)
        assert waits[-1] > 50.0  # and still a real limit
    finally:
        bucket.close()


@pytest.mark.redis
def test_redis_alternating_rates_do_not_inflate_the_debt(redis_url: str) -> None:
    """Rates going down and up 50 times keep the Redis debt to the tokens reserved."""
    limiter = RedisRateLimiter("attack-alternate", rate=200, burst=5, url=redis_url)
    waits = [limiter.reserve(200.0 if i % 2 == 0 else 2.0) for i in range(100)]
    # 100 tokens, at worst all at the slow interval: 50 s (it grew 100x per cycle).
    assert all(math.isfinite(w) and w <= 50.0 for w in waits), max(waits)
    assert waits[-1] > 10.0


def test_native_bucket_alternating_rates_do_not_inflate_the_debt() -> None:
    """The native bucket's debt stays the tokens reserved when its rate goes down and up."""
    from opero._opero_core import TokenBucket

    bucket = TokenBucket(200.0, 5)
    waits = []
    for i in range(400):
        bucket.set_rate(200.0 if i % 2 == 0 else 2.0)
        waits.append(bucket.reserve())
    assert all(math.isfinite(w) and w <= 200.0 for w in waits), max(waits)
    assert waits[-1] > 50.0


@POSIX
def test_async_process_workers_exit_when_the_parent_is_killed() -> None:
    """async_process workers notice that their parent died (SIGKILL) and exit, not linger."""
    result = _result(
        """
        import json, os, subprocess, sys, time
        code = "\\n".join([
            "import sys, warnings",
            "warnings.simplefilter('ignore')",
            "from opero import opmap",
            "from opero._map import pools as _pools",
            "async def f(x):",
            "    return x",
            "if __name__ == '__main__':",
            "    m = opmap(mode='async_process', workers=2, retries=0, progress=False)(f)",
            "    assert m([1, 2]) == [1, 2]",
            "    pool = _pools._AIO_POOLS[2]",
            "    print(' '.join(str(p.pid) for p in pool.processes), flush=True)",
            "    sys.stdin.read()",
        ])
        import tempfile
        script = os.path.join(tempfile.mkdtemp(), "parent.py")
        with open(script, "w") as fh:
            fh.write(code)
        child = subprocess.Popen(
            [sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        pids = [int(p) for p in child.stdout.readline().split()]
        child.kill()
        child.wait()
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
        for pid in alive:
            os.kill(pid, 9)
        print("RESULT " + json.dumps({"workers": len(pids), "alive": alive}), flush=True)
        """,
        timeout=90,
    )
    assert result["workers"] == 2
    assert result["alive"] == []
