"""f.stats(), the global hooks and the Prometheus / OpenTelemetry exports of opero."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import pytest

import opero
from faultkit import run_scenario
from opero import CallDetails, FunctionStats, instrumentation
from opero import opero as op
from opero._pipeline.stats import FunctionStats as _Stats


@pytest.fixture(autouse=True)
def _call_counting() -> Any:
    """Count uncached calls in these tests (off by default), and switch it off after."""
    instrumentation.set_call_counting(True)
    yield
    instrumentation.set_call_counting(False)


def failing_then(ok_after: int) -> Any:
    state = {"n": 0}

    def call(x: int) -> int:
        state["n"] += 1
        if state["n"] <= ok_after:
            raise ConnectionError("down")
        return x

    return call


def test_stats_counts_calls_retries_waits_failures() -> None:
    """stats() counts calls, retries and their waits (a manual clock) and failed calls."""
    slept: list[float] = []
    f = op(retries=2, _sleep=slept.append, _backoff_seed=3)(failing_then(1))
    assert f(1) == 1
    assert f(2) == 2
    stats = f.stats()
    assert isinstance(stats, FunctionStats)
    assert (stats.calls, stats.retries, stats.failures) == (2, 1, 0)
    assert stats.retry_waits == 1
    assert stats.retry_wait_seconds == pytest.approx(sum(slept))
    g = op(retries=1, min_delay=0)(failing_then(10))
    with pytest.raises(ConnectionError):
        g(1)
    assert (g.stats().calls, g.stats().retries, g.stats().failures) == (1, 1, 1)
    assert g.stats().retry_waits == 0  # a zero wait does not sleep


def test_stats_without_options_counts_failures() -> None:
    """A function with retries=0 and no callback still counts its calls and failures."""
    f = op(retries=0)(failing_then(1))
    with pytest.raises(ConnectionError):
        f(1)
    assert f(1) == 1
    assert (f.stats().calls, f.stats().failures) == (2, 1)


def test_stats_cache_hits_misses_and_reset() -> None:
    """A cached function counts hits and misses from its store; reset=True starts from zero."""
    f = op(cache=True)(lambda x: x * 2)
    for x in (1, 2, 1, 1, 2, 3):
        f(x)
    stats = f.stats()
    assert (stats.calls, stats.cache_hits, stats.cache_misses, stats.coalesced) == (6, 3, 3, 0)
    assert f.stats(reset=True) == stats
    assert f.stats() == FunctionStats(stats.function)
    f(1)
    assert (f.stats().calls, f.stats().cache_hits) == (1, 1)


def test_coalesced_waiters_are_not_misses() -> None:
    """Threads that wait for another thread's computation count as coalesced, not as misses."""
    started, release = threading.Event(), threading.Event()

    def slow(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    f = op(cache=True, retries=0)(slow)
    threads = [threading.Thread(target=f, args=(1,)) for _ in range(4)]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)  # the waiters reach the flight (a generous bound on a loaded box)
    release.set()
    for t in threads:
        t.join(10)
    stats = f.stats()
    assert stats.calls == 4
    assert stats.cache_misses == 1
    assert stats.coalesced + stats.cache_hits == 3


def test_async_and_fallback_and_rate_limit_counters() -> None:
    """Async calls, failed fallback candidates and rate-limit waits are counted."""
    waits: list[float] = []

    async def one(x: int) -> int:
        return x

    f = op(retries=0, rate_limit=10.0, _asleep=_recorder(waits))(one)

    async def main() -> None:
        for i in range(3):
            assert await f(i) == i

    asyncio.run(main())
    stats = f.stats()
    assert stats.calls == 3
    assert stats.rate_limit_waits == 2
    assert stats.rate_limit_wait_seconds == pytest.approx(sum(waits))

    @op(retries=0, arg_fallback="hosts")
    def pick(hosts: list[str]) -> str:
        if hosts[0] != "c":
            raise ConnectionError(hosts[0])
        return "c"

    assert pick(["a", "b", "c"]) == "c"
    assert (pick.stats().calls, pick.stats().fallbacks) == (1, 2)


def _recorder(into: list[float]) -> Any:
    async def asleep(seconds: float) -> None:
        into.append(seconds)

    return asleep


def test_stats_under_threads_lose_nothing() -> None:
    """8 threads x 2000 calls with one retry each: calls and retries are exact."""
    state = threading.local()

    def flaky(x: int) -> int:
        if not getattr(state, "failed", False):
            state.failed = True
            raise ConnectionError("once per call")
        state.failed = False
        return x

    f = op(retries=1, min_delay=0)(flaky)
    plain = op(retries=0)(lambda x: x)

    def work() -> None:
        for i in range(2000):
            f(i)
            plain(i)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old)
    assert (f.stats().calls, f.stats().retries) == (16000, 16000)
    assert plain.stats().calls == 16000


