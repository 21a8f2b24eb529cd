"""Hostile-user attacks on ``CircuitBreaker``: each test is a defect found and fixed (or xfailed).

Hang-prone scenarios (deadlocks, cancellation, signals) run through
:func:`faultkit.run_scenario` with a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import pytest
import redis

from faultkit import run_scenario
from opero import CircuitBreaker, CircuitOpenError, ConfigurationError, opero
from opero._pipeline.breaker import BreakerGuard

if TYPE_CHECKING:
    from conftest import RedisServer


class Clock:
    """A manual clock for a breaker's local state."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        """Return the current manual time."""
        return self.now


def _open_breaker(
    failures: int = 1, reset_after: float = 10.0, **kw: Any
) -> tuple[CircuitBreaker, Clock]:
    breaker = CircuitBreaker(failures=failures, reset_after=reset_after, **kw)
    clock = Clock()
    breaker._clock = clock
    return breaker, clock


def _trip(breaker: CircuitBreaker, clock: Clock) -> None:
    """Open ``breaker`` with one failure of a throwaway function, then reach half-open."""

    @opero(retries=0, circuit_breaker=breaker)
    def down() -> None:
        raise ConnectionError("down")

    for _ in range(breaker.failure_threshold):
        with pytest.raises(ConnectionError):
            down()
    assert breaker.state == "open"
    clock.now += breaker.reset_after + 1
    assert breaker.state == "half_open"


# --- a probe admitted, then the step before the call raises: its slot must come back ---


def test_probe_slot_returned_when_the_rate_limit_key_function_raises() -> None:
    """A half-open probe whose rate-limit key function raises gives its slot back (no call)."""
    breaker, clock = _open_breaker()
    _trip(breaker, clock)
    bad = [True]

    def key(x: int) -> str:
        if bad[0]:
            raise ValueError("key function failed")
        return str(x)

    @opero(retries=0, circuit_breaker=breaker, rate_limit=1000, rate_limit_key=key)
    def fetch(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="key function failed"):
        fetch(1)
    assert breaker._probes == {}
    bad[0] = False
    assert fetch(2) == 2  # the next call is the probe, and it closes the circuit
    assert breaker.state == "closed"


def test_probe_slot_returned_when_the_token_wait_is_interrupted() -> None:
    """A probe interrupted (KeyboardInterrupt) while sleeping for its token gives its slot back."""
    breaker, clock = _open_breaker()
    _trip(breaker, clock)
    interrupt = [True]

    def sleep(seconds: float) -> None:
        if interrupt[0]:
            raise KeyboardInterrupt

    @opero(retries=0, circuit_breaker=breaker, rate_limit=1, rate_burst=1, _sleep=sleep)
    def fetch(x: int) -> int:
        return x

    assert fetch(0) == 0  # the probe closes it and takes the only token
    _trip(breaker, clock)
    with pytest.raises(KeyboardInterrupt):
        fetch(1)  # the probe must wait for a token: interrupted there
    assert breaker._probes == {}
    assert breaker.state == "half_open"
    interrupt[0] = False
    assert fetch(2) == 2
    assert breaker.state == "closed"


def test_async_probe_slot_returned_when_cancelled_waiting_for_its_token() -> None:
    """An async probe cancelled while it waits for a rate-limit token gives its slot back."""
    breaker, clock = _open_breaker()

    @opero(retries=0, circuit_breaker=breaker, rate_limit=0.5, rate_burst=1)
    async def fetch(x: int) -> int:
        return x

    async def main() -> None:
        assert await fetch(0) == 0  # takes the only token
        _trip(breaker, clock)
        task = asyncio.create_task(fetch(1))  # the probe waits ~2 s for a token
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(breaker._probes) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker._probes == {}

    asyncio.run(main())
    assert breaker.state == "half_open"


