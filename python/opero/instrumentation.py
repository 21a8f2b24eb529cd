"""Metrics and global hooks for every ``@opero`` function: Prometheus, OpenTelemetry, your own.

Everything here is global and can be set up at any time: it covers the
functions decorated before it as well as after, in the process where it runs.

* :func:`set_on_event_hooks` registers callables that receive a
  :class:`~opero.CallDetails` on every retry, failed fallback candidate,
  failure, rate-limit wait and circuit-breaker transition of every decorated
  function (stamina users know this as ``set_on_retry_hooks``).
* :class:`PrometheusInstrumentation` (extra ``prometheus``: ``prometheus_client``)
  and :class:`OpenTelemetryInstrumentation` (extra ``otel``:
  ``opentelemetry-api``) export the counters of :func:`snapshot`, labelled by
  function (``module.qualname``). Both read the counters when the metrics are
  collected (a scrape, an export): the calls themselves do no extra work.
* :func:`snapshot` returns every live function's
  :class:`~opero.FunctionStats`, summed by name; ``f.stats()`` returns one.
* :func:`set_call_counting` turns on the ``calls`` counter of uncached
  functions (off by default: an uncached call that succeeds costs nothing
  more than before). The two integrations turn it on. Every other counter,
  and ``calls`` of a cached function, is always on.

Importing :mod:`opero` never imports this module's optional dependencies;
this module imports them only when an integration is created.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opero._pipeline import callbacks as _callbacks
from opero._pipeline.details import CallDetails
from opero._pipeline.stats import (
    FunctionStats,
    counting_calls,
    live_counters,
    set_call_counting,
)

__all__ = [
    "OpenTelemetryInstrumentation",
    "PrometheusInstrumentation",
    "breaker_transitions",
    "counting_calls",
    "get_on_event_hooks",
    "set_call_counting",
    "set_on_event_hooks",
    "snapshot",
]

#: The counters exported, with their help text (the names of :class:`FunctionStats`).
METRICS: dict[str, str] = {
    "calls": "Calls of the decorated function (cache hits included).",
    "failures": "Calls that raised (after their retries and fallbacks).",
    "retries": "Retries made.",
    "retry_waits": "Backoff waits before retries.",
    "retry_wait_seconds": "Seconds spent in backoff waits before retries.",
    "fallbacks": "Fallback candidates that failed before the next one was tried.",
    "rate_limit_waits": "Waits for a rate-limit token.",
    "rate_limit_wait_seconds": "Seconds spent waiting for rate-limit tokens.",
    "cache_hits": "Calls answered from the cache.",
    "cache_misses": "Cache misses that computed the value.",
    "coalesced": "Cache misses that received another caller's in-flight computation.",
}

_breaker_lock = threading.Lock()
_breakers: dict[tuple[str, str], int] = {}


def set_on_event_hooks(hooks: Iterable[Callable[[CallDetails], Any]] | None) -> None:
    """Set the global hooks called with a :class:`~opero.CallDetails` on every slow-path event.

    Events (``details.event``): ``"retry"``, ``"fallback"``, ``"failure"``,
    ``"rate_limit_wait"``, and ``"circuit_<state>"`` for a circuit breaker
    entering ``<state>`` (``details.function`` is then the breaker's name).
    Successes and cache hits are not events here (they are the hot path):
    they are counted, see :func:`snapshot`. A hook that raises is logged on the
    ``opero`` logger and ignored. The hooks apply at once to every decorated
    function, including those decorated before.

    Args:
        hooks: The hooks, in call order; ``None`` or an empty iterable removes them.

    Raises:
        TypeError: A hook is not callable.

    """
    items = tuple(hooks or ())
    for hook in items:
        if not callable(hook):
            raise TypeError(
                f"set_on_event_hooks: {hook!r} is not callable; pass functions taking one "
                "CallDetails, e.g. set_on_event_hooks([lambda details: print(details.event)])"
            )
    _callbacks.hooks = items


def get_on_event_hooks() -> tuple[Callable[[CallDetails], Any], ...]:
    """Return the global hooks set by :func:`set_on_event_hooks`."""
    return _callbacks.hooks


def snapshot() -> dict[str, FunctionStats]:
    """Return the counters of every live decorated function, by ``module.qualname``.

    Decorations of the same name (a function decorated twice, a method per
    class...) are summed. The counters count from decoration: a reset by
    ``f.stats(reset=True)`` does not change them (exported counters never go
    down while the function lives). A function that was garbage-collected is
    no longer listed.
    """
    out: dict[str, FunctionStats] = {}
    for counters in live_counters():
        stats = counters.raw()
        previous = out.get(stats.function)
        out[stats.function] = stats if previous is None else previous + stats
    return out


def breaker_transitions() -> dict[tuple[str, str], int]:
    """Return how many times each circuit breaker entered each state: ``{(name, state): n}``."""
    with _breaker_lock:
        return dict(_breakers)


def _emit_breaker(name: str, state: str) -> None:
    """Count one transition of breaker ``name`` into ``state`` and tell the global hooks.

    For the circuit breaker (and any other opero layer with a state machine):
    call it on each transition, with ``state`` one of ``"open"``,
    ``"half_open"`` or ``"closed"``. Exported as
    ``opero_circuit_transitions_total{breaker, state}`` (Prometheus) and
    ``opero.circuit.transitions`` (OpenTelemetry). Never raises.
    """
    with _breaker_lock:
        _breakers[name, state] = _breakers.get((name, state), 0) + 1
    hooks = _callbacks.hooks
    if not hooks:
        return
    details = CallDetails(name, event=f"circuit_{state}")
    for hook in hooks:
        try:
            hook(details)
        except Exception:
            _callbacks.logger.exception(
                "opero: instrumentation hook raised on a circuit transition; ignored",
                extra={"opero_event": "hook_error", "opero_function": name},
            )


def _rows() -> Iterator[tuple[str, FunctionStats]]:
    yield from sorted(snapshot().items())


class PrometheusInstrumentation:
    """Export opero's counters to Prometheus (``pip install 'opero[prometheus]'``).

    Registers a collector that reads the counters of every decorated function
    at each scrape: ``opero_calls_total{function="app.fetch"}``,
    ``opero_retries_total``, ``opero_retry_wait_seconds_total``,
    ``opero_fallbacks_total``, ``opero_rate_limit_waits_total``,
    ``opero_cache_hits_total``, ``opero_cache_misses_total``,
    ``opero_coalesced_total``... (one per field of :class:`~opero.FunctionStats`)
    and ``opero_circuit_transitions_total{breaker, state}``.

    Args:
        registry: The ``prometheus_client`` registry; default its global
            ``REGISTRY``.
        namespace: The prefix of every metric name.

    Raises:
        ImportError: ``prometheus_client`` is not installed (the message says
            which extra to install).

    """

    def __init__(self, registry: Any = None, *, namespace: str = "opero") -> None:
        try:
            import prometheus_client
        except ImportError as exc:
            raise ImportError(
                "PrometheusInstrumentation needs prometheus_client: pip install 'opero[prometheus]'"
            ) from exc
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self.namespace = namespace
        self.registry.register(self)
        set_call_counting(True)

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by the registry at each scrape)."""
        return self._families(list(_rows()), breaker_transitions())

    def describe(self) -> list[Any]:
        """Return the metric families without samples (the registry checks names with them).

        Registering a second exporter on the same registry therefore raises
        ``ValueError: Duplicated timeseries`` instead of doubling every sample.
        """
        return list(self._families([], {}))

    def _families(
        self, rows: list[tuple[str, FunctionStats]], transitions: dict[tuple[str, str], int]
    ) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        for name, help_text in METRICS.items():
            family = CounterMetricFamily(f"{self.namespace}_{name}", help_text, labels=["function"])
            for function, stats in rows:
                family.add_metric([function], getattr(stats, name))
            yield family
        family = CounterMetricFamily(
            f"{self.namespace}_circuit_transitions",
            "Circuit breaker transitions into a state.",
            labels=["breaker", "state"],
        )
        for (breaker, state), count in sorted(transitions.items()):
            family.add_metric([breaker, state], count)
        yield family

    def unregister(self) -> None:
        """Remove the collector from its registry."""
        self.registry.unregister(self)


class OpenTelemetryInstrumentation:
    """Export opero's counters as OpenTelemetry metrics (``pip install 'opero[otel]'``).

    Creates one observable counter per field of :class:`~opero.FunctionStats`
    on the meter ``"opero"`` (``opero.calls``, ``opero.retries``,
    ``opero.retry_wait_seconds``, ``opero.cache_hits``, ``opero.coalesced``...,
    attribute ``function``) and ``opero.circuit.transitions`` (attributes
    ``breaker`` and ``state``). They are read when the SDK's reader collects.

    Args:
        meter_provider: The ``MeterProvider``; default the global one
            (``opentelemetry.metrics.get_meter_provider()``).

    Raises:
        ImportError: ``opentelemetry-api`` is not installed.

    """

    def __init__(self, meter_provider: Any = None) -> None:
        try:
            from opentelemetry import metrics
        except ImportError as exc:
            raise ImportError(
                "OpenTelemetryInstrumentation needs opentelemetry-api: pip install 'opero[otel]'"
            ) from exc
        self.meter = metrics.get_meter("opero", meter_provider=meter_provider)
        set_call_counting(True)
        self.instruments = [
            self.meter.create_observable_counter(
                f"opero.{name}",
                callbacks=[self._observer(name, metrics.Observation)],
                unit="s" if name.endswith("_seconds") else "1",
                description=help_text,
            )
            for name, help_text in METRICS.items()
        ]
        observation = metrics.Observation

        def transitions(options: Any) -> Iterator[Any]:
            for (breaker, state), count in sorted(breaker_transitions().items()):
                yield observation(count, {"breaker": breaker, "state": state})

        self.instruments.append(
            self.meter.create_observable_counter(
                "opero.circuit.transitions",
                callbacks=[transitions],
                unit="1",
                description="Circuit breaker transitions into a state.",
            )
        )

    @staticmethod
    def _observer(name: str, observation: Any) -> Callable[[Any], Iterator[Any]]:
        def observe(options: Any) -> Iterator[Any]:
            for function, stats in _rows():
                yield observation(getattr(stats, name), {"function": function})

        return observe
