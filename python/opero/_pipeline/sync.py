"""The sync driver of ``@opero``: a short loop over the :class:`~.engine.Engine` decisions.

The first call runs in a wrapper generated with the function's own parameters
(:mod:`opero._pipeline.codegen`) or, for other callables, in a generic
closure; only a failure enters :func:`_retry_from`, the loop that asks the
engine what follows each failed call. With ``arg_fallback`` the loop makes the
first call too (the candidates are sliced before it), and so it does with
``retry_on_result`` (each result is checked in one place). With ``timeout``
the first-call wrapper reads the clock once, before the call, and hands the
start to the loop only on a failure. Waits use ``time.sleep`` (or the private
``_sleep``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from opero import _testing
from opero._opero_core import TimedCall
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import Engine, _no_token
from opero.errors import ConfigurationError

__all__ = ["build_sync_call"]

RetryFrom = Callable[..., Any]


def build_sync_call(engine: Engine) -> Callable[..., Any]:
    """Return the sync function running retries, fallbacks and the rate limit (no cache).

    The result is ``engine.func`` itself when nothing is configured around
    the call, else a wrapper specialized for the configured layers.
    """
    func = engine.func
    if engine.attempt_timeout is not None:
        raise ConfigurationError(
            f"@opero(attempt_timeout={engine.attempt_timeout!r}) cannot apply to "
            f"{engine.qualname}: it is a sync function, and a thread cannot be cancelled "
            "(the attempt would keep running after its timeout); use timeout= (a deadline "
            "for the whole call, checked between attempts) or decorate an async def function."
        )
    limited = engine.limiter is not None
    on_success = engine.on_success
    if not limited and on_success is None and not engine.guarded and engine.rejects is None:
        return func
    retry_from = _retry_from(engine)
    if engine.fallback is not None or engine.rejects is not None:
        # The loop makes the first call too: the candidates are sliced before it runs
        # (the function may change the list it receives), and a result is checked there.
        def call_loop(*args: Any, **kwargs: Any) -> Any:
            return retry_from(None, args, kwargs)

        return call_loop
    timed = engine.timeout is not None
    native = engine.policy.wait.clock is None  # the engine reads the native coarse clock
    if timed and native and engine.guarded and not limited and on_success is None:
        # The native first call reads that clock in Rust: a success costs no Python call.
        def on_fail(exc: Exception, start: float, /, *args: Any, **kwargs: Any) -> Any:
            return retry_from(exc, args, kwargs, start)

        return TimedCall(func, on_fail)
    generated = specialize(
        func,
        Template(
            limiter=limited,
            on_success=on_success is not None,
            guard=engine.guarded,
            clock=timed and (limited or engine.guarded),
        ),
        {
            "__opero_retry_from": retry_from,
            "__opero_reserve": engine.reserve,
            "__opero_check_wait": engine.check_wait,
            "__opero_sleep": engine.sleep,
            "__opero_on_success": on_success,
            "__opero_clock": engine.clock,
            "__opero_token_deadline": _token_deadline(engine),
        },
    )
    if generated is not None and limited:
        _TokenSwitch(generated, engine.reserve)
    return generated or _generic(engine, retry_from)


class _TokenSwitch:
    """Applies ``set_testing(rate_limit=False)`` to a generated wrapper: no token.

    The wrapper reads ``__opero_reserve`` from its globals on each call; the
    switch replaces it while tokens are bypassed, so the wrapper never reads the
    testing state itself. Kept alive by the wrapper's globals; it holds the
    wrapper weakly (no cycle).
    """

    __slots__ = ("__weakref__", "reserve", "wrapper")

    def __init__(self, wrapper: Callable[..., Any], reserve: Callable[[], float]) -> None:
        self.wrapper = weakref.ref(wrapper)
        self.reserve = reserve
        wrapper.__globals__["__opero_token_switch"] = self
        _testing.listen(self)

    def __call__(self) -> None:
        """Point the wrapper at the bucket, or at no token while tokens are bypassed."""
        wrapper = self.wrapper()
        if wrapper is not None:
            reserve = self.reserve if _testing._rate_limit else _no_token
            wrapper.__globals__["__opero_reserve"] = reserve


def _token_deadline(engine: Engine) -> Callable[[float, float], None]:
    """Return the first call's check of a token wait against ``timeout``."""
    clock, timeout = engine.clock, engine.timeout or 0.0

    def token_deadline(wait: float, start: float) -> None:
        if clock() + wait >= start + timeout:
            raise engine.token_late(wait, start + timeout, [])

    return token_deadline


def _generic(engine: Engine, retry_from: RetryFrom) -> Callable[..., Any]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    clock = engine.clock if engine.timeout is not None else None
    token_deadline = _token_deadline(engine)

    def call(*args: Any, **kwargs: Any) -> Any:
        start = None if clock is None else clock()
        if token_wait is not None and (wait := token_wait()):
            if start is not None:
                token_deadline(wait, start)
            sleep(wait)
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            return retry_from(exc, args, kwargs, start)
        if on_success is not None:
            on_success(result)
        return result

    return call


def _retry_from(engine: Engine) -> RetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    after_failure, rejected = engine.after_failure, engine.rejected
    checks_result = engine.rejects is not None

    def retry_from(
        first: Exception | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        start: float | None = None,
    ) -> Any:
        errors: list[Exception] = []
        error: Exception | None = None
        refused: Exception | None = None
        calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = ()
        # The errors' tracebacks reference this frame: clear it on the way out (no cycle).
        try:
            deadline = engine.deadline(start)
            calls = engine.calls(args, kwargs)
            round_, index, wait = 0, 0, 0.0
            if first is not None:
                errors.append(first)
                round_, index, wait, error = after_failure(errors, 0, 0, len(calls), deadline)
            while error is None:
                if wait > 0:
                    sleep(wait)
                if token_wait is not None and (wait := token_wait()):
                    if deadline is not None and engine.clock() + wait >= deadline:
                        error = engine.token_late(wait, deadline, errors)
                        break
                    sleep(wait)
                call_args, call_kwargs = calls[index]
                try:
                    result = func(*call_args, **call_kwargs)
                except Exception as exc:
                    errors.append(exc)
                    # Decided while handling exc: an error of the decision itself (a
                    # raising backoff_function, retry_on check...) chains to it.
                    round_, index, wait, error = after_failure(
                        errors, round_, index, len(calls), deadline
                    )
                    continue
                if checks_result and (refused := rejected(result, len(errors) + 1)) is not None:
                    errors.append(refused)
                    round_, index, wait, error = after_failure(
                        errors, round_, index, len(calls), deadline
                    )
                    continue
                if on_success is not None:
                    on_success(result)
                return result
            raise error
        finally:
            del first, errors, calls, error, refused

    return retry_from
