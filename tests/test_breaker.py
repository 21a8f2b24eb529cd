"""The circuit breaker of @opero: states, pipeline place, hook, logs, checks and races."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import pickle
import threading
from typing import Any

import pytest

from faultkit import run_scenario
from opero import (
    CallDetails,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    OperoError,
    opero,
)
from opero._pipeline.codegen import Template, _signature, _source


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        """Return the current time."""
        return self.now


class Flaky:
    """A function whose outcome the test switches: raise ``error`` or return ``value``."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = ConnectionError("down")

    def __call__(self, x: int = 0) -> int:
        """Count the call, then raise or return ``x``."""
        self.calls += 1
        if self.error is not None:
            raise self.error
        return x


def on_clock(breaker: CircuitBreaker, clock: Clock) -> CircuitBreaker:
    """Return ``breaker`` with its local state on the manual ``clock``."""
    breaker._clock = clock
    return breaker


def make(
    failures: int = 3, reset_after: float = 10.0, half_open_calls: int = 1, **options: Any
) -> tuple[CircuitBreaker, Clock, Flaky, Any]:
    """Return a breaker on a manual clock and a decorated flaky function (no retries)."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(failures, reset_after, half_open_calls), clock)
    flaky = Flaky()

    def call(x: int = 0) -> int:
        return flaky(x)

    options.setdefault("retries", 0)
    f = opero(circuit_breaker=breaker, **options)(call)
    return breaker, clock, flaky, f


def fail(f: Any, *args: Any) -> BaseException:
    """Call ``f`` and return the exception it raised."""
    with pytest.raises(Exception) as info:
        f(*args)
    return info.value


# --- the state machine ----------------------------------------------------------------


def test_opens_after_consecutive_failures_and_refuses_without_calling() -> None:
    """After `failures` consecutive failures the circuit opens and calls fail without running."""
    breaker, _, flaky, f = make(failures=3)
    for expected in (1, 2):
        assert isinstance(fail(f), ConnectionError)
        assert breaker.state == "closed"
        assert breaker.failures == expected
    assert isinstance(fail(f), ConnectionError)
    assert breaker.state == "open"
    assert breaker.failures == 3
    error = fail(f)
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error, OperoError)
    assert flaky.calls == 3


def test_a_success_resets_the_failure_count() -> None:
    """A success between failures resets the count: only consecutive failures open it."""
    breaker, _, flaky, f = make(failures=2)
    fail(f)
    flaky.error = None
    assert f(5) == 5
    assert breaker.failures == 0
    flaky.error = ConnectionError("down")
    fail(f)
    assert breaker.state == "closed"
    assert breaker.failures == 1


def test_open_error_carries_name_retry_after_and_cause() -> None:
    """CircuitOpenError has the breaker's name, the seconds left and the failure that opened it."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(1, 10.0, name="payments"), clock)
    flaky = Flaky()
    f = opero(retries=0, circuit_breaker=breaker)(lambda: flaky())
    opening = fail(f)
    clock.now += 4.0
    error = fail(f)
    assert isinstance(error, CircuitOpenError)
    assert error.name == "payments"
    assert error.retry_after == pytest.approx(6.0)
    assert error.__cause__ is opening
    assert "payments" in str(error)
    assert "was not called" in str(error)
    assert breaker.retry_after == pytest.approx(6.0)


def test_half_open_probe_success_closes() -> None:
    """After reset_after one probe runs; its success closes the circuit and clears the count."""
    breaker, clock, flaky, f = make(failures=1, reset_after=10.0)
    fail(f)
    clock.now += 9.999
    assert isinstance(fail(f), CircuitOpenError)
    clock.now += 0.001
    assert breaker.state == "half_open"
    flaky.error = None
    assert f(7) == 7
    assert breaker.state == "closed"
    assert breaker.failures == 0
    assert breaker.retry_after == 0.0