def test_retry_loop_probe_slot_returned_when_its_token_wait_is_interrupted() -> None:
    """A retry-loop probe interrupted while it waits for its token gives its slot back."""
    breaker, clock = _open_breaker(failure_on=ConnectionError)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # the backoff passes; the probe's token wait is interrupted
            raise KeyboardInterrupt

    @opero(retries=0, circuit_breaker=breaker)
    def other() -> None:
        raise ConnectionError("down")

    calls: list[int] = []

    @opero(
        retries=2,
        min_delay=1.0,
        rate_limit=1,
        rate_burst=1,
        circuit_breaker=breaker,
        _sleep=sleep,
    )
    def fetch(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            # Admitted while closed: open it through another function, let it
            # half-open, and fail with an error outside failure_on (not counted).
            with pytest.raises(ConnectionError):
                other()
            clock.now += breaker.reset_after + 1
            raise ValueError("bad input")
        return x

    with pytest.raises(KeyboardInterrupt):
        fetch(1)  # attempt 2 is a probe, interrupted in its token wait
    assert calls == [1]
    assert len(sleeps) == 2
    assert breaker._probes == {}
    assert breaker.state == "half_open"


def test_async_retry_loop_probe_slot_returned_when_cancelled_in_its_token_wait() -> None:
    """An async retry-loop probe cancelled while it waits for its token gives its slot back."""
    breaker, clock = _open_breaker(failure_on=ConnectionError)
    forever = asyncio.Event()
    sleeps: list[float] = []

    async def asleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # the backoff passes; the probe's token wait hangs
            await forever.wait()

    @opero(retries=0, circuit_breaker=breaker)
    async def other() -> None:
        raise ConnectionError("down")

    calls: list[int] = []

    @opero(
        retries=2,
        min_delay=1.0,
        rate_limit=1,
        rate_burst=1,
        circuit_breaker=breaker,
        _asleep=asleep,
    )
    async def fetch(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            with pytest.raises(ConnectionError):
                await other()
            clock.now += breaker.reset_after + 1
            raise ValueError("bad input")
        return x

    async def main() -> None:
        task = asyncio.create_task(fetch(1))
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(sleeps) == 2
        assert len(breaker._probes) == 1  # the probe waits for its token
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker._probes == {}

    asyncio.run(main())
    assert calls == [1]
    assert breaker.state == "half_open"


# --- admitted before a backoff wait, called after it: the circuit may have opened -----


def test_a_retry_after_its_backoff_is_refused_if_the_circuit_opened_meanwhile() -> None:
    """A retry asks the breaker after its backoff: opened meanwhile, the function is not called."""
    breaker, _ = _open_breaker(failures=2)

    @opero(retries=0, circuit_breaker=breaker)
    def other() -> None:
        raise ConnectionError("down")

    def sleep(seconds: float) -> None:
        with pytest.raises(ConnectionError):
            other()  # other callers open the circuit during this backoff

    states: list[str] = []

    @opero(retries=1, min_delay=1.0, circuit_breaker=breaker, _sleep=sleep)
    def fetch() -> None:
        states.append(breaker.state)
        raise ConnectionError("down")

    with pytest.raises(CircuitOpenError):
        fetch()
    assert states == ["closed"]


def test_an_async_retry_after_its_backoff_is_refused_if_the_circuit_opened_meanwhile() -> None:
    """An async retry asks the breaker after its backoff: opened meanwhile, no call is made."""
    breaker, _ = _open_breaker(failures=2)

    @opero(retries=0, circuit_breaker=breaker)
    async def other() -> None:
        raise ConnectionError("down")

    async def asleep(seconds: float) -> None:
        with pytest.raises(ConnectionError):
            await other()

    states: list[str] = []

    @opero(retries=1, min_delay=1.0, circuit_breaker=breaker, _asleep=asleep)
    async def fetch() -> None:
        states.append(breaker.state)
        raise ConnectionError("down")

    with pytest.raises(CircuitOpenError):
        asyncio.run(fetch())
    assert states == ["closed"]


def test_a_retry_is_refused_before_its_backoff_when_the_circuit_is_already_open() -> None:
    """A retry of a call whose failure opened the circuit ends at once, without the backoff."""
    breaker, _ = _open_breaker(failures=1)
    sleeps: list[float] = []

    @opero(retries=3, min_delay=5.0, circuit_breaker=breaker, _sleep=sleeps.append)
    def fetch() -> None:
        raise ConnectionError("down")

    with pytest.raises(CircuitOpenError):
        fetch()
    assert sleeps == []


# --- no lock held across user code ----------------------------------------------------


def test_a_cause_whose_del_calls_the_guarded_function_does_not_deadlock() -> None:
    """Dropping the failure that opened the circuit runs its ``__del__`` outside the lock."""
    outcome = run_scenario(
        """
        from opero import CircuitBreaker, opero

        breaker = CircuitBreaker(failures=1, reset_after=60.0)

        class Down(ConnectionError):
            def __del__(self):
                try:
                    print("del called:", ping(0), flush=True)
                except Exception as exc:
                    print("del called:", type(exc).__name__, flush=True)

        @opero(retries=0, circuit_breaker=breaker)
        def ping(x):
            if x:
                raise Down("down")
            return "pong"

        try:
            ping(1)
        except Down:
            pass
        breaker.reset()  # drops the cause (the last reference to the Down)
        print("reset:", breaker.state, flush=True)
        try:
            ping(1)
        except Down:
            pass
        breaker._clock = lambda: 1e12  # half-open: the probe fails and replaces the cause
        try:
            ping(1)
        except Down:
            pass
        print("reopened:", breaker.state, flush=True)
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    lines = outcome.lines()
    assert lines[:2] == ["del called: pong", "reset: closed"]
    assert "reopened: open" in lines
    assert lines[2:4] == ["del called: CircuitOpenError", "reopened: open"]


# --- values that were accepted and failed (or misbehaved) later -----------------------


@pytest.mark.parametrize("reset_after", [5e-324, 1e-300, 1e-7, 0.0009])
def test_a_reset_after_below_a_millisecond_is_refused(reset_after: float) -> None:
    """A ``reset_after`` shorter than the clock's resolution is refused, naming the minimum."""
    with pytest.raises(ConfigurationError, match=r"reset_after=.*>= 0\.001"):
        CircuitBreaker(reset_after=reset_after)
    assert CircuitBreaker(reset_after=0.001).reset_after == 0.001


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_name_with_a_lone_surrogate_is_refused(backend: str) -> None:
    """A name that cannot be a Redis key or a log line fails at construction, not at each call."""
    with pytest.raises(ConfigurationError, match=r"CircuitBreaker\(name=.*UTF-8"):
        CircuitBreaker(name="payments\udc80", backend=backend)
    assert CircuitBreaker(name="paiements-\u00e9\u2603", backend=backend).name.endswith("\u2603")


@pytest.mark.redis
def test_tiny_reset_after_in_redis_keeps_the_probe_limit(redis_url: str) -> None:
    """At the shortest ``reset_after`` a Redis probe holds its slot for 1 ms of server time."""
    breaker = CircuitBreaker(
        failures=1, reset_after=0.001, name="tiny", backend="redis", redis_url=redis_url
    )
    raw = redis.Redis.from_url(redis_url)
    guard = BreakerGuard(breaker, "tests.tiny", None)
    guard.failed(ConnectionError("down"), 0, (), {})
    time.sleep(0.01)

    def server_us() -> int:
        seconds, micros = raw.time()
        return int(seconds) * 1_000_000 + int(micros)

    before = server_us()
    first = guard.enter()
    after = server_us()
    assert isinstance(first, str)  # a probe admitted through Redis
    ((member, expires),) = raw.zrange("{opero:cb:tiny}:probes", 0, -1, withscores=True)
    assert member.decode() == first
    # Its slot lives reset_after (1000 us) from admission: not 0 us (no limit at all).
    assert before + 1000 <= expires <= after + 1000


@pytest.mark.redis
def test_a_wrongtype_key_is_not_an_outage_for_every_breaker(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program's value under one breaker's key leaves the other breakers on Redis."""
    raw = redis.Redis.from_url(redis_url)
    raw.set("{opero:cb:clash}", "not a hash")
    clash = CircuitBreaker(failures=1, name="clash", backend="redis", redis_url=redis_url)
    other = CircuitBreaker(failures=1, name="other", backend="redis", redis_url=redis_url)

    @opero(retries=0, circuit_breaker=clash)
    def ping() -> str:
        return "pong"

    @opero(retries=0, circuit_breaker=other)
    def down() -> None:
        raise ConnectionError("down")

    with caplog.at_level(logging.WARNING, logger="opero"):
        assert ping() == "pong"  # the local state decides for the clashing breaker
        assert ping() == "pong"
        with pytest.raises(ConnectionError):
            down()
    assert raw.hget("{opero:cb:other}", "failures") == b"1"  # the other one used Redis
    assert other.state == "open"
    clashes = [r for r in caplog.records if "holds a value of another type" in r.getMessage()]
    assert len(clashes) == 1
    assert clashes[0].levelno == logging.ERROR
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
    clash.reset()  # deletes only a breaker's own keys: the other program's value stays
    assert raw.get("{opero:cb:clash}") == b"not a hash"
    other.reset()
    assert raw.exists("{opero:cb:other}") == 0


@pytest.mark.redis
def test_local_failures_of_one_outage_do_not_carry_into_the_next(
    restartable_redis: RedisServer,
) -> None:
    """Once Redis decides again the local state is forgotten: a later outage starts closed at 0."""
    breaker = CircuitBreaker(
        failures=2, reset_after=60, name="twice", backend="redis", redis_url=restartable_redis.url
    )
    state = {"fail": True}

    @opero(retries=0, circuit_breaker=breaker)
    def flaky() -> str:
        if state["fail"]:
            raise ConnectionError("down")
        return "ok"

    def call() -> str:
        try:
            return flaky()
        except Exception as exc:
            return type(exc).__name__

    assert breaker._redis is not None
    restartable_redis.stop()
    assert call() == "ConnectionError"  # counted locally: 1 of 2
    assert breaker._failures == 1
    restartable_redis.start()
    state["fail"] = False
    time.sleep(1.2)  # past the outage's 1 s retry interval: the next call asks Redis
    assert call() == "ok"  # decided by Redis (a success there does not touch local state)
    assert not breaker._redis.outage.down
    assert breaker._failures == 0
    restartable_redis.stop()
    state["fail"] = True
    assert call() == "ConnectionError"  # 1 of 2 in the second outage: still closed
    assert call() == "ConnectionError"  # 2 of 2: now it opens
    assert call() == "CircuitOpenError"


# --- a Redis probe that is interrupted or cancelled gives its slot back there too -----


@pytest.mark.redis
def test_an_interrupted_sync_redis_probe_gives_its_slot_back(redis_url: str) -> None:
    """A sync probe admitted through Redis and interrupted frees its Redis slot at once."""
    breaker = CircuitBreaker(
        failures=1, reset_after=30.0, name="sint", backend="redis", redis_url=redis_url
    )
    raw = redis.Redis.from_url(redis_url)
    mode = ["fail"]

    @opero(retries=0, circuit_breaker=breaker)
    def probe() -> str:
        if mode[0] == "fail":
            raise ConnectionError("down")
        if mode[0] == "interrupt":
            raise KeyboardInterrupt
        return "ok"

    with pytest.raises(ConnectionError):
        probe()
    raw.hset("{opero:cb:sint}", "open_until", 1)  # half-open now (skip the 30 s)
    mode[0] = "interrupt"
    with pytest.raises(KeyboardInterrupt):
        probe()
    assert raw.zcard("{opero:cb:sint}:probes") == 0  # not kept for its 30 s lifetime
    mode[0] = "ok"
    assert probe() == "ok"  # the next call is the probe (not refused for reset_after)
    assert breaker.state == "closed"


@pytest.mark.redis
def test_a_cancelled_async_redis_probe_gives_its_slot_back(redis_url: str) -> None:
    """An async probe admitted through Redis and cancelled frees its Redis slot (in a task)."""
    breaker = CircuitBreaker(
        failures=1, reset_after=30.0, name="acanc2", backend="redis", redis_url=redis_url
    )
    started = asyncio.Event()
    mode = ["fail"]

    @opero(retries=0, circuit_breaker=breaker)
    async def probe() -> str:
        if mode[0] == "fail":
            raise ConnectionError("down")
        if mode[0] == "hang":
            started.set()
            await asyncio.sleep(3600)
        return "ok"

    async def main() -> int:
        with pytest.raises(ConnectionError):
            await probe()
        # Skip the 30 s open period on the server: open_until in the past.
        raw = redis.asyncio.Redis.from_url(redis_url)
        await raw.hset("{opero:cb:acanc2}", "open_until", 1)
        mode[0] = "hang"
        task = asyncio.create_task(probe())
        await started.wait()
        assert await raw.zcard("{opero:cb:acanc2}:probes") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the release task's round trip
            if await raw.zcard("{opero:cb:acanc2}:probes") == 0:
                break
            await asyncio.sleep(0.01)
        left = await raw.zcard("{opero:cb:acanc2}:probes")
        await raw.aclose()
        return int(left)

    assert asyncio.run(main()) == 0
    mode[0] = "ok"
    assert asyncio.run(probe()) == "ok"
    assert breaker.state == "closed"


# --- fork ------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_inherit_a_running_probe_slot() -> None:
    """A child forked while a parent thread runs the probe can probe at once (no phantom slot)."""
    outcome = run_scenario(
        """
        import os, threading
        from opero import CircuitBreaker, opero

        breaker = CircuitBreaker(failures=1, reset_after=60)
        now = [0.0]
        breaker._clock = lambda: now[0]
        mode = ["fail"]
        inside, go = threading.Event(), threading.Event()

        @opero(retries=0, circuit_breaker=breaker)
        def f():
            if mode[0] == "fail":
                raise ConnectionError("down")
            if mode[0] == "block":
                inside.set()
                go.wait(30)
            return "ok"

        try:
            f()
        except ConnectionError:
            pass
        now[0] = 61.0
        mode[0] = "block"
        probe = threading.Thread(target=f)
        probe.start()
        assert inside.wait(30)
        mode[0] = "ok"
        pid = os.fork()
        if pid == 0:
            try:
                print("child:", f(), breaker.state, flush=True)
            except Exception as exc:
                print("child:", type(exc).__name__, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        go.set()
        probe.join(30)
        print("parent:", breaker.state, flush=True)
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines()[-2:] == ["child: ok closed", "parent: closed"]


@pytest.mark.redis
def test_a_circuit_open_in_redis_stays_open_when_redis_goes_down(
    restartable_redis: RedisServer,
) -> None:
    """Redis down mid-open: the local state keeps refusing (the function is not called)."""
    url = restartable_redis.url
    opener = CircuitBreaker(failures=1, reset_after=60, name="mid", backend="redis", redis_url=url)
    watcher = CircuitBreaker(failures=5, reset_after=60, name="mid", backend="redis", redis_url=url)
    calls: list[str] = []

    @opero(retries=0, circuit_breaker=opener)
    def down() -> None:
        calls.append("down")
        raise ConnectionError("down")

    @opero(retries=0, circuit_breaker=watcher)
    def fetch() -> str:
        calls.append("fetch")
        return "ok"

    with pytest.raises(ConnectionError):
        down()  # opens the shared circuit
    with pytest.raises(CircuitOpenError):
        fetch()  # this process learns it from Redis
    restartable_redis.stop()
    with pytest.raises(CircuitOpenError):
        fetch()  # Redis down: the local state still knows it is open
    with pytest.raises(CircuitOpenError):
        down()  # the opener's own local state too
    assert calls == ["down"]
    watcher._clock = lambda: time.monotonic() + 61  # past the open period: a local probe
    assert fetch() == "ok"
    assert watcher.state == "closed"


@pytest.mark.redis
def test_an_async_probe_cancelled_awaiting_its_admission_gives_the_slot_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled after Redis took a probe slot but before the reply: the slot is removed."""
    from opero._pipeline import breaker_redis

    breaker = CircuitBreaker(
        failures=1, reset_after=30.0, name="admitcancel", backend="redis", redis_url=redis_url
    )
    raw = redis.Redis.from_url(redis_url)
    guard = BreakerGuard(breaker, "tests.admit", None)
    guard.failed(ConnectionError("down"), 0, (), {})
    raw.hset("{opero:cb:admitcancel}", "open_until", 1)  # half-open now
    real = breaker_redis._aeval
    executed = asyncio.Event()

    async def reply_lost(client: Any, script: str, keys: Any, args: Any) -> Any:
        await real(client, script, keys, args)  # the server ran the script...
        executed.set()
        await asyncio.sleep(3600)  # ...and the reply never comes back

    monkeypatch.setattr(breaker_redis, "_aeval", reply_lost)

    async def main() -> int:
        task = asyncio.create_task(guard.aenter())
        await asyncio.wait_for(executed.wait(), 30)
        assert raw.zcard("{opero:cb:admitcancel}:probes") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if raw.zcard("{opero:cb:admitcancel}:probes") == 0:
                break
            await asyncio.sleep(0.01)
        return int(raw.zcard("{opero:cb:admitcancel}:probes"))

    assert asyncio.run(main()) == 0


@pytest.mark.redis
def test_an_async_probe_cancelled_while_its_outcome_is_recorded_gives_the_slot_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the probe's outcome goes to Redis (reply lost): its slot is removed."""
    from opero._pipeline import breaker_redis

    breaker = CircuitBreaker(
        failures=1, reset_after=30.0, name="reccancel", backend="redis", redis_url=redis_url
    )
    raw = redis.Redis.from_url(redis_url)
    guard = BreakerGuard(breaker, "tests.record", None)
    guard.failed(ConnectionError("down"), 0, (), {})
    raw.hset("{opero:cb:reccancel}", "open_until", 1)  # half-open now
    real = breaker_redis._aeval
    stuck = asyncio.Event()

    async def record_lost(client: Any, script: str, keys: Any, args: Any) -> Any:
        if script == breaker_redis.RECORD_SCRIPT:
            stuck.set()
            await asyncio.sleep(3600)  # the outcome never reaches Redis
        return await real(client, script, keys, args)

    monkeypatch.setattr(breaker_redis, "_aeval", record_lost)

    async def main() -> int:
        probe = await guard.aenter()
        assert isinstance(probe, str)
        assert raw.zcard("{opero:cb:reccancel}:probes") == 1
        task = asyncio.create_task(guard.aok(probe))
        await asyncio.wait_for(stuck.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if raw.zcard("{opero:cb:reccancel}:probes") == 0:
                break
            await asyncio.sleep(0.01)
        return int(raw.zcard("{opero:cb:reccancel}:probes"))

    assert asyncio.run(main()) == 0


# --- late results: only the current state's calls decide --------------------------------


def test_a_late_probe_failure_after_another_probe_closed_the_circuit_is_ignored() -> None:
    """A probe that fails after a sibling probe closed the circuit neither counts nor reopens it."""
    breaker, clock = _open_breaker(failures=1, half_open_calls=2)
    guard = BreakerGuard(breaker, "tests.late", None)
    guard.failed(ConnectionError("down"), 0, (), {})
    clock.now += breaker.reset_after + 1
    first, second = guard.enter(), guard.enter()
    guard.ok(first)
    assert breaker.state == "closed"
    guard.failed(ConnectionError("late"), second, (), {})
    assert breaker.state == "closed"
    assert breaker.failures == 0
    guard.failed(ConnectionError("now"), 0, (), {})  # a call of the closed state counts
    assert breaker.state == "open"


@pytest.mark.redis
def test_a_late_redis_probe_failure_after_another_probe_closed_the_circuit_is_ignored(
    redis_url: str,
) -> None:
    """Through Redis too, a sibling probe's late failure leaves the closed circuit alone."""
    breaker = CircuitBreaker(
        failures=1,
        reset_after=30.0,
        half_open_calls=2,
        name="late",
        backend="redis",
        redis_url=redis_url,
    )
    raw = redis.Redis.from_url(redis_url)
    guard = BreakerGuard(breaker, "tests.late", None)
    guard.failed(ConnectionError("down"), 0, (), {})
    raw.hset("{opero:cb:late}", "open_until", 1)  # half-open now
    first, second = guard.enter(), guard.enter()
    assert isinstance(first, str)
    assert isinstance(second, str)
    guard.ok(first)
    assert breaker.state == "closed"
    guard.failed(ConnectionError("late"), second, (), {})
    assert breaker.state == "closed"
    assert breaker.failures == 0


# --- process workers --------------------------------------------------------------------


@pytest.mark.skipif(
    multiprocessing.get_start_method(allow_none=False) != "fork", reason="fork start method"
)
def test_forked_process_workers_start_from_the_parents_breaker_state() -> None:
    """Workers forked while the parent's circuit is open refuse too; their failures stay theirs."""
    outcome = run_scenario(
        """
        import warnings
        from opero import CircuitBreaker, opero, opmap

        warnings.simplefilter("ignore")
        breaker = CircuitBreaker(failures=1, reset_after=60, name="pre")

        def work(x):
            return x

        def fail(x):
            raise ConnectionError(x)

        if __name__ == "__main__":
            down = opero(retries=0, circuit_breaker=breaker)(fail)
            try:
                down(0)
            except ConnectionError:
                pass
            mapped = opmap(mode="process", workers=2, retries=0, circuit_breaker=breaker)(work)
            print("open:", sorted({type(o).__name__ for o in mapped([1, 2, 3])}))
            breaker.reset()
            print("parent:", breaker.state)
        """,
        timeout=120,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["open: ['CircuitOpenError']", "parent: closed"]


# --- hostile classes and names ----------------------------------------------------------


def test_a_failure_on_class_with_a_raising_instancecheck_gives_the_probe_back() -> None:
    """A ``failure_on`` class whose ``__instancecheck__`` raises surfaces that error, slot freed."""

    class Hostile(type):
        def __instancecheck__(cls, instance: object) -> bool:
            raise RuntimeError("hostile __instancecheck__")

    class Transient(Exception, metaclass=Hostile):
        pass

    breaker, clock = _open_breaker(failure_on=(Transient,))
    guard = BreakerGuard(breaker, "tests.hostile", None)
    breaker._local_failed(ConnectionError("down"), 0)  # open it by hand
    clock.now += breaker.reset_after + 1
    probe = guard.enter()
    assert breaker._probes
    with pytest.raises(RuntimeError, match="hostile"):
        guard.failed(ValueError("x"), probe, (), {})
    assert breaker._probes == {}
    with pytest.raises(RuntimeError, match="hostile"):
        asyncio.run(guard.afailed(ValueError("x"), guard.enter(), (), {}))
    assert breaker._probes == {}


def test_a_huge_name_is_shortened_in_messages_but_kept_on_the_error() -> None:
    """A megabyte name is cut in refusal messages and logs; ``CircuitOpenError.name`` keeps it."""
    name = "n" * 1_000_000
    breaker = CircuitBreaker(failures=1, reset_after=60, name=name)

    @opero(retries=0, circuit_breaker=breaker)
    def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        down()
    with pytest.raises(CircuitOpenError) as info:
        down()
    assert len(str(info.value)) < 500
    assert info.value.name == name


def test_an_async_on_circuit_open_hook_is_refused_or_awaited() -> None:
    """An ``async def`` ``on_circuit_open`` hook either fails at decoration or actually runs."""
    ran: list[str] = []

    async def hook(details: Any) -> None:
        ran.append(details.event)

    refused: list[str] = []
    try:

        @opero(retries=0, circuit_breaker=CircuitBreaker(failures=1), on_circuit_open=hook)
        async def down() -> None:
            raise ConnectionError("down")

    except ConfigurationError as error:
        refused.append(str(error))
    if refused:
        assert "on_circuit_open" in refused[0]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... never awaited"
        with pytest.raises(ConnectionError):
            asyncio.run(down())
        gc.collect()
    assert ran == ["circuit_open"]


@pytest.mark.parametrize(
    "option", ["on_retry", "on_success", "on_failure", "retry_on_result", "retry_predicate"]
)
def test_async_callbacks_and_predicates_are_configuration_errors(option: str) -> None:
    """An ``async def`` callback or predicate (never awaited) is refused at decoration, by name."""
    from opero import ConfigurationError, opero

    async def hook(*args: object) -> bool:
        return True

    with pytest.raises(ConfigurationError, match=option):
        opero(**{option: hook})(lambda: 1)
