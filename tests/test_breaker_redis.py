"""The Redis-shared circuit breaker: one state for every process, the server's clock, outages."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis

from faultkit import run_scenario
from opero import CircuitBreaker, CircuitOpenError, ConfigurationError, opero

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis


def shared(url: str, name: str = "svc", **kwargs: Any) -> CircuitBreaker:
    """Return a Redis breaker named ``name`` on ``url``."""
    kwargs.setdefault("failures", 2)
    kwargs.setdefault("reset_after", 30.0)
    return CircuitBreaker(name=name, backend="redis", redis_url=url, **kwargs)


def failing(breaker: CircuitBreaker, calls: list[int] | None = None) -> Any:
    """Return a decorated function that always fails with ConnectionError."""

    def down() -> None:
        if calls is not None:
            calls.append(1)
        raise ConnectionError("down")

    return opero(retries=0, circuit_breaker=breaker)(down)


def call(f: Any, *args: Any) -> str:
    """Call ``f``; return its result or the name of the exception it raised."""
    try:
        return str(f(*args))
    except Exception as exc:
        return type(exc).__name__


def test_two_breakers_with_one_name_share_the_state(redis_url: str) -> None:
    """Failures counted through one breaker object open the circuit for another with its name."""
    a, b = shared(redis_url), shared(redis_url)
    other = shared(redis_url, name="other")
    f = failing(a)
    ran: list[int] = []
    g = opero(retries=0, circuit_breaker=b)(lambda: ran.append(1) or "ok")
    assert call(f) == "ConnectionError"
    assert b.failures == 1
    assert call(f) == "ConnectionError"
    assert b.state == "open"
    assert 29.0 < b.retry_after <= 30.0
    assert call(g) == "CircuitOpenError"
    assert ran == []
    assert other.state == "closed"
    b.reset()
    assert a.state == "closed"
    assert call(g) == "ok"


def test_keys_use_a_hash_tag_and_expire(redis_url: str) -> None:
    """The state lives under {opero:cb:<name>} (one Cluster slot), with an expiry."""
    breaker = shared(redis_url, name="tagged", reset_after=5.0)
    call(failing(breaker))
    raw = redis.Redis.from_url(redis_url)
    assert raw.keys("*") == [b"{opero:cb:tagged}"]
    assert 0 < raw.pttl("{opero:cb:tagged}") <= (2 * 5 + 60) * 1000


def test_a_success_resets_the_shared_count(redis_url: str) -> None:
    """A success anywhere resets the shared count of consecutive failures."""
    breaker = shared(redis_url, failures=3)
    state = {"fail": True}

    def flaky() -> str:
        if state["fail"]:
            raise ConnectionError("down")
        return "ok"

    f = opero(retries=0, circuit_breaker=breaker)(flaky)
    call(f)
    call(f)
    assert breaker.failures == 2
    state["fail"] = False
    assert call(f) == "ok"
    assert breaker.failures == 0


def test_half_open_probe_on_the_server_clock(redis_url: str) -> None:
    """After reset_after (server time) one probe runs: a failure reopens, a success closes."""
    breaker = shared(redis_url, failures=1, reset_after=1.0)
    state = {"fail": True, "calls": 0}

    def flaky() -> str:
        state["calls"] += 1
        if state["fail"]:
            raise ConnectionError("down")
        return "ok"

    f = opero(retries=0, circuit_breaker=breaker)(flaky)
    assert call(f) == "ConnectionError"
    assert call(f) == "CircuitOpenError"
    time.sleep(1.05)
    assert breaker.state == "half_open"
    assert call(f) == "ConnectionError"  # the probe failed: open again
    assert breaker.state == "open"
    assert call(f) == "CircuitOpenError"
    time.sleep(1.05)
    state["fail"] = False
    assert call(f) == "ok"
    assert breaker.state == "closed"
    assert state["calls"] == 3


def test_threads_racing_half_open_get_exactly_the_probe_slots(redis_url: str) -> None:
    """Threads at a half-open shared breaker: exactly half_open_calls probes are admitted."""
    # Probe slots live reset_after (2 s): far longer than the race takes.
    breaker = shared(redis_url, failures=1, reset_after=2.0, half_open_calls=2)
    call(failing(breaker))
    time.sleep(2.05)
    guard_results: list[Any] = []
    start = threading.Barrier(10, timeout=30)
    from opero._pipeline.breaker import BreakerGuard

    guard = BreakerGuard(breaker, "t", None)

    def worker() -> None:
        start.wait()
        try:
            guard_results.append(guard.enter())
        except CircuitOpenError:
            guard_results.append("refused")

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    probes = [r for r in guard_results if r != "refused"]
    assert len(probes) == 2
    assert len(set(probes)) == 2


def test_a_crashed_probe_frees_its_slot(redis_url: str) -> None:
    """A probe whose process died holds its slot only until it expires (reset_after)."""
    breaker = shared(redis_url, name="crash", failures=1, reset_after=1.0)
    call(failing(breaker))
    outcome = run_scenario(
        f"""
        import os, time
        from opero import CircuitBreaker
        from opero._pipeline.breaker import BreakerGuard
        b = CircuitBreaker(failures=1, reset_after=1.0, name="crash", backend="redis",
                           redis_url={redis_url!r})
        deadline = time.monotonic() + 30
        while b.state != "half_open" and time.monotonic() < deadline:
            time.sleep(0.02)
        print("probe", bool(BreakerGuard(b, "f", None).enter()))
        os._exit(0)  # dies holding the probe slot
        """,
        timeout=60,
    )
    assert outcome.lines() == ["probe True"], outcome.stderr
    raw = redis.Redis.from_url(redis_url)
    assert raw.zcard("{opero:cb:crash}:probes") == 1  # the dead probe's slot
    f = opero(retries=0, circuit_breaker=breaker)(lambda: "ok")
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen.append(call(f))
        if seen[-1] == "ok":
            break
        time.sleep(0.05)
    assert seen[-1] == "ok"
    assert set(seen[:-1]) <= {"CircuitOpenError"}
    assert breaker.state == "closed"


def test_processes_share_one_state(redis_url: str) -> None:
    """A process that opens the circuit makes another process fail fast, and vice versa."""
    opener = f"""
        from opero import CircuitBreaker, opero
        b = CircuitBreaker(failures=3, reset_after=60, name="proc", backend="redis",
                           redis_url={redis_url!r})
        f = opero(retries=5, min_delay=0, circuit_breaker=b)(lambda: 1 / 0)
        try:
            f()
        except Exception as exc:
            print(type(exc).__name__, b.state)
        """
    outcome = run_scenario(opener, timeout=60)
    assert outcome.lines() == ["CircuitOpenError open"], outcome.stderr
    watcher = f"""
        from opero import CircuitBreaker, opero
        b = CircuitBreaker(failures=3, reset_after=60, name="proc", backend="redis",
                           redis_url={redis_url!r})
        ran = []
        f = opero(retries=0, circuit_breaker=b)(lambda: ran.append(1))
        try:
            f()
        except Exception as exc:
            print(type(exc).__name__, 55 < exc.retry_after <= 60, ran)
        """
    outcome = run_scenario(watcher, timeout=60)
    assert outcome.lines() == ["CircuitOpenError True []"], outcome.stderr
    here = shared(redis_url, name="proc", failures=3, reset_after=60)
    assert here.state == "open"
    assert here.failures == 3


def test_async_functions_use_the_async_client(redis_url: str) -> None:
    """An async function guarded by a Redis breaker opens, refuses and closes it with await."""
    breaker = shared(redis_url, name="async", failures=2, reset_after=1.0)
    state = {"fail": True}

    @opero(retries=0, circuit_breaker=breaker)
    async def get(x: int) -> int:
        await asyncio.sleep(0)
        if state["fail"]:
            raise TimeoutError(x)
        return x

    async def main() -> list[str]:
        seen = []
        for _ in range(3):
            try:
                await get(1)
            except Exception as exc:
                seen.append(type(exc).__name__)
        await asyncio.sleep(1.05)
        state["fail"] = False
        seen.append(str(await get(5)))
        return seen

    assert asyncio.run(main()) == ["TimeoutError", "TimeoutError", "CircuitOpenError", "5"]
    assert breaker.state == "closed"


def test_sync_and_async_functions_share_a_redis_breaker(redis_url: str) -> None:
    """A sync function's failures open a Redis breaker that an async function then meets."""
    breaker = shared(redis_url, name="mixed", failures=2)
    f = failing(breaker)

    @opero(retries=0, circuit_breaker=breaker)
    async def g() -> str:
        return "ok"

    call(f)
    call(f)
    with pytest.raises(CircuitOpenError):
        asyncio.run(g())