def test_half_open_probe_failure_reopens_for_another_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed probe opens the circuit again for a full reset_after (a "reopened" WARNING)."""
    breaker, clock, flaky, f = make(failures=1, reset_after=10.0)
    fail(f)
    clock.now += 10.0
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert isinstance(fail(f), ConnectionError)  # the probe ran and failed
    assert any("reopened: a probe failed" in r.getMessage() for r in caplog.records)
    assert flaky.calls == 2
    assert breaker.state == "open"
    assert breaker.retry_after == pytest.approx(10.0)
    assert isinstance(fail(f), CircuitOpenError)
    assert flaky.calls == 2


def test_a_stuck_probe_frees_its_slot_after_reset_after() -> None:
    """A probe that never reports back (hung, cancelled) stops blocking after reset_after."""
    breaker, clock, _, _ = make(failures=1, reset_after=10.0)
    breaker._local_failed(ConnectionError("x"), 0)
    clock.now += 10.0
    probe = breaker._local_enter("f")
    assert probe
    with pytest.raises(CircuitOpenError) as info:
        breaker._local_enter("f")
    assert info.value.retry_after == 0.0
    clock.now += 10.0
    assert breaker._local_enter("f")  # the lost probe's slot expired


def test_late_results_are_ignored() -> None:
    """A call admitted while closed that ends after it opened neither extends nor closes it."""
    breaker, clock, _, _ = make(failures=1, reset_after=10.0)
    early = breaker._local_enter("f")  # admitted while closed
    breaker._local_failed(ConnectionError("a"), 0)
    assert breaker.state == "open"
    clock.now += 5.0
    assert breaker._local_failed(ConnectionError("late"), early) is False
    assert breaker.retry_after == pytest.approx(5.0)
    breaker._local_ok(early)
    assert breaker.state == "open"


def test_errors_outside_failure_on_count_as_success() -> None:
    """An error outside failure_on is the dependency answering: it resets the count."""
    breaker = CircuitBreaker(2, failure_on=(ConnectionError,))
    flaky = Flaky()
    f = opero(retries=0, circuit_breaker=breaker)(lambda: flaky())
    fail(f)
    assert breaker.failures == 1
    flaky.error = KeyError("missing")
    assert isinstance(fail(f), KeyError)
    assert breaker.failures == 0
    flaky.error = ConnectionError("down")
    fail(f)
    fail(f)
    assert breaker.state == "open"


def test_reset_closes_an_open_circuit() -> None:
    """reset() closes the circuit and forgets the failures."""
    breaker, _, flaky, f = make(failures=1)
    fail(f)
    assert breaker.state == "open"
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker.failures == 0
    flaky.error = None
    assert f(3) == 3


# --- its place in the pipeline ----------------------------------------------------------


def test_open_circuit_stops_the_retry_loop_without_waiting() -> None:
    """CircuitOpenError is never retried: the loop ends at once, without a backoff wait."""
    waits: list[float] = []
    breaker = CircuitBreaker(2, 30.0)
    flaky = Flaky()
    f = opero(
        retries=10, min_delay=1.0, jitter=False, circuit_breaker=breaker, _sleep=waits.append
    )(lambda: flaky())
    error = fail(f)
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error.__cause__, ConnectionError)
    assert flaky.calls == 2
    assert waits == [1.0]  # the wait before the second call; none before the refused third


def test_open_circuit_takes_no_rate_limit_token() -> None:
    """A refused call takes no token; every real call takes one."""

    class Counter:
        def __init__(self) -> None:
            self.tokens = 0

        def reserve(self, rate: float | None = None) -> float:
            self.tokens += 1
            return 0.0

    limiter = Counter()
    breaker = CircuitBreaker(1, 30.0)
    flaky = Flaky()
    f = opero(retries=0, circuit_breaker=breaker, _limiter=limiter)(lambda: flaky())
    fail(f)
    for _ in range(3):
        assert isinstance(fail(f), CircuitOpenError)
    assert limiter.tokens == 1
    assert flaky.calls == 1


def test_cache_hit_never_asks_the_breaker() -> None:
    """A cached result is served while the circuit is open; a miss is refused."""
    breaker = CircuitBreaker(1, 30.0)
    flaky = Flaky()
    flaky.error = None
    f = opero(retries=0, cache=True, circuit_breaker=breaker)(lambda x: flaky(x))
    assert f(1) == 1
    flaky.error = ConnectionError("down")
    fail(f, 2)
    assert breaker.state == "open"
    assert f(1) == 1
    assert isinstance(fail(f, 3), CircuitOpenError)
    assert flaky.calls == 2


def test_fallback_chain_ends_with_circuit_open_error() -> None:
    """One breaker guards every candidate: once open, the chain ends with CircuitOpenError."""
    tried: list[str] = []
    breaker = CircuitBreaker(2, 30.0)

    @opero(retries=3, min_delay=0, arg_fallback="hosts", circuit_breaker=breaker)
    def fetch(hosts: tuple[str, ...] = ("a", "b", "c")) -> str:
        tried.append(hosts[0])
        raise ConnectionError(hosts[0])

    error = fail(fetch)
    assert isinstance(error, CircuitOpenError)
    assert tried == ["a", "b"]


def test_each_retry_counts_as_a_failure() -> None:
    """Every attempt of the retry loop is one call for the breaker."""
    breaker = CircuitBreaker(5, 30.0)
    flaky = Flaky()
    f = opero(retries=3, min_delay=0, circuit_breaker=breaker)(lambda: flaky())
    assert isinstance(fail(f), ConnectionError)
    assert breaker.failures == 4
    assert breaker.state == "closed"
    assert isinstance(fail(f), CircuitOpenError)
    assert flaky.calls == 5


def test_stacked_layer_does_not_retry_an_inner_circuit_open_error() -> None:
    """An outer @opero never retries the CircuitOpenError of an inner layer's breaker."""
    breaker = CircuitBreaker(1, 30.0)
    flaky = Flaky()
    inner = opero(retries=0, circuit_breaker=breaker)(lambda: flaky())
    outer = opero(retries=5, min_delay=0)(inner)
    fail(inner)
    assert isinstance(fail(outer), CircuitOpenError)
    assert flaky.calls == 1


