"""Every @opero pattern of the user guide (advanced-features.md) runs as written.

The guide's code is copied verbatim below each ``# --- guide:`` marker; only
its external calls (``fetch_from_database``, ``make_api_call``, ``call_api``,
``call_backup_service``, ``external_service_call``, ``fetch_resource``,
``simple_operation``, ``expensive_operation``, ``process_data``,
``get_popular_product_ids``) are stubbed, through the :class:`Stubs` object.
The hierarchical (memory over Redis) pattern is tested with the Redis backend.
"""
# The guide's classes carry no docstrings and keep its if/elif shape: copied as written.
# ruff: noqa: D101, D102, SIM114

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, List  # noqa: UP035 (the guide's own imports)

import prometheus_client
import pytest
import requests

import opero as opero_pkg
from opero import AllFailedError, opero
from opero.errors import attempt_errors


class Stubs:
    """The guide's external calls, with behaviour set per test and every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.behaviour: dict[str, Callable[..., Any]] = {}
        self.lock = threading.Lock()

    def call(self, name: str, *args: Any) -> Any:
        """Record a call to ``name`` and run its configured behaviour."""
        with self.lock:
            self.calls.append((name, args))
        return self.behaviour[name](*args)

    def count(self, name: str) -> int:
        """Return how many times ``name`` was called."""
        return sum(1 for n, _ in self.calls if n == name)


stubs = Stubs()


def fetch_from_database(product_id: int) -> dict[str, Any]:
    """Stub of the guide's database read."""
    return stubs.call("fetch_from_database", product_id)  # type: ignore[no-any-return]


def get_popular_product_ids() -> list[int]:
    """Stub of the guide's popular products query."""
    return stubs.call("get_popular_product_ids")  # type: ignore[no-any-return]


def make_api_call(data: Any) -> dict[str, Any]:
    """Stub of the guide's API call."""
    return stubs.call("make_api_call", data)  # type: ignore[no-any-return]


def call_api(endpoint: str, data: Any) -> Any:
    """Stub of the guide's endpoint call."""
    return stubs.call("call_api", endpoint, data)


def call_backup_service(data: Any) -> Any:
    """Stub of the guide's backup service."""
    return stubs.call("call_backup_service", data)


def external_service_call(data: Any) -> Any:
    """Stub of the guide's external service."""
    return stubs.call("external_service_call", data)


def fetch_resource(resource_id: str) -> Any:
    """Stub of the guide's resource fetch."""
    return stubs.call("fetch_resource", resource_id)


def simple_operation(data: Any) -> Any:
    """Stub of the guide's degraded operation."""
    return stubs.call("simple_operation", data)


def expensive_operation(data: Any) -> Any:
    """Stub of the guide's full operation."""
    return stubs.call("expensive_operation", data)


def process_data(data: Any) -> Any:
    """Stub of the guide's processing step."""
    return stubs.call("process_data", data)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    """Reset the stubs and make retries instant (the guide's code sleeps between retries)."""
    stubs.calls.clear()
    stubs.behaviour.clear()
    with opero_pkg.set_testing():
        yield


# --- guide: Custom Cache Keys ---------------------------------------------------------
import hashlib  # noqa: E402
import json  # noqa: E402


