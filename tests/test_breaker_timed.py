"""timeout= with a circuit breaker: the native TimedCall, gated by the breaker's Gate."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from faultkit import run_scenario
from opero import CallDetails, CircuitBreaker, CircuitOpenError, opero
from opero._opero_core import Gate, TimedCall


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        """Return the current time."""
        return self.now


class Flaky:
    """A function whose outcome the test switches: raise ``error`` or return ``x``."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = ConnectionError("down")

    def __call__(self, x: int = 0) -> int:
        """Count the call, then raise or return ``x``."""
        self.calls += 1
        if self.error is not None:
            raise self.error
        return x


def make(
    failures: int = 3, reset_after: float = 10.0, half_open_calls: int = 1, **options: Any
) -> tuple[CircuitBreaker, Clock, Flaky, Any]:
    """Return a breaker on a manual clock and a flaky function decorated with timeout=.

    By default a failure is not retried (``retry_on=TimeoutError``): each call
    is one attempt, recorded by the native first call.
    """
    clock = Clock()
    breaker = CircuitBreaker(failures, reset_after, half_open_calls)
    breaker._clock = clock
    flaky = Flaky()

    def call(x: int = 0) -> int:
        return flaky(x)

    # timeout= needs retries; retry_on=TimeoutError: the flaky errors are not retried.
    options.setdefault("retries", 1)
    options.setdefault("retry_on", TimeoutError)
    options.setdefault("timeout", 60.0)
    f = opero(circuit_breaker=breaker, **options)(call)
    return breaker, clock, flaky, f


def fail(f: Any, *args: Any) -> BaseException:
    """Call ``f`` and return the exception it raised."""
    with pytest.raises(Exception) as info:
        f(*args)
    return info.value


def agrees(breaker: CircuitBreaker) -> bool:
    """Return whether the breaker's native gate equals its ``_check`` flag."""
    return breaker._gate.get() is bool(breaker._check)


# --- which first call ---------------------------------------------------------------


def test_timeout_and_a_local_breaker_use_the_native_timed_call() -> None:
    """With timeout= and a local breaker (nothing else) the first call is a gated TimedCall."""
    _, _, flaky, f = make(retries=3)
    assert type(f.__opero__.call_uncached) is TimedCall
    flaky.error = None
    assert f(4) == 4


def test_other_layers_keep_the_generated_wrapper() -> None:
    """A rate limit, on_success or a Redis-shared breaker keep the generated wrapper."""
    shared = CircuitBreaker(backend="redis", name="gate-test", redis_url="redis://127.0.0.1:1/0")
    assert shared._gate.get() is True  # shared in Redis: every call asks the breaker
    for options in (
        {"rate_limit": 1000.0},
        {"on_success": lambda result: None},
        {"circuit_breaker": shared},
    ):
        options.setdefault("circuit_breaker", CircuitBreaker())
        f = opero(retries=3, timeout=10.0, **options)(lambda x: x)
        assert type(f.__opero__.call_uncached) is not TimedCall, options


# --- the breaker's behaviour through the native first call ---------------------------


def test_opens_after_n_failures_and_refuses_without_calling() -> None:
    """The native path counts each failure: after `failures` of them calls are refused."""
    breaker, _, flaky, f = make(failures=3)
    for expected in (1, 2, 3):
        assert isinstance(fail(f), ConnectionError)
        assert breaker.failures == expected
        assert agrees(breaker)
    assert breaker.state == "open"
    error = fail(f)
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error.__cause__, ConnectionError)
    assert flaky.calls == 3


def test_a_failure_enters_the_retry_loop_which_stops_at_the_open_circuit() -> None:
    """A first-call failure is recorded, then retried; the loop ends at the opened circuit."""
    waits: list[float] = []
    breaker, _, flaky, f = make(
        failures=2,
        retries=10,
        retry_on=Exception,
        min_delay=1.0,
        jitter=False,
        _sleep=waits.append,
    )
    error = fail(f)
    assert isinstance(error, CircuitOpenError)
    assert flaky.calls == 2
    assert waits == [1.0]
    assert breaker.state == "open"
    assert agrees(breaker)


def test_a_probe_closes_the_circuit_and_the_fast_path_returns() -> None:
    """After reset_after a probe runs through the slow path; its success closes the circuit."""
    breaker, clock, flaky, f = make(failures=1, reset_after=10.0)
    fail(f)
    clock.now += 9.0
    assert isinstance(fail(f), CircuitOpenError)
    clock.now += 1.0
    assert breaker.state == "half_open"
    assert breaker._gate.get()
    flaky.error = None
    assert f(7) == 7
    assert breaker.state == "closed"
    assert not breaker._gate.get()
    assert agrees(breaker)
    assert f(8) == 8
    assert flaky.calls == 3


