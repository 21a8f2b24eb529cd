"""The sync driver of ``@opero``: a short loop over the :class:`~.engine.Engine` decisions.

The first call runs in a wrapper generated with the function's own parameters
(:mod:`opero._pipeline.codegen`) or, for other callables, in a generic
closure; only a failure enters :func:`_retry_from`, the loop that asks the
engine what follows each failed call. With ``arg_fallback`` the loop makes the
first call too (the candidates are sliced before it). Waits use ``time.sleep`` (or the
private ``_sleep``).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import Engine

__all__ = ["FirstCall", "build_sync_call", "first_call"]

RetryFrom = Callable[[Exception | None, tuple[Any, ...], dict[str, Any]], Any]

#: The attribute of a first-call wrapper that only guards the call (see :class:`FirstCall`).
_FIRST_CALL = "_opero_first_call"


@dataclass(frozen=True, slots=True)
class FirstCall:
    """What a first-call wrapper that only guards the call does, for a caller that can do it.

    The wrapper calls ``func`` and hands an ``Exception`` to
    ``retry_from(exc, args, kwargs)``. The native cached call does the same
    without the wrapper's Python frame (``CachedCall(on_error=retry_from)``).

    Attributes:
        func: The function, called once with the call's arguments.
        retry_from: The retry loop, entered only when that call failed.

    """

    func: Callable[..., Any]
    retry_from: RetryFrom


def first_call(inner: Callable[..., Any]) -> FirstCall | None:
    """Return the :class:`FirstCall` of a wrapper of :func:`build_sync_call`, else ``None``."""
    if type(inner) is not types.FunctionType:
        return None
    found = inner.__dict__.get(_FIRST_CALL)
    return found if isinstance(found, FirstCall) else None


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
    template = Template(limiter=limited, on_success=on_success is not None, guard=engine.guarded)
    generated = specialize(
        func,
        template,
        {
            "__opero_retry_from": retry_from,
            "__opero_reserve": engine.reserve,
            "__opero_check_wait": engine.check_wait,
            "__opero_sleep": engine.sleep,
            "__opero_on_success": on_success,
        },
    )
    wrapper = generated or _generic(engine, retry_from)
    if template == Template(guard=True):
        # The wrapper only guards the call (any other step of the template, present or
        # added later, keeps it): a caller may make the first call itself.
        setattr(wrapper, _FIRST_CALL, FirstCall(func, retry_from))
    return wrapper


def _generic(engine: Engine, retry_from: RetryFrom) -> Callable[..., Any]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None

    def call(*args: Any, **kwargs: Any) -> Any:
        if token_wait is not None and (wait := token_wait()):
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
                if token_wait is not None and (wait := token_wait()):
                    sleep(wait)
                call_args, call_kwargs = calls[index]
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