def create_stable_cache_key(func, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """Create cache key that's stable across runs."""
    # Normalize arguments
    key_data = {
        "function": func.__qualname__,
        "args": args,
        "kwargs": dict(sorted(kwargs.items())),
    }

    # Create stable hash
    key_json = json.dumps(key_data, sort_keys=True, default=str)
    key_hash = hashlib.md5(key_json.encode()).hexdigest()

    return f"{func.__module__}:{func.__name__}:{key_hash}"


@opero(cache=True, cache_key=create_stable_cache_key, cache_ttl=3600)
def complex_cached_function(user_id: int, filters: dict, options: dict = None):  # type: ignore[no-untyped-def, type-arg, assignment]  # noqa: RUF013
    # Complex function with multiple parameters
    pass


def test_custom_cache_keys() -> None:
    """complex_cached_function caches under the guide's md5 key, dict arguments included."""
    complex_cached_function.cache_clear()
    assert complex_cached_function(1, {"a": [1, 2]}) is None
    assert complex_cached_function(1, {"a": [1, 2]}) is None
    info = complex_cached_function.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    complex_cached_function(1, {"a": [1, 2]}, options={"x": 1})
    assert complex_cached_function.cache_info().misses == 2
    key = create_stable_cache_key(complex_cached_function.__wrapped__, 1, {"a": [1, 2]})
    assert key.startswith(f"{__name__}:complex_cached_function:")


# --- guide: Cache Warming -------------------------------------------------------------
from concurrent.futures import ThreadPoolExecutor  # noqa: E402


@opero(cache=True, cache_ttl=3600)
def get_product_details(product_id: int):  # type: ignore[no-untyped-def]
    # Expensive operation
    return fetch_from_database(product_id)


def warm_cache(product_ids: List[int]):  # type: ignore[no-untyped-def]  # noqa: UP006
    """Pre-populate cache with frequently accessed items."""
    with ThreadPoolExecutor(max_workers=10) as executor:
        # Trigger cache population
        list(executor.map(get_product_details, product_ids))


def test_cache_warming() -> None:
    """warm_cache fills the cache from 10 threads; later reads never reach the database."""
    get_product_details.cache_clear()
    stubs.behaviour["get_popular_product_ids"] = lambda: list(range(50)) + list(range(25))
    stubs.behaviour["fetch_from_database"] = lambda pid: {"id": pid}

    # Warm cache on startup
    popular_products = get_popular_product_ids()
    warm_cache(popular_products)

    assert stubs.count("fetch_from_database") == 50
    assert [get_product_details(i)["id"] for i in range(50)] == list(range(50))
    assert stubs.count("fetch_from_database") == 50


# --- guide: Conditional Retries -------------------------------------------------------
def should_retry(exception, response=None):  # type: ignore[no-untyped-def]
    """Determine if operation should be retried."""
    if isinstance(exception, requests.HTTPError):
        if exception.response.status_code == 429:  # Rate limited
            return True
        elif exception.response.status_code >= 500:  # Server error
            return True
    elif response and response.get("status") == "pending":
        return True
    return False


@opero(
    retries=5,
    retry_on=Exception,  # Catch all exceptions
    retry_predicate=should_retry,  # Custom logic
)
def smart_retry_operation(data):  # type: ignore[no-untyped-def]
    response = make_api_call(data)
    if response["status"] == "pending":
        raise Exception("Operation still pending")
    return response


def http_error(status: int) -> requests.HTTPError:
    """Build a requests.HTTPError carrying a response with ``status``."""
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"HTTP {status}", response=response)


def test_conditional_retries_retry_429_and_5xx() -> None:
    """429 and 5xx errors are retried until the call succeeds."""
    outcomes: list[Any] = [http_error(429), http_error(503), {"status": "done", "v": 1}]

    def api(data: Any) -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    stubs.behaviour["make_api_call"] = api
    assert smart_retry_operation("x") == {"status": "done", "v": 1}
    assert stubs.count("make_api_call") == 3


def test_conditional_retries_stop_on_client_error_and_pending() -> None:
    """A 404 and the 'pending' exception are not retried: they propagate unchanged."""
    error = http_error(404)

    def api404(data: Any) -> Any:
        raise error

    stubs.behaviour["make_api_call"] = api404
    with pytest.raises(requests.HTTPError) as info:
        smart_retry_operation("x")
    assert info.value is error
    assert stubs.count("make_api_call") == 1
    stubs.behaviour["make_api_call"] = lambda data: {"status": "pending"}
    with pytest.raises(Exception, match="Operation still pending"):
        smart_retry_operation("y")
    assert stubs.count("make_api_call") == 2


def test_conditional_retries_exhaust_into_the_last_error() -> None:
    """Six 503 answers (retries=5) end in the sixth HTTPError, with all six errors kept."""

    def api(data: Any) -> Any:
        raise http_error(503)

    stubs.behaviour["make_api_call"] = api
    with pytest.raises(requests.HTTPError) as info:
        smart_retry_operation("x")
    assert len(attempt_errors(info.value)) == 6