def test_a_failed_probe_reopens() -> None:
    """A probe that fails opens the circuit for another reset_after."""
    breaker, clock, flaky, f = make(failures=1, reset_after=10.0)
    fail(f)
    clock.now += 10.0
    assert isinstance(fail(f), ConnectionError)  # the probe ran and failed
    assert flaky.calls == 2
    assert breaker.state == "open"
    assert breaker.retry_after == pytest.approx(10.0)
    assert isinstance(fail(f), CircuitOpenError)
    assert agrees(breaker)


def test_a_success_after_a_failure_resets_the_count() -> None:
    """With a failure counted the gate sends calls to the wrapper, whose success resets it."""
    breaker, _, flaky, f = make(failures=2)
    fail(f)
    assert breaker._gate.get()
    flaky.error = None
    assert f(5) == 5
    assert breaker.failures == 0
    assert not breaker._gate.get()
    flaky.error = ConnectionError("down")
    fail(f)
    assert breaker.state == "closed"
    assert breaker.failures == 1


def test_errors_outside_failure_on_count_as_success() -> None:
    """An error the breaker does not count leaves it closed and the gate clear."""
    clock = Clock()
    breaker = CircuitBreaker(1, 10.0, failure_on=ConnectionError)
    breaker._clock = clock
    f = opero(retries=1, retry_on=TimeoutError, timeout=60.0, circuit_breaker=breaker)(
        lambda: 1 // 0
    )
    for _ in range(3):
        assert isinstance(fail(f), ZeroDivisionError)
    assert breaker.state == "closed"
    assert not breaker._gate.get()


def test_a_breaker_shared_with_a_plain_function_refuses_on_the_native_path() -> None:
    """Another function opening a shared breaker sets the gate: the timed one is refused."""
    breaker, _, flaky, timed = make(failures=2)
    other = Flaky()
    plain = opero(retries=0, circuit_breaker=breaker)(lambda: other())
    fail(plain)
    fail(plain)
    assert breaker.state == "open"
    assert isinstance(fail(timed), CircuitOpenError)
    assert flaky.calls == 0
    breaker.reset()
    assert not breaker._gate.get()
    flaky.error = None
    assert timed(3) == 3


def test_on_circuit_open_fires_from_the_native_path() -> None:
    """on_circuit_open gets the opening call's details when the native first call failed."""
    seen: list[CallDetails] = []
    _, _, _, f = make(failures=2, on_circuit_open=seen.append)
    fail(f, 1)
    fail(f, 2)
    assert len(seen) == 1
    assert seen[0].args == (2,)
    assert seen[0].attempt == 1
    assert isinstance(seen[0].exception, ConnectionError)


def test_gate_agrees_with_check_after_every_transition() -> None:
    """The gate equals _check after a count, a reset, opening, half-open, a probe and reset()."""
    breaker, clock, flaky, f = make(failures=2, reset_after=5.0)
    assert agrees(breaker)
    assert not breaker._check
    steps = []
    fail(f)  # a failure counted
    steps.append(agrees(breaker))
    flaky.error = None
    f()  # a success resets the count
    steps.append(agrees(breaker))
    flaky.error = ConnectionError("down")
    fail(f)
    fail(f)  # opened
    steps.append(agrees(breaker) and breaker._check)
    clock.now += 5.0
    fail(f)  # the probe failed: reopened
    steps.append(agrees(breaker) and breaker._check)
    clock.now += 5.0
    flaky.error = None
    f()  # a probe closed it
    steps.append(agrees(breaker) and not breaker._check)
    breaker._local_failed(ConnectionError("x"), 0)
    breaker._local_failed(ConnectionError("x"), 0)
    steps.append(agrees(breaker) and breaker._check)
    breaker.reset()
    steps.append(agrees(breaker) and not breaker._check)
    assert steps == [True] * 7


def test_a_method_binds_through_the_gated_call() -> None:
    """A decorated method gets its instance on both the native and the gated path."""
    breaker = CircuitBreaker(1, 10.0)

    class Client:
        def __init__(self) -> None:
            self.fail = True

        @opero(retries=1, retry_on=TimeoutError, timeout=60.0, circuit_breaker=breaker)
        def get(self, x: int) -> int:
            if self.fail:
                raise ConnectionError("down")
            return x

    client = Client()
    assert isinstance(fail(client.get, 1), ConnectionError)
    assert isinstance(fail(client.get, 1), CircuitOpenError)
    breaker.reset()
    client.fail = False
    assert client.get(2) == 2


