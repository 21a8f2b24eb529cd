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

from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import Engine
from opero._pipeline.stats import counting_flag

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
    if not limited and on_success is None and not engine.guarded:
        return func
    retry_from = _retry_from(engine)
    count, counting = engine.counters.count, counting_flag(engine.policy)
    if engine.fallback is not None:
        # The loop makes the first call too: the candidates are sliced before it runs
        # (the function may change the list it receives).
        def call_fallback(*args: Any, **kwargs: Any) -> Any:
            if counting.on:
                count()
            return retry_from(None, args, kwargs)

        return call_fallback
    if engine.events.needs_arguments:  # a details callback of the first call: generic
        return _generic(engine, retry_from)
    generated = specialize(
        func,
        Template(
            limiter=limited,
            on_success=on_success is not None,
            guard=engine.guarded,
            count=True,
            count_always=counting.always,
        ),
        {
            "__opero_runs": engine.counters.runs,
            "__opero_retry_from": retry_from,
            "__opero_reserve": engine.reserve,
            "__opero_check_wait": engine.check_wait,
            "__opero_sleep": engine.sleep,
            "__opero_on_success": on_success,
        },
    )
    return generated or _generic(engine, retry_from)


def _generic(engine: Engine, retry_from: RetryFrom) -> Callable[..., Any]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    count, counting = engine.counters.count, counting_flag(engine.policy)

    def call(*args: Any, **kwargs: Any) -> Any:
        if counting.on:
            count()
        waited = 0.0
        if token_wait is not None and (waited := token_wait(args, kwargs)):
            sleep(waited)
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            return retry_from(exc, args, kwargs)
        if on_success is not None:
            on_success(result, args, kwargs, 1, waited)
        return result

    return call


def _retry_from(engine: Engine) -> RetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    after_failure = engine.after_failure

    def retry_from(first: Exception | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        errors: list[Exception] = []
        error: Exception | None = None
        calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = ()
        # The errors' tracebacks reference this frame: clear it on the way out (no cycle).
        try:
            calls = engine.calls(args, kwargs)
            round_, index, wait, waited = 0, 0, 0.0, 0.0
            if first is not None:
                errors.append(first)
                round_, index, wait, error = after_failure(errors, 0, 0, len(calls), args, kwargs)
            while error is None:
                if wait > 0:
                    sleep(wait)
                    waited += wait
                if token_wait is not None and (
                    wait := token_wait(args, kwargs, len(errors) + 1, waited)
                ):
                    sleep(wait)
                    waited += wait
                call_args, call_kwargs = calls[index]
                try:
                    result = func(*call_args, **call_kwargs)
                except Exception as exc:
                    errors.append(exc)
                    # Decided while handling exc: an error of the decision itself (a
                    # raising backoff_function, retry_on check...) chains to it.
                    round_, index, wait, error = after_failure(
                        errors, round_, index, len(calls), args, kwargs, waited
                    )
                else:
                    if on_success is not None:
                        on_success(result, args, kwargs, len(errors) + 1, waited)
                    return result
            raise error
        finally:
            del first, errors, calls, error

    return retry_from