def test_global_hooks_apply_to_functions_decorated_before() -> None:
    """set_on_event_hooks reaches functions decorated earlier; a raising hook is ignored."""
    f = op(retries=1, min_delay=0)(failing_then(1))
    seen: list[CallDetails] = []

    def broken(details: CallDetails) -> None:
        raise RuntimeError("hook bug")

    instrumentation.set_on_event_hooks([broken, seen.append])
    try:
        assert instrumentation.get_on_event_hooks() == (broken, seen.append)
        assert f(7) == 7
        instrumentation._emit_breaker("payments", "open")
    finally:
        instrumentation.set_on_event_hooks(None)
    assert [(d.event, d.args) for d in seen] == [("retry", (7,)), ("circuit_open", ())]
    assert seen[1].function == "payments"
    assert instrumentation.breaker_transitions()[("payments", "open")] >= 1
    with pytest.raises(TypeError, match="not callable"):
        instrumentation.set_on_event_hooks([3])  # type: ignore[list-item]


def test_snapshot_sums_by_name() -> None:
    """snapshot() lists live functions by module.qualname, summing same-named decorations."""

    def twice(x: int) -> int:
        return x

    a, b = op(retries=0)(twice), op(retries=0)(twice)
    a(1)
    b(1)
    b(2)
    name = f"{__name__}.test_snapshot_sums_by_name.<locals>.twice"
    assert instrumentation.snapshot()[name].calls == 3


def test_prometheus_export() -> None:
    """A real prometheus_client registry exposes the counters labelled by function."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    exporter = instrumentation.PrometheusInstrumentation(registry)
    inner = failing_then(1)

    def prometheus_target(x: int) -> int:  # a name no other test's function has
        return int(inner(x))

    f = op(retries=1, min_delay=0, cache=True)(prometheus_target)
    f(1)
    f(1)
    name = f.stats().function
    instrumentation._emit_breaker("prom-breaker", "half_open")
    value = registry.get_sample_value
    assert value("opero_calls_total", {"function": name}) == 2
    assert value("opero_retries_total", {"function": name}) == 1
    assert value("opero_cache_hits_total", {"function": name}) == 1
    assert value("opero_cache_misses_total", {"function": name}) == 1
    assert value("opero_coalesced_total", {"function": name}) == 0
    transitions = {"breaker": "prom-breaker", "state": "half_open"}
    assert value("opero_circuit_transitions_total", transitions) >= 1
    text = prometheus_client.generate_latest(registry).decode()
    assert f'opero_retry_wait_seconds_total{{function="{name}"}}' in text
    exporter.unregister()
    assert value("opero_calls_total", {"function": name}) is None


def test_opentelemetry_export() -> None:
    """A real OpenTelemetry MeterProvider with an InMemoryMetricReader reads the counters."""
    pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation.OpenTelemetryInstrumentation(provider)
    inner = failing_then(2)

    def otel_target(x: int) -> int:  # a name no other test's function has
        return int(inner(x))

    f = op(retries=2, min_delay=0)(otel_target)
    assert f(3) == 3
    name = f.stats().function
    points: dict[str, dict[str, Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    label = point.attributes.get("function") or point.attributes.get("breaker")
                    points.setdefault(metric.name, {})[label] = point.value
    assert points["opero.calls"][name] == 1
    assert points["opero.retries"][name] == 2
    assert points["opero.failures"][name] == 0
    provider.shutdown()


def test_metric_names_match_stats_fields() -> None:
    """Every FunctionStats counter is exported, and nothing else."""
    from dataclasses import fields

    assert set(instrumentation.METRICS) == {f.name for f in fields(_Stats)} - {"function"}
    assert opero.FunctionStats is _Stats


def test_importing_opero_imports_no_metrics_library() -> None:
    """Import opero (and opero.instrumentation) never imports prometheus_client or opentelemetry."""
    outcome = run_scenario(
        """
        import sys
        import opero, opero.instrumentation
        print(sorted(m for m in sys.modules if m.startswith(("prometheus", "opentelemetry"))))
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["[]"]