def test_threads_failing_together_open_the_circuit_once() -> None:
    """Threads failing on the native path open it; afterwards every call is refused."""
    breaker, _, flaky, f = make(failures=5)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        for _ in range(20):
            try:
                f()
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 160
    assert breaker.state == "open"
    assert agrees(breaker)
    # At most one failing call per thread ran past the threshold (admitted before it opened).
    assert 5 <= flaky.calls <= 5 + 8
    assert sum(isinstance(e, CircuitOpenError) for e in errors) == 160 - flaky.calls


def test_a_forked_child_keeps_the_open_state_and_the_gate() -> None:
    """A child forked while the circuit is open refuses calls, and a probe there closes it."""
    outcome = run_scenario(
        """
        import os
        from opero import CircuitBreaker, CircuitOpenError, opero

        breaker = CircuitBreaker(1, 0.2)
        state = {"fail": True}

        @opero(retries=1, retry_on=TimeoutError, timeout=60.0, circuit_breaker=breaker)
        def f():
            if state["fail"]:
                raise ConnectionError("down")
            return "ok"

        try:
            f()
        except ConnectionError:
            pass
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                f()
                code = 3
            except CircuitOpenError:
                pass
            import time
            time.sleep(0.3)
            state["fail"] = False
            if f() != "ok" or breaker.state != "closed" or breaker._gate.get():
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), breaker._gate.get())
        """,
        timeout=60,
    )
    assert outcome.lines() == ["child 0 True"], outcome.stderr


# --- the native pieces --------------------------------------------------------------


def test_gate_holds_what_it_was_set_to() -> None:
    """Gate.get returns the last value set (False by default)."""
    gate = Gate()
    assert gate.get() is False
    gate.set(True)
    assert gate.get() is True
    assert Gate(True).get() is True
    assert "set" in repr(Gate(True))


def test_timed_call_routes_by_its_gate() -> None:
    """While the gate is set calls go to slow (on_fail unused); while clear, to func."""
    gate = Gate()
    fails: list[Any] = []
    timed = TimedCall(
        lambda x, k=0: ("fast", x, k),
        lambda exc, start, *a, **kw: fails.append(exc),
        gate=gate,
        slow=lambda x, k=0: ("slow", x, k),
    )
    assert timed(1, k=2) == ("fast", 1, 2)
    gate.set(True)
    assert timed(1, k=2) == ("slow", 1, 2)
    assert timed(*[3]) == ("slow", 3, 0)
    gate.set(False)
    assert timed(4) == ("fast", 4, 0)
    assert fails == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gate": Gate()}, "slow"),
        ({"slow": print}, "gate"),
        ({"gate": Gate(), "slow": 3}, "slow"),
        ({"gate": True, "slow": print}, "gate"),
    ],
)
def test_timed_call_rejects_a_half_configured_gate(kwargs: dict[str, Any], match: str) -> None:
    """gate= without slow=, slow= without gate=, or wrong types are a TypeError naming them."""
    with pytest.raises(TypeError, match=match):
        TimedCall(print, print, **kwargs)


def test_call_counting_turned_on_later_counts_every_call() -> None:
    """set_call_counting(True) after decoration sends every call to the counting wrapper."""
    from opero.instrumentation import set_call_counting

    breaker, _, flaky, f = make(failures=5)
    flaky.error = None
    assert f(1) == 1  # not counted: counting is off
    set_call_counting(True)
    try:
        assert Gate.forced()
        assert not breaker._gate.get()  # the breaker's own flag is unchanged
        assert f(2) == 2
        flaky.error = ConnectionError("down")
        fail(f)  # a failure counted, then the gate is set by the breaker
        flaky.error = None
        assert f(3) == 3
        assert f.stats().calls == 3
    finally:
        set_call_counting(False)
    assert not Gate.forced()
    assert f(4) == 4
    assert f.stats().calls == 3
    assert flaky.calls == 5


def test_a_callable_object_goes_through_the_gated_call() -> None:
    """A callable object (not a function) opens and closes the circuit through the gated call."""
    clock = Clock()
    breaker = CircuitBreaker(2, 10.0)
    breaker._clock = clock
    flaky = Flaky()
    f = opero(retries=1, retry_on=TimeoutError, timeout=60.0, circuit_breaker=breaker)(flaky)
    assert type(f.__opero__.call_uncached) is TimedCall
    fail(f, 1)
    fail(f, 1)
    assert isinstance(fail(f, 1), CircuitOpenError)
    clock.now += 10.0
    flaky.error = None
    assert f(5) == 5
    assert breaker.state == "closed"
    assert agrees(breaker)
    assert flaky.calls == 3