# --- guide: Retry with Exponential Backoff and Jitter ---------------------------------
import random  # noqa: E402


def jittered_backoff(attempt: int, base_delay: float = 1.0) -> float:
    """Calculate delay with exponential backoff and jitter."""
    # Exponential backoff: 1s, 2s, 4s, 8s...
    delay = base_delay * (2**attempt)

    # Add jitter: ±25% randomization
    jitter = delay * 0.25 * (2 * random.random() - 1)

    return max(0.1, delay + jitter)


@opero(retries=4, backoff_function=jittered_backoff)
def distributed_operation(item):  # type: ignore[no-untyped-def]
    # Operation that many instances might retry simultaneously
    pass


def test_jittered_backoff_schedule() -> None:
    """distributed_operation runs, and its backoff_function gives waits in the ±25% band."""
    assert distributed_operation(1) is None
    assert distributed_operation.__opero__.policy.backoff_function is jittered_backoff
    for attempt in range(4):
        delay = jittered_backoff(attempt)
        assert 0.75 * 2**attempt <= delay <= 1.25 * 2**attempt


def test_jittered_backoff_drives_the_waits() -> None:
    """With failures, the waits are exactly what jittered_backoff returns for attempts 0..3."""
    waits: list[float] = []
    random.seed(3)
    expected = [jittered_backoff(a) for a in range(4)]
    random.seed(3)
    failing = opero(retries=4, backoff_function=jittered_backoff, _sleep=waits.append)(
        distributed_operation.__wrapped__
    )
    opero_pkg.set_testing(False)
    try:
        assert failing(1) is None
    finally:
        opero_pkg.set_testing(True)
    assert waits == []

    def boom(item: Any) -> None:
        raise ConnectionError(item)

    failing = opero(retries=4, backoff_function=jittered_backoff, _sleep=waits.append)(boom)
    opero_pkg.set_testing(False)
    try:
        with pytest.raises(ConnectionError):
            failing(1)
    finally:
        opero_pkg.set_testing(True)
    assert waits == expected


# --- guide: Cascading Fallbacks -------------------------------------------------------
@opero(arg_fallback="endpoint", retries=2)
def primary_service_call(data, endpoint=["https://primary.api.com", "https://backup.api.com"]):  # type: ignore[no-untyped-def]  # noqa: B006
    return call_api(endpoint[0], data)


@opero(
    cache=True,
    cache_ttl=86400,  # 24 hour cache
)
def cached_service_call(data):  # type: ignore[no-untyped-def]
    # Cached backup service
    return call_backup_service(data)


def resilient_service_call(data):  # type: ignore[no-untyped-def]
    """Multi-level fallback strategy."""
    try:
        # Try primary and backup endpoints
        return primary_service_call(data)
    except AllFailedError:
        try:
            # Try cached backup service
            return cached_service_call(data)
        except Exception:
            # Final fallback: return degraded response
            return {"data": data, "status": "degraded", "source": "fallback"}


def test_cascading_fallbacks_backup_endpoint() -> None:
    """When the primary endpoint fails, the backup endpoint answers."""

    def api(endpoint: str, data: Any) -> Any:
        if "primary" in endpoint:
            raise ConnectionError(endpoint)
        return {"from": endpoint}

    stubs.behaviour["call_api"] = api
    assert resilient_service_call(1) == {"from": "https://backup.api.com"}
    assert [a[0] for n, a in stubs.calls] == ["https://primary.api.com", "https://backup.api.com"]


def test_cascading_fallbacks_cached_service_then_degraded() -> None:
    """All endpoints down: 2 endpoints x 3 rounds, then the cached service, then degraded."""
    cached_service_call.cache_clear()

    def down(*args: Any) -> Any:
        raise ConnectionError("down")

    stubs.behaviour["call_api"] = down
    stubs.behaviour["call_backup_service"] = lambda data: {"backup": data}
    assert resilient_service_call(7) == {"backup": 7}
    assert stubs.count("call_api") == 6
    stubs.behaviour["call_backup_service"] = down
    assert resilient_service_call(7) == {"backup": 7}  # served by the 24 h cache
    assert resilient_service_call(8) == {"data": 8, "status": "degraded", "source": "fallback"}