def test_redis_client_instead_of_url(redis_url: str) -> None:
    """redis_client= works (sync and asyncio clients) and such a breaker refuses to pickle."""
    client = redis.Redis.from_url(redis_url)
    breaker = CircuitBreaker(1, name="client", backend="redis", redis_client=client)
    call(failing(breaker))
    assert shared(redis_url, name="client").state == "open"
    with pytest.raises(TypeError, match="redis_url"):
        pickle.dumps(breaker)
    by_url = shared(redis_url, name="client")
    clone = pickle.loads(pickle.dumps(by_url))
    assert clone.state == "open"
    with pytest.raises(ConfigurationError, match="redis_url"):
        CircuitBreaker(name="x", backend="redis", redis_url="redis://a", redis_client=client)


def test_redis_down_means_local_state_then_shared_again(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis stopped the local state decides (logged once); once back, Redis decides again."""
    url = restartable_redis.url
    breaker = shared(url, name="outage", failures=2, reset_after=60)
    ran: list[int] = []
    state = {"fail": True}

    def flaky() -> str:
        ran.append(1)
        if state["fail"]:
            raise ConnectionError("down")
        return "ok"

    f = opero(retries=0, circuit_breaker=breaker)(flaky)
    restartable_redis.stop()
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert call(f) == "ConnectionError"
        assert call(f) == "ConnectionError"
        assert call(f) == "CircuitOpenError"  # the local state opened
    outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_logs) == 1
    assert "circuit breaker" in outage_logs[0].getMessage().lower()
    assert len(ran) == 2
    restartable_redis.start()
    breaker.reset()  # the local state closes; Redis is probed again within a second
    state["fail"] = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert call(f) == "ok"
        if not breaker._redis or not breaker._redis.outage.down:
            break
        time.sleep(0.05)
    assert not breaker._redis.outage.down
    other = shared(url, name="outage", failures=2, reset_after=60)
    failing_other = failing(other)
    call(failing_other)
    call(failing_other)
    assert call(f) == "CircuitOpenError"  # shared again: another object's failures count


def test_redis_backend_needs_a_name() -> None:
    """backend='redis' without name= is a ConfigurationError saying why."""
    with pytest.raises(ConfigurationError, match="name="):
        CircuitBreaker(backend="redis")


def test_async_calls_fall_back_to_local_state_while_redis_is_down(
    restartable_redis: RedisServer,
) -> None:
    """Async calls with Redis stopped use the local state and never hang the loop."""
    breaker = shared(restartable_redis.url, name="aoutage", failures=2, reset_after=60)
    ran: list[int] = []

    @opero(retries=0, circuit_breaker=breaker)
    async def get() -> None:
        ran.append(1)
        raise ConnectionError("down")

    async def main() -> list[str]:
        seen = []
        for _ in range(3):
            try:
                await asyncio.wait_for(get(), timeout=30)
            except Exception as exc:
                seen.append(type(exc).__name__)
        return seen

    restartable_redis.stop()
    assert asyncio.run(main()) == ["ConnectionError", "ConnectionError", "CircuitOpenError"]
    assert len(ran) == 2
    assert breaker._redis is not None
    assert breaker._redis.outage.down


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"redis_client": object()}, "redis_client"),
        ({"redis_url": 42}, "redis_url"),
        ({"redis_url": "http://localhost"}, "redis_url"),
        ({"redis_url": "redis://localhost:99999/0"}, "redis_url"),
    ],
)
def test_bad_redis_arguments_name_the_argument(kwargs: dict[str, Any], named: str) -> None:
    """A bad Redis URL or client is a ConfigurationError naming the argument, before connecting."""
    with pytest.raises(ConfigurationError, match=named):
        CircuitBreaker(name="x", backend="redis", **kwargs)


def test_concurrent_processes_open_one_shared_circuit(redis_url: str) -> None:
    """Four processes failing at once open one shared circuit after about `failures` calls."""
    outcome = run_scenario(
        f"""
        import multiprocessing as mp

        def work(queue):
            from opero import CircuitBreaker, CircuitOpenError, opero
            b = CircuitBreaker(failures=5, reset_after=60, name="fleet", backend="redis",
                               redis_url={redis_url!r})
            calls = []
            f = opero(retries=0, circuit_breaker=b)(lambda: calls.append(1) or 1 / 0)
            refused = 0
            for _ in range(25):
                try:
                    f()
                except CircuitOpenError:
                    refused += 1
                except ZeroDivisionError:
                    pass
            queue.put((len(calls), refused))

        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            queue = ctx.Queue()
            procs = [ctx.Process(target=work, args=(queue,)) for _ in range(4)]
            for p in procs:
                p.start()
            results = [queue.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(60)
            print(sum(c for c, _ in results), sum(r for _, r in results))
        """,
        timeout=120,
    )
    calls, refused = (int(x) for x in outcome.lines()[-1].split())
    # 5 failures open it; calls already admitted when it opened may still run (one per
    # other process at most).
    assert 5 <= calls <= 5 + 3, outcome.stdout
    assert calls + refused == 100
    assert shared(redis_url, name="fleet").state == "open"


def test_the_cause_is_forgotten_once_another_process_closed_it(redis_url: str) -> None:
    """A refusal never names a failure from an earlier open period that ended elsewhere."""
    breaker = shared(redis_url, name="cause", failures=1)
    f = failing(breaker)
    call(f)
    with pytest.raises(CircuitOpenError) as info:
        f()
    assert isinstance(info.value.__cause__, ConnectionError)
    shared(redis_url, name="cause").reset()  # closed by another object (another process)
    assert call(opero(retries=0, circuit_breaker=breaker)(lambda: "ok")) == "ok"
    raw = redis.Redis.from_url(redis_url)
    raw.hset("{opero:cb:cause}", mapping={"open_until": 2**52, "failures": 1})  # opened elsewhere
    with pytest.raises(CircuitOpenError) as info:
        f()
    assert info.value.__cause__ is None


def test_a_cancelled_async_probe_through_redis_raises_cancelled(redis_url: str) -> None:
    """Cancelling an async probe of a Redis breaker raises CancelledError and frees its slot."""
    breaker = shared(redis_url, name="acancel", failures=1, reset_after=1.0)
    call(failing(breaker))
    time.sleep(1.05)
    started = asyncio.Event()

    @opero(retries=0, circuit_breaker=breaker)
    async def probe() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    async def main() -> str:
        task = asyncio.ensure_future(probe())
        await started.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            for _ in range(200):  # the slot is given back by a task of its own
                if redis.Redis.from_url(redis_url).zcard("{opero:cb:acancel}:probes") == 0:
                    break
                await asyncio.sleep(0.01)
            return "cancelled"
        return "not cancelled"

    assert asyncio.run(main()) == "cancelled"
    assert redis.Redis.from_url(redis_url).zcard("{opero:cb:acancel}:probes") == 0


def test_a_forked_child_shares_the_parents_redis_breaker(redis_url: str) -> None:
    """After fork() a child keeps using the parent's Redis breaker (new connections, one state)."""
    outcome = run_scenario(
        f"""
        import os
        from opero import CircuitBreaker, opero
        b = CircuitBreaker(failures=2, reset_after=60, name="forked", backend="redis",
                           redis_url={redis_url!r})
        f = opero(retries=0, circuit_breaker=b)(lambda: 1 / 0)
        try:
            f()
        except ZeroDivisionError:
            pass
        pid = os.fork()
        if pid == 0:
            try:
                f()
            except ZeroDivisionError:
                pass
            os._exit(0 if b.state == "open" else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), "parent sees", b.state)
        """,
        timeout=60,
    )
    assert outcome.lines() == ["child 0 parent sees open"], outcome.stderr