def test_fork_child_continues_from_parent_counts() -> None:
    """A forked child starts from the parent's counts and its own calls add to them."""
    outcome = run_scenario(
        """
        import os
        from opero import opero
        from opero.instrumentation import set_call_counting

        set_call_counting(True)

        @opero(retries=0)
        def f(x):
            return x

        f(1); f(2)
        pid = os.fork()
        if pid == 0:
            f(3)
            print("child", f.stats().calls, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent", f.stats().calls)
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["child 3", "parent 2"]


def test_call_counting_switches_live_wrappers() -> None:
    """set_call_counting reaches wrappers made before it; off, uncached calls are not counted."""
    instrumentation.set_call_counting(False)

    def plain(x: int) -> int:
        return x

    f = op(retries=3)(plain)
    cached = op(cache=True, retries=3)(plain)
    f(1)
    cached(1)
    cached(1)
    assert f.stats().calls == 0  # off: the uncached call did no counting work
    assert (cached.stats().calls, cached.stats().cache_misses) == (2, 1)  # always counted
    instrumentation.set_call_counting(True)
    assert instrumentation.counting_calls()
    f(1)
    f(2)
    assert f.stats().calls == 2
    instrumentation.set_call_counting(False)
    f(3)
    assert f.stats().calls == 2


def test_tracebacks_after_the_switch_show_the_right_line() -> None:
    """A generated wrapper switched to counting keeps its traceback lines true."""

    def boom(x: int) -> int:
        raise KeyError(x)

    f = op(retries=0)(boom)
    instrumentation.set_call_counting(True)
    with pytest.raises(KeyError) as info:
        f(1)
    import traceback

    frames = [
        fr
        for fr in traceback.extract_tb(info.value.__traceback__)
        if "opero wrapper" in fr.filename
    ]
    assert frames
    assert (frames[0].line or "").startswith("return __opero_retry_from(")


def test_fork_while_threads_decorate_and_count() -> None:
    """Children forked while threads decorate, retry and switch counting all finish and count."""
    outcome = run_scenario(
        """
        import os, sys, threading
        from opero import opero
        from opero.instrumentation import set_call_counting

        sys.setswitchinterval(1e-6)
        stop = threading.Event()

        def spin(n):
            i = 0
            while not stop.is_set():
                f = opero(retries=1, min_delay=0)(lambda x: x)
                f(i)
                set_call_counting(i % 2 == 0)
                f.stats()
                i += 1

        threads = [threading.Thread(target=spin, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        done = 0
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                set_call_counting(True)
                g = opero(retries=1, min_delay=0)(lambda x: x)
                g(1); g(2)
                os._exit(0 if g.stats().calls == 2 else 3)
            _, status = os.waitpid(pid, 0)
            done += os.waitstatus_to_exitcode(status) == 0
        stop.set()
        for t in threads:
            t.join()
        print(f"{done} of 20")
        """,
        timeout=120,
    )
    assert outcome.lines() == ["20 of 20"], outcome


def test_prometheus_twice_on_one_registry_is_refused() -> None:
    """A second exporter on the same registry raises instead of doubling every sample."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    exporter = instrumentation.PrometheusInstrumentation(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        instrumentation.PrometheusInstrumentation(registry)
    exporter.unregister()


def test_a_failing_backend_info_does_not_break_a_scrape() -> None:
    """A cache backend whose info() raises leaves its cache counters out; stats() still works."""
    from opero.cache import MemoryBackend

    class BrokenInfo(MemoryBackend):  # type: ignore[misc]
        def open(self, **kwargs: Any) -> Any:
            fcache = super().open(**kwargs)

            class Wrapped:
                def __getattr__(self, name: str) -> Any:
                    return getattr(fcache, name)

                def info(self) -> Any:
                    raise OSError("backend down")

            return Wrapped()

    def broken_info_target(x: int) -> int:
        return x

    f = op(cache=True, cache_backend=BrokenInfo(), retries=0)(broken_info_target)
    assert f(2) == 2
    assert f(2) == 2  # a hit the broken info() cannot report
    with pytest.raises(OSError, match="backend down"):
        f.cache_info()
    stats = f.stats()
    assert stats.cache_hits == 0
    assert stats.calls == 1  # the run, counted while call counting is on
    assert stats.function in instrumentation.snapshot()


def test_async_coalesced_tasks_are_not_misses() -> None:
    """Tasks awaiting another task's computation of the same key count as coalesced."""
    runs = {"n": 0}

    async def async_coalesce_target(x: int) -> int:
        runs["n"] += 1
        await asyncio.sleep(0.05)
        return x

    f = op(cache=True, retries=0)(async_coalesce_target)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(f(1) for _ in range(5))))

    assert asyncio.run(main()) == [1] * 5
    stats = f.stats()
    assert runs["n"] == 1
    assert (stats.calls, stats.cache_misses, stats.coalesced, stats.cache_hits) == (5, 1, 4, 0)