# --- guide: Smart Fallback Selection --------------------------------------------------
class FallbackSelector:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.endpoint_stats = defaultdict(lambda: {"success": 0, "failure": 0})

    def get_ordered_endpoints(self, endpoints: List[str]) -> List[str]:  # noqa: UP006
        """Order endpoints by success rate."""

        def success_rate(endpoint):  # type: ignore[no-untyped-def]
            stats = self.endpoint_stats[endpoint]
            total = stats["success"] + stats["failure"]
            return stats["success"] / total if total > 0 else 0.5

        return sorted(endpoints, key=success_rate, reverse=True)

    def record_result(self, endpoint: str, success: bool):  # type: ignore[no-untyped-def]
        if success:
            self.endpoint_stats[endpoint]["success"] += 1
        else:
            self.endpoint_stats[endpoint]["failure"] += 1


selector = FallbackSelector()


@opero(arg_fallback="endpoint", retries=3)
def adaptive_fallback_call(query, endpoint=None):  # type: ignore[no-untyped-def]
    if endpoint is None:
        endpoint = selector.get_ordered_endpoints(
            ["https://fast.api.com", "https://reliable.api.com", "https://backup.api.com"]
        )

    current = endpoint[0]
    try:
        result = call_api(current, query)
        selector.record_result(current, True)
        return result
    except Exception as e:  # noqa: F841
        selector.record_result(current, False)
        raise


def test_smart_fallback_selection_learns_from_failures() -> None:
    """endpoint=None is one call per round; after 'fast' fails the retry picks 'reliable'."""
    selector.endpoint_stats.clear()

    def api(endpoint: str, query: Any) -> Any:
        if endpoint == "https://fast.api.com":
            raise ConnectionError(endpoint)
        return {"endpoint": endpoint, "query": query}

    stubs.behaviour["call_api"] = api
    assert adaptive_fallback_call("q") == {"endpoint": "https://reliable.api.com", "query": "q"}
    assert [a[0] for n, a in stubs.calls] == ["https://fast.api.com", "https://reliable.api.com"]
    assert selector.endpoint_stats["https://fast.api.com"]["failure"] == 1


def test_smart_fallback_with_explicit_list_walks_it() -> None:
    """An explicit endpoint list is walked with the values[i:] semantics."""
    selector.endpoint_stats.clear()

    def api(endpoint: str, query: Any) -> Any:
        if endpoint != "c":
            raise ConnectionError(endpoint)
        return endpoint

    stubs.behaviour["call_api"] = api
    assert adaptive_fallback_call("q", endpoint=["a", "b", "c"]) == "c"
    assert [a[0] for n, a in stubs.calls] == ["a", "b", "c"]


# --- guide: Circuit Breaker Pattern ---------------------------------------------------
from datetime import datetime, timedelta  # noqa: E402
from enum import Enum  # noqa: E402


class CircuitState(Enum):
    CLOSED = "closed"  # Normal operation
    OPEN = "open"  # Failing, reject calls
    HALF_OPEN = "half_open"  # Testing recovery


