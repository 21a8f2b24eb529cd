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
        ),
        {
            "__opero_key": engine.key_function,
            "__opero_buckets": engine.key_map,
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
    keyed_wait = engine.keyed_token_wait if engine.key_function is not None else None

    def call(*args: Any, **kwargs: Any) -> Any:
        if keyed_wait is not None:
            if wait := keyed_wait(args, kwargs):
                sleep(wait)
        elif token_wait is not None and (wait := token_wait()):
            sleep(wait)
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            return retry_from(exc, args, kwargs)
        if on_success is not None:
            on_success(result)
        return result

    return call


def _retry_from(engine: Engine) -> RetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed."""
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
                    sleep(wait)
                call_args, call_kwargs = calls[index]
                if keyed_wait is not None:
                    if wait := keyed_wait(call_args, call_kwargs):
                        sleep(wait)
                elif token_wait is not None and (wait := token_wait()):
                    sleep(wait)
                try:
                    result = func(*call_args, **call_kwargs)
                except Exception as exc:
                    errors.append(exc)
                    # Decided while handling exc: an error of the decision itself (a
                    # raising backoff_function, retry_on check...) chains to it.
                    round_, index, wait, error = after_failure(errors, round_, index, len(calls))
                else:
                    if on_success is not None:
                        on_success(result)
                    return result
            raise error
        finally:
            del first, errors, calls, error

    return retry_from