def test_generic_wrapper_guards_like_the_generated_one() -> None:
    """A function with *args (not generated) and a callable object are guarded the same way."""
    breaker = CircuitBreaker(2, 30.0)
    flaky = Flaky()

    def star(*args: Any) -> int:
        return flaky(*args)

    f = opero(retries=0, circuit_breaker=breaker)(star)
    g = opero(retries=0, circuit_breaker=breaker)(functools.partial(flaky))
    fail(f)
    fail(g)
    assert isinstance(fail(f), CircuitOpenError)
    assert isinstance(fail(g), CircuitOpenError)
    breaker.reset()
    flaky.error = None
    assert f(4) == 4
    assert g(5) == 5


def test_no_breaker_generates_the_same_wrapper_as_before() -> None:
    """Without a breaker the generated source has no breaker line (no cost on that path)."""
    sig = _signature(lambda x: x)
    assert sig is not None
    plain = _source(sig, Template(guard=True))
    guarded = _source(sig, Template(guard=True, breaker=True))
    assert "__opero_cb" not in plain
    assert "__opero_enter" not in plain
    assert "__opero_cb._check" in guarded
    assert "if __opero_p:" in guarded


# --- async --------------------------------------------------------------------------


def test_async_function_opens_and_closes() -> None:
    """An async function is guarded: it opens, refuses, and a probe closes it."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(2, 5.0), clock)
    state = {"fail": True, "calls": 0}

    @opero(retries=0, circuit_breaker=breaker)
    async def get(x: int) -> int:
        state["calls"] += 1
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
        clock.now += 5.0
        state["fail"] = False
        seen.append(str(await get(9)))
        return seen

    assert asyncio.run(main()) == ["TimeoutError", "TimeoutError", "CircuitOpenError", "9"]
    assert state["calls"] == 3
    assert breaker.state == "closed"


def test_async_retry_loop_stops_at_open_circuit() -> None:
    """The async retry loop ends with CircuitOpenError once its failures open the circuit."""
    breaker = CircuitBreaker(3, 30.0)
    calls = [0]

    async def wait(_: float) -> None:
        return None

    @opero(retries=10, circuit_breaker=breaker, _asleep=wait)
    async def get() -> None:
        calls[0] += 1
        raise ConnectionError("down")

    with pytest.raises(CircuitOpenError):
        asyncio.run(get())
    assert calls[0] == 3


def test_sync_and_async_functions_share_one_breaker() -> None:
    """Failures of a sync function open the circuit for an async one guarding the same service."""
    breaker = CircuitBreaker(2, 30.0)
    flaky = Flaky()
    sync_f = opero(retries=0, circuit_breaker=breaker)(lambda: flaky())
    ran = [0]

    @opero(retries=0, circuit_breaker=breaker)
    async def async_f() -> int:
        ran[0] += 1
        return 1

    fail(sync_f)
    assert asyncio.run(async_f()) == 1  # a success resets the shared count
    fail(sync_f)
    fail(sync_f)
    with pytest.raises(CircuitOpenError):
        asyncio.run(async_f())
    assert ran == [1]


def test_async_tasks_racing_half_open_run_exactly_the_probe_slots() -> None:
    """Many tasks reaching a half-open breaker at once: exactly half_open_calls probes run."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(1, 1.0, half_open_calls=3), clock)
    breaker._local_failed(ConnectionError("x"), 0)
    clock.now += 1.0
    running = [0]

    @opero(retries=0, circuit_breaker=breaker)
    async def probe() -> str:
        running[0] += 1
        await asyncio.sleep(0.01)
        return "ok"

    async def main() -> list[Any]:
        return await asyncio.gather(*(probe() for _ in range(20)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes.count("ok") == 3
    assert running == [3]
    assert all(isinstance(o, CircuitOpenError) for o in outcomes if o != "ok")
    assert breaker.state == "closed"


# --- threads --------------------------------------------------------------------------


def test_threads_racing_half_open_run_exactly_the_probe_slots() -> None:
    """Threads reaching a half-open breaker at once: exactly half_open_calls probes run."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(1, 1.0, half_open_calls=2), clock)
    breaker._local_failed(ConnectionError("x"), 0)
    clock.now += 1.0
    inside = threading.Barrier(3, timeout=30)  # the two probes and the test
    ran = [0]
    lock = threading.Lock()

    @opero(retries=0, circuit_breaker=breaker)
    def probe() -> str:
        with lock:
            ran[0] += 1
        inside.wait()  # hold both slots until every thread has tried
        return "ok"

    outcomes: list[str] = []
    start = threading.Barrier(16, timeout=30)

    def worker() -> None:
        start.wait()
        try:
            outcomes.append(probe())
        except CircuitOpenError:
            outcomes.append("refused")

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    # Wait until the 14 refusals are in, then release the two probes.
    for _ in range(3000):
        if outcomes.count("refused") == 14:
            break
        threading.Event().wait(0.01)
    inside.wait()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["ok", "ok"] + ["refused"] * 14
    assert ran == [2]
    assert breaker.state == "closed"


def test_threads_counting_failures_open_exactly_once() -> None:
    """Concurrent failures from many threads open the circuit once (one hook call)."""
    opened: list[CallDetails] = []
    breaker = CircuitBreaker(10, 30.0)

    @opero(retries=0, circuit_breaker=breaker, on_circuit_open=opened.append)
    def bad() -> None:
        raise ConnectionError("down")

    def worker() -> None:
        for _ in range(50):
            with contextlib.suppress(Exception):
                bad()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert breaker.state == "open"
    assert len(opened) == 1


# --- hook and logs -----------------------------------------------------------------


def test_on_circuit_open_gets_details(caplog: pytest.LogCaptureFixture) -> None:
    """on_circuit_open(details) fires once, on the opening failure, with the call's details."""
    seen: list[CallDetails] = []
    bare: list[int] = []
    breaker = CircuitBreaker(2, 7.0, name="db")

    @opero(retries=0, circuit_breaker=breaker, on_circuit_open=seen.append)
    def query(sql: str, *, timeout: float = 1.0) -> None:
        raise ConnectionResetError(sql)

    other = opero(retries=0, circuit_breaker=breaker, on_circuit_open=lambda: bare.append(1))(
        query.__wrapped__
    )
    with caplog.at_level(logging.INFO, logger="opero"):
        fail(query, "select 1")
        fail(query, "select 2")
        fail(query, "select 3")
        breaker.reset()
        fail(other, "x")
        fail(other, "y")
    assert len(seen) == 1
    details = seen[0]
    assert details.event == "circuit_open"
    assert details.args == ("select 2",)
    assert details.kwargs == {"timeout": 1.0}
    assert isinstance(details.exception, ConnectionResetError)
    assert details.wait == 7.0
    assert details.function.endswith("query")
    assert details.attempt == 1
    assert bare == [1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "opened" in r.message]
    assert len(warnings) == 2
    assert "'db'" in warnings[0].message


def test_raising_hook_is_logged_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A raising on_circuit_open is logged; the call's error and the state are unchanged."""

    def hook(details: CallDetails) -> None:
        raise RuntimeError("hook broke")

    breaker = CircuitBreaker(1, 30.0)
    f = opero(retries=0, circuit_breaker=breaker, on_circuit_open=hook)(lambda: Flaky()())
    with caplog.at_level(logging.ERROR, logger="opero"):
        assert isinstance(fail(f), ConnectionError)
    assert breaker.state == "open"
    assert any("on_circuit_open" in r.getMessage() for r in caplog.records)


def test_closing_logs_info(caplog: pytest.LogCaptureFixture) -> None:
    """A probe success that closes the circuit is an INFO record on the opero logger."""
    _breaker, clock, flaky, f = make(failures=1, reset_after=1.0)
    fail(f)
    clock.now += 1.0
    flaky.error = None
    with caplog.at_level(logging.INFO, logger="opero"):
        f(1)
    assert any(r.levelno == logging.INFO and "closed" in r.message for r in caplog.records)


# --- checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"failures": 0}, "failures"),
        ({"failures": True}, "failures"),
        ({"failures": 2.5}, "failures"),
        ({"reset_after": 0}, "reset_after"),
        ({"reset_after": -1}, "reset_after"),
        ({"reset_after": float("nan")}, "reset_after"),
        ({"reset_after": float("inf")}, "reset_after"),
        ({"reset_after": 1e10}, "reset_after"),
        ({"reset_after": "30"}, "reset_after"),
        ({"half_open_calls": 0}, "half_open_calls"),
        ({"half_open_calls": 10**30}, "half_open_calls"),
        ({"failure_on": ()}, "failure_on"),
        ({"failure_on": KeyboardInterrupt}, "failure_on"),
        ({"failure_on": "ValueError"}, "failure_on"),
        ({"name": ""}, "name"),
        ({"name": 3}, "name"),
        ({"backend": "disk"}, "backend"),
        ({"backend": "redis"}, "name="),
        ({"redis_url": "redis://localhost"}, "redis_url"),
        ({"redis_client": object()}, "redis_client"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], named: str) -> None:
    """Every bad constructor argument is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker(**kwargs)
    assert named in str(info.value)
    assert "CircuitBreaker" in str(info.value)


def test_bad_options_of_opero() -> None:
    """circuit_breaker= must be a CircuitBreaker; on_circuit_open needs one."""
    with pytest.raises(ConfigurationError, match="circuit_breaker"):
        opero(circuit_breaker=object())
    with pytest.raises(ConfigurationError, match="circuit_breaker"):
        opero(circuit_breaker={"failures": 5})
    with pytest.raises(ConfigurationError, match="on_circuit_open"):
        opero(on_circuit_open=lambda: None)
    with pytest.raises(ConfigurationError, match="on_circuit_open"):
        opero(circuit_breaker=CircuitBreaker(), on_circuit_open=42)


def test_errors_and_breakers_pickle() -> None:
    """CircuitOpenError pickles with its fields; a memory breaker pickles to a fresh one."""
    error = CircuitOpenError("open", name="x", retry_after=2.5)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.name, copy.retry_after) == ("open", "x", 2.5)
    breaker = CircuitBreaker(2, 3.0, 4, failure_on=ValueError, name="n")
    breaker._local_failed(ValueError(), 0)
    clone = pickle.loads(pickle.dumps(breaker))
    assert repr(clone) == repr(breaker)
    assert clone.failure_on == (ValueError,)
    assert clone.failures == 0


def test_child_process_after_fork_gets_a_free_lock() -> None:
    """A breaker whose lock a parent thread held at fork() still works in the child."""
    outcome = run_scenario(
        """
        import os, threading, time
        from opero import CircuitBreaker, opero

        breaker = CircuitBreaker(1, 30.0)
        f = opero(retries=0, circuit_breaker=breaker)(lambda: 1 / 0)
        held = threading.Event()

        def hold():
            with breaker._lock:
                held.set()
                time.sleep(2)

        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            try:
                f()
            except ZeroDivisionError:
                pass
            os._exit(0 if breaker.state == "open" else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """,
        timeout=60,
    )
    assert outcome.lines() == ["child 0"], outcome.stderr


def test_a_cancelled_probe_gives_its_slot_back() -> None:
    """A probe task cancelled mid-call frees its half-open slot at once (no wait for expiry)."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(1, 10.0), clock)
    breaker._local_failed(ConnectionError("x"), 0)
    clock.now += 10.0
    started = asyncio.Event()

    @opero(retries=0, circuit_breaker=breaker)
    async def probe(hang: bool) -> str:
        if hang:
            started.set()
            await asyncio.sleep(3600)
        return "ok"

    async def main() -> str:
        task = asyncio.ensure_future(probe(True))
        await started.wait()
        with pytest.raises(CircuitOpenError):
            await probe(False)  # the hanging probe holds the only slot
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await probe(False)

    assert asyncio.run(main()) == "ok"
    assert breaker.state == "closed"


def test_an_interrupted_sync_probe_gives_its_slot_back() -> None:
    """A KeyboardInterrupt inside a probe (retry loop or first call) frees its slot."""
    clock = Clock()
    breaker = on_clock(CircuitBreaker(1, 10.0), clock)
    breaker._local_failed(ConnectionError("x"), 0)
    clock.now += 10.0
    mode = {"interrupt": True}

    def body() -> str:
        if mode["interrupt"]:
            raise KeyboardInterrupt
        return "ok"

    for options in ({"retries": 0}, {"retries": 2, "arg_fallback": None}):
        f = opero(circuit_breaker=breaker, **options)(body)
        with pytest.raises(KeyboardInterrupt):
            f()
        assert breaker._probes == {}
    g = opero(retries=1, min_delay=0, arg_fallback="h", circuit_breaker=breaker)(
        lambda h=("a", "b"): body()
    )
    with pytest.raises(KeyboardInterrupt):
        g()
    assert breaker._probes == {}
    mode["interrupt"] = False
    assert g() == "ok"


def test_on_circuit_open_counts_the_attempt() -> None:
    """The details of an opening inside the retry loop give that call's 1-based number."""
    seen: list[CallDetails] = []
    breaker = CircuitBreaker(3, 30.0)
    flaky = Flaky()
    f = opero(retries=5, min_delay=0, circuit_breaker=breaker, on_circuit_open=seen.append)(
        lambda: flaky()
    )
    assert isinstance(fail(f), CircuitOpenError)
    assert [d.attempt for d in seen] == [3]


def test_one_breaker_on_two_stacked_layers_is_refused() -> None:
    """The same breaker on an @opero layer and the layer it wraps would count twice: refused."""
    breaker = CircuitBreaker()
    inner = opero(retries=0, circuit_breaker=breaker)(lambda: 1)
    with pytest.raises(ConfigurationError, match="count twice"):
        opero(circuit_breaker=breaker)(inner)
    other = opero(retries=2, circuit_breaker=CircuitBreaker())(inner)
    assert other() == 1


def test_breaker_with_a_per_key_rate_limit() -> None:
    """With a callable rate_limit_key the breaker still refuses before any key is computed."""
    keys: list[str] = []
    breaker = CircuitBreaker(2, 30.0)
    flaky = Flaky()

    def key(x: int) -> str:
        keys.append(str(x))
        return str(x)

    f = opero(retries=0, rate_limit=1e6, rate_limit_key=key, circuit_breaker=breaker)(
        lambda x: flaky(x)
    )
    fail(f, 1)
    fail(f, 2)
    assert isinstance(fail(f, 3), CircuitOpenError)
    assert keys == ["1", "2"]
    breaker.reset()
    flaky.error = None
    assert f(4) == 4


def test_an_error_whose_repr_raises_still_opens_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    """A failure with a raising __repr__ opens the circuit; the WARNING names its type."""

    class Hostile(ConnectionError):
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    breaker = CircuitBreaker(1, 30.0)

    def bad() -> None:
        raise Hostile("x")

    f = opero(retries=0, circuit_breaker=breaker)(bad)
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert isinstance(fail(f), Hostile)
    assert breaker.state == "open"
    assert any("<" in r.getMessage() and "Hostile>" in r.getMessage() for r in caplog.records)
    error = fail(f)
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error.__cause__, Hostile)