class CircuitBreaker:
    def __init__(self, failure_threshold=5, recovery_timeout=60):  # type: ignore[no-untyped-def]
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.failure_count = 0
        self.last_failure_time = None
        self.state = CircuitState.CLOSED

    def call(self, func, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.state == CircuitState.OPEN:
            if self._should_attempt_reset():
                self.state = CircuitState.HALF_OPEN
            else:
                raise Exception("Circuit breaker is OPEN")

        try:
            result = func(*args, **kwargs)
            self._on_success()
            return result
        except Exception as e:  # noqa: F841
            self._on_failure()
            raise

    def _should_attempt_reset(self):  # type: ignore[no-untyped-def]
        return self.last_failure_time and datetime.now() - self.last_failure_time > timedelta(
            seconds=self.recovery_timeout
        )

    def _on_success(self):  # type: ignore[no-untyped-def]
        self.failure_count = 0
        self.state = CircuitState.CLOSED

    def _on_failure(self):  # type: ignore[no-untyped-def]
        self.failure_count += 1
        self.last_failure_time = datetime.now()
        if self.failure_count >= self.failure_threshold:
            self.state = CircuitState.OPEN


# Usage with Opero
breaker = CircuitBreaker()


@opero(retries=1)  # Minimal retries when using circuit breaker
def protected_operation(data):  # type: ignore[no-untyped-def]
    return breaker.call(external_service_call, data)


def test_circuit_breaker_opens_and_rejects() -> None:
    """Five failures open the breaker; later calls are rejected without reaching the service."""
    breaker.failure_count = 0
    breaker.state = CircuitState.CLOSED

    def down(data: Any) -> Any:
        raise ConnectionError("down")

    stubs.behaviour["external_service_call"] = down
    for _ in range(2):
        with pytest.raises(ConnectionError):
            protected_operation(1)
    with pytest.raises(Exception, match="Circuit breaker is OPEN") as info:
        protected_operation(1)
    assert breaker.state is CircuitState.OPEN
    assert stubs.count("external_service_call") == 5
    assert isinstance(attempt_errors(info.value)[0], ConnectionError)
    with pytest.raises(Exception, match="OPEN") as info:
        protected_operation(2)
    assert all("OPEN" in str(e) for e in attempt_errors(info.value))
    assert stubs.count("external_service_call") == 5


def test_circuit_breaker_recovers() -> None:
    """After the recovery timeout a successful call closes the breaker again."""
    breaker.state = CircuitState.OPEN
    breaker.failure_count = 5
    breaker.last_failure_time = datetime.now() - timedelta(seconds=61)
    stubs.behaviour["external_service_call"] = lambda data: {"ok": data}
    assert protected_operation(3) == {"ok": 3}
    assert breaker.state is CircuitState.CLOSED


# --- guide: Request Deduplication -----------------------------------------------------
from threading import Lock  # noqa: E402


class RequestDeduplicator:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.in_flight = {}
        self.lock = Lock()

    def deduplicated_call(self, key, func, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self.lock:
            if key in self.in_flight:
                # Return existing future
                return self.in_flight[key]

            # Create new future
            future = concurrent.futures.Future()
            self.in_flight[key] = future

        try:
            result = func(*args, **kwargs)
            future.set_result(result)
            return result
        except Exception as e:
            future.set_exception(e)
            raise
        finally:
            with self.lock:
                del self.in_flight[key]


deduplicator = RequestDeduplicator()


@opero(cache=True, cache_ttl=60)
def deduplicated_api_call(resource_id: str):  # type: ignore[no-untyped-def]
    return deduplicator.deduplicated_call(f"api:{resource_id}", fetch_resource, resource_id)


def test_request_deduplication() -> None:
    """Eight concurrent calls for one resource fetch it once and all get the result."""
    deduplicated_api_call.cache_clear()

    def slow_fetch(resource_id: str) -> dict[str, str]:
        time.sleep(0.1)
        return {"id": resource_id}

    stubs.behaviour["fetch_resource"] = slow_fetch
    barrier = threading.Barrier(8)

    def worker() -> Any:
        barrier.wait()
        return deduplicated_api_call("r1")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: worker(), range(8)))
    assert results == [{"id": "r1"}] * 8
    assert stubs.count("fetch_resource") == 1
    assert deduplicator.in_flight == {}


# --- guide: Graceful Degradation ------------------------------------------------------
class FeatureFlags:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.flags = {
            "use_cache_only": False,
            "disable_expensive_features": False,
            "reduced_rate_limit": False,
        }

    def is_enabled(self, flag: str) -> bool:
        return self.flags.get(flag, False)

    def enable_degraded_mode(self):  # type: ignore[no-untyped-def]
        self.flags["use_cache_only"] = True
        self.flags["disable_expensive_features"] = True
        self.flags["reduced_rate_limit"] = True


flags = FeatureFlags()


