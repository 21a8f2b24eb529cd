"""The sync driver of ``@opero``: a short loop over the :class:`~.engine.Engine` decisions.

The first call runs in a wrapper generated with the function's own parameters
(:mod:`opero._pipeline.codegen`) or, for other callables, in a generic
closure; only a failure enters :func:`_retry_from`, the loop that asks the
engine what follows each failed call. With ``arg_fallback`` the loop makes the
first call too (the candidates are sliced before it). Waits use ``time.sleep`` (or the
private ``_sleep``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opero._pipeline.breaker import BreakerGuard, breaker_guard
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import Engine

__all__ = ["build_sync_call"]

RetryFrom = Callable[[Exception | None, tuple[Any, ...], dict[str, Any]], Any]


def build_sync_call(engine: Engine) -> Callable[..., Any]:
    """Return the sync function running retries, fallbacks and the rate limit (no cache).

    The result is ``engine.func`` itself when nothing is configured around
    the call, else a wrapper specialized for the configured layers.
    """
    func = engine.func
    limited = engine.limiter is not None
    on_success = engine.on_success
    guard = breaker_guard(engine.policy, engine.qualname, engine.func)
    if not limited and on_success is None and not engine.guarded and guard is None:
        return func
    retry_from = _retry_from(engine, guard)
    if engine.fallback is not None:
        # The loop makes the first call too: the candidates are sliced before it runs
        # (the function may change the list it receives).
        def call_fallback(*args: Any, **kwargs: Any) -> Any:
            return retry_from(None, args, kwargs)

        return call_fallback
    generated = specialize(
        func,
        Template(
            limiter=limited,
            keyed=engine.key_function is not None,
            key_map=engine.key_map is not None,
            on_success=on_success is not None,
            guard=engine.guarded,
            breaker=guard is not None,
        ),
        {
            "__opero_key": engine.key_function,
            "__opero_buckets": engine.key_map,
            "__opero_retry_from": retry_from,
            "__opero_reserve": engine.reserve,
            "__opero_check_wait": engine.check_wait,
            "__opero_sleep": engine.sleep,
            "__opero_on_success": on_success,
            **_breaker_names(guard),
        },
    )
    return generated or _generic(engine, retry_from, guard)


def _breaker_names(guard: BreakerGuard | None) -> dict[str, Any]:
    """Return the generated wrapper's names for the circuit breaker (none without one)."""
    if guard is None:
        return {}
    return {
        "__opero_cb": guard.breaker,
        "__opero_enter": guard.enter,
        "__opero_ok": guard.ok,
        "__opero_failed": guard.failed,
        "__opero_release": guard.release,
    }


def _generic(
    engine: Engine, retry_from: RetryFrom, guard: BreakerGuard | None
) -> Callable[..., Any]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    keyed_wait = engine.keyed_token_wait if engine.key_function is not None else None
    guarded = engine.guarded

    def call(*args: Any, **kwargs: Any) -> Any:
        probe = guard.breaker._check and guard.enter() if guard is not None else 0
        try:
            if keyed_wait is not None:
                if wait := keyed_wait(args, kwargs):
                    sleep(wait)
            elif token_wait is not None and (wait := token_wait()):
                sleep(wait)
        except BaseException:
            if probe:  # no call was made: the probe gives its slot back
                guard.release(probe)  # type: ignore[union-attr]
            raise
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            if guard is not None:
                guard.failed(exc, probe, args, kwargs)
                if not guarded:
                    raise
            return retry_from(exc, args, kwargs)
        except BaseException:
            if probe:
                guard.release(probe)  # type: ignore[union-attr]
            raise
        if guard is not None and probe:
            guard.ok(probe)
        if on_success is not None:
            on_success(result)
        return result

    return call


def _retry_from(engine: Engine, guard: BreakerGuard | None = None) -> RetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed.

    With a circuit breaker, each call asks it before its wait and token: an open
    circuit ends the loop at once with ``CircuitOpenError`` (never retried).
    """
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    keyed_wait = engine.keyed_token_wait if engine.key_function is not None else None
    after_failure = engine.after_failure

    def retry_from(first: Exception | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        errors: list[Exception] = []
        error: Exception | None = None
        calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = ()
        # The errors' tracebacks reference this frame: clear it on the way out (no cycle).
        try:
            calls = engine.calls(args, kwargs)
            round_, index, wait = 0, 0, 0.0
            if first is not None:
                errors.append(first)
                round_, index, wait, error = after_failure(errors, 0, 0, len(calls))
            while error is None:
                if wait > 0:
                    if guard is not None:  # open now: refused without the wait
                        guard.release(guard.enter())
                    sleep(wait)
                # Asked after the wait: the circuit may have opened meanwhile.
                probe = guard.enter() if guard is not None else 0
                call_args, call_kwargs = calls[index]
                try:
                    if keyed_wait is not None:
                        if wait := keyed_wait(call_args, call_kwargs):
                            sleep(wait)
                    elif token_wait is not None and (wait := token_wait()):
                        sleep(wait)
                except BaseException:
                    if probe:  # no call was made: the probe gives its slot back
                        guard.release(probe)  # type: ignore[union-attr]
                    raise
                try:
                    result = func(*call_args, **call_kwargs)
                except Exception as exc:
                    if guard is not None:
                        guard.failed(exc, probe, call_args, call_kwargs, len(errors) + 1)
                    errors.append(exc)
                    # Decided while handling exc: an error of the decision itself (a
                    # raising backoff_function, retry_on check...) chains to it.
                    round_, index, wait, error = after_failure(errors, round_, index, len(calls))
                except BaseException:
                    if probe:
                        guard.release(probe)  # type: ignore[union-attr]
                    raise
                else:
                    if guard is not None:
                        guard.ok(probe)
                    if on_success is not None:
                        on_success(result)
                    return result
            raise error
        finally:
            del first, errors, calls, error

    return retry_from