@opero(
    cache=True,
    cache_ttl=3600,
    rate_limit=lambda: 2.0 if flags.is_enabled("reduced_rate_limit") else 10.0,
)
def adaptive_operation(data):  # type: ignore[no-untyped-def]
    if flags.is_enabled("use_cache_only"):
        # Try cache first
        try:
            return adaptive_operation.cache_get(data)
        except KeyError:
            pass

    if flags.is_enabled("disable_expensive_features"):
        return simple_operation(data)
    else:
        return expensive_operation(data)


def test_graceful_degradation() -> None:
    """Normal mode runs the expensive path; degraded mode serves the cache or the simple path."""
    adaptive_operation.cache_clear()
    stubs.behaviour["expensive_operation"] = lambda data: f"full:{data}"
    stubs.behaviour["simple_operation"] = lambda data: f"simple:{data}"
    assert adaptive_operation("a") == "full:a"
    flags.enable_degraded_mode()
    try:
        assert adaptive_operation("a") == "full:a"  # cached
        assert adaptive_operation("b") == "simple:b"
        assert adaptive_operation.__opero__.policy.rate_limit() == 2.0
    finally:
        flags.flags = {k: False for k in flags.flags}
    assert stubs.count("expensive_operation") == 1
    assert stubs.count("simple_operation") == 1


# --- guide: Custom Metrics Collection -------------------------------------------------
for _name in ("opero_retries_total", "opero_cache_hits_total", "opero_latency_seconds"):
    # The guide registers these in the default registry; drop copies from an earlier import.
    _existing = prometheus_client.REGISTRY._names_to_collectors.get(_name)
    if _existing is not None:
        prometheus_client.REGISTRY.unregister(_existing)

from dataclasses import dataclass  # noqa: E402

import prometheus_client as prom  # noqa: E402

# Define metrics
retry_counter = prom.Counter(
    "opero_retries_total", "Total number of retries", ["function", "exception"]
)
cache_hit_counter = prom.Counter(
    "opero_cache_hits_total", "Total number of cache hits", ["function"]
)
latency_histogram = prom.Histogram(
    "opero_latency_seconds", "Function execution latency", ["function"]
)


@dataclass
class MetricsCollector:
    def record_retry(self, function_name: str, exception: Exception):  # type: ignore[no-untyped-def]
        retry_counter.labels(function=function_name, exception=type(exception).__name__).inc()

    def record_cache_hit(self, function_name: str):  # type: ignore[no-untyped-def]
        cache_hit_counter.labels(function=function_name).inc()

    def record_latency(self, function_name: str, duration: float):  # type: ignore[no-untyped-def]
        latency_histogram.labels(function=function_name).observe(duration)


collector = MetricsCollector()


# Integrate with Opero
@opero(
    retries=3,
    cache=True,
    on_retry=lambda e: collector.record_retry("my_function", e),
    on_cache_hit=lambda: collector.record_cache_hit("my_function"),
)
def monitored_function(data):  # type: ignore[no-untyped-def]
    start = datetime.now()
    try:
        result = process_data(data)
        return result
    finally:
        duration = (datetime.now() - start).total_seconds()
        collector.record_latency("my_function", duration)


def sample(name: str, labels: dict[str, str]) -> float:
    """Read one sample of the default Prometheus registry (0 when absent)."""
    value = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_metrics_callbacks() -> None:
    """Retries, cache hits and latencies land in the guide's Prometheus metrics."""
    monitored_function.cache_clear()
    retries_before = sample(
        "opero_retries_total", {"function": "my_function", "exception": "TimeoutError"}
    )
    hits_before = sample("opero_cache_hits_total", {"function": "my_function"})
    count_before = sample("opero_latency_seconds_count", {"function": "my_function"})
    outcomes: list[Any] = [TimeoutError(), TimeoutError(), "done"]

    def process(data: Any) -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    stubs.behaviour["process_data"] = process
    assert monitored_function(1) == "done"
    assert monitored_function(1) == "done"
    assert monitored_function(1) == "done"
    labels = {"function": "my_function", "exception": "TimeoutError"}
    assert sample("opero_retries_total", labels) - retries_before == 2
    assert sample("opero_cache_hits_total", {"function": "my_function"}) - hits_before == 2
    assert sample("opero_latency_seconds_count", {"function": "my_function"}) - count_before == 3
