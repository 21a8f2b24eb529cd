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

import dataclasses
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opero import _testing
from opero._opero_core import Gate, TimedCall
from opero._pipeline.breaker import BreakerGuard, breaker_guard
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import Engine, _no_token
from opero._pipeline.stats import counting_flag
from opero.errors import ConfigurationError

__all__ = ["FirstCall", "build_sync_call", "first_call"]

RetryFrom = Callable[..., Any]

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
    if engine.attempt_timeout is not None:
        raise ConfigurationError(
            f"@opero(attempt_timeout={engine.attempt_timeout!r}) cannot apply to "
            f"{engine.qualname}: it is a sync function, and a thread cannot be cancelled "
            "(the attempt would keep running after its timeout); use timeout= (a deadline "
            "for the whole call, checked between attempts) or decorate an async def function."
        )
    limited = engine.limiter is not None
    on_success = engine.on_success
    guard = breaker_guard(engine.policy, engine.qualname, engine.func)
    if (
        not limited
        and on_success is None
        and not engine.guarded
        and engine.rejects is None
        and guard is None
    ):
        return func
    retry_from = _retry_from(engine, guard)
    count, counting = engine.counters.count, counting_flag(engine.policy)
    if engine.fallback is not None or engine.rejects is not None:
        # The loop makes the first call too: the candidates are sliced before it runs
        # (the function may change the list it receives), and a result is checked there.
        def call_loop(*args: Any, **kwargs: Any) -> Any:
            if counting.on:
                count()
            return retry_from(None, args, kwargs)

        return call_loop
    if engine.events.needs_arguments:  # a details callback of the first call: generic
        return _generic(engine, retry_from, guard)
    timed = engine.timeout is not None
    native = engine.policy.wait.clock is None  # the engine reads the native coarse clock
    # The native first call has no call counter: not while counting is on at decoration
    # (turned on later, its gate sends every call to the counting wrapper).
    plain = not limited and on_success is None and not guard and not counting.on
    # A local breaker with timeout= and nothing else: the native first call too, which
    # sends a call to the generated wrapper only while the breaker's gate says it must
    # be asked (not closed, or failures counted). Shared in Redis, it always must.
    gated = (
        timed
        and native
        and engine.guarded
        and guard is not None
        and not guard.shared
        and not limited
        and on_success is None
        and not counting.on
    )
    template = Template(
        limiter=limited,
        keyed=engine.key_function is not None,
        key_map=engine.key_map is not None,
        on_success=on_success is not None,
        guard=engine.guarded,
        breaker=guard is not None,
        clock=timed and (limited or engine.guarded),
        count=True,
        count_always=counting.always,
    )
    generated = specialize(
        func,
        template,
        {
            "__opero_runs": engine.counters.runs,
            "__opero_key": engine.key_function,
            "__opero_buckets": engine.key_map,
            "__opero_retry_from": retry_from,
            "__opero_reserve": engine.reserve,
            "__opero_check_wait": engine.check_wait,
            "__opero_sleep": engine.sleep,
            "__opero_on_success": on_success,
            "__opero_clock": engine.clock,
            "__opero_token_deadline": _token_deadline(engine),
            **_breaker_names(guard),
        },
    )
    wrapper = generated or _generic(engine, retry_from, guard)
    if gated and guard is not None:
        return _gated_call(func, retry_from, guard, wrapper)
    if timed and native and engine.guarded and plain:
        # The native first call reads that clock in Rust: a success costs no Python call.
        def on_fail(exc: Exception, start: float, /, *args: Any, **kwargs: Any) -> Any:
            # Run the loop while handling exc, as the generated wrappers do (what it
            # raises chains to exc); exc keeps its own traceback. A raised exc's
            # traceback holds this frame: clear it on the way out (no cycle).
            tb = exc.__traceback__
            try:
                raise exc
            except Exception:
                exc.__traceback__ = tb
                return retry_from(exc, args, kwargs, start)
            finally:
                del exc, tb

        # Its gate is never set: only set_call_counting(True) (Gate.set_forced) sends
        # calls to the generated wrapper, which counts them.
        return TimedCall(func, on_fail, gate=Gate(), slow=wrapper)
    if generated is not None and limited:
        _TokenSwitch(generated, engine.reserve, engine.key_map)
    if dataclasses.replace(template, count=False, count_always=False) == Template(guard=True):
        # The wrapper only guards the call (any other step of the template, present or
        # added later, keeps it): a caller may make the first call itself.
        setattr(wrapper, _FIRST_CALL, FirstCall(func, retry_from))
    return wrapper


def _gated_call(
    func: Callable[..., Any], retry_from: RetryFrom, guard: BreakerGuard, slow: Callable[..., Any]
) -> TimedCall:
    """Return the native first call of ``timeout=`` with a local breaker.

    While the breaker's gate is clear (closed, no failure counted) a call is
    the native timed call; a failure is recorded with the breaker as the
    generated wrapper records it for an unchecked call (probe ``0``), then
    enters the retry loop with the start time. While the gate is set, calls
    go to ``slow``, the generated wrapper (probes, a failure streak to reset).
    """
    failed = guard.failed

    def on_fail(exc: Exception, start: float, /, *args: Any, **kwargs: Any) -> Any:
        # As the generated wrapper: recorded and retried while handling exc (see
        # build_sync_call's on_fail); the traceback is cleared on the way out.
        tb = exc.__traceback__
        try:
            raise exc
        except Exception:
            exc.__traceback__ = tb
            failed(exc, 0, args, kwargs)
            return retry_from(exc, args, kwargs, start)
        finally:
            del exc, tb

    return TimedCall(func, on_fail, gate=guard.breaker._gate, slow=slow)


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


class _TokenSwitch:
    """Applies ``set_testing(rate_limit=False)`` to a generated wrapper: no token.

    The wrapper reads ``__opero_reserve`` from its globals on each call; the
    switch replaces it while tokens are bypassed, so the wrapper never reads the
    testing state itself. Kept alive by the wrapper's globals; it holds the
    wrapper weakly (no cycle).
    """

    __slots__ = ("__weakref__", "buckets", "reserve", "wrapper")

    def __init__(
        self, wrapper: Callable[..., Any], reserve: Callable[..., float], buckets: Any = None
    ) -> None:
        self.wrapper = weakref.ref(wrapper)
        self.reserve = reserve
        #: The per-key map the keyed fast path indexes (an empty dict while bypassed:
        #: every lookup then falls through to ``__opero_reserve``, i.e. no token).
        self.buckets = buckets
        wrapper.__globals__["__opero_token_switch"] = self
        _testing.listen(self)

    def __call__(self) -> None:
        """Point the wrapper at the bucket, or at no token while tokens are bypassed."""
        wrapper = self.wrapper()
        if wrapper is not None:
            reserve = self.reserve if _testing._rate_limit else _no_token
            wrapper.__globals__["__opero_reserve"] = reserve
            if self.buckets is not None:
                buckets = self.buckets if _testing._rate_limit else {}
                wrapper.__globals__["__opero_buckets"] = buckets


def _token_deadline(engine: Engine) -> Callable[..., None]:
    """Return the first call's check of a token wait against ``timeout``."""
    clock, timeout = engine.clock, engine.timeout or 0.0

    def token_deadline(wait: float, start: float, args: Any = (), kwargs: Any = None) -> None:
        if clock() + wait >= start + timeout:
            raise engine.token_late(wait, start + timeout, [], args, kwargs)

    return token_deadline


def _generic(
    engine: Engine, retry_from: RetryFrom, guard: BreakerGuard | None = None
) -> Callable[..., Any]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, sleep, on_success = engine.func, engine.sleep, engine.on_success
    token_wait = engine.token_wait if engine.limiter is not None else None
    keyed_wait = engine.keyed_token_wait if engine.key_function is not None else None
    clock = engine.clock if engine.timeout is not None else None
    timeout = engine.timeout or 0.0
    token_deadline = _token_deadline(engine)
    guarded = engine.guarded
    count, counting = engine.counters.count, counting_flag(engine.policy)

    def call(*args: Any, **kwargs: Any) -> Any:
        if counting.on:
            count()
        start = None if clock is None else clock()
        probe = guard.breaker._check and guard.enter() if guard is not None else 0
        try:
            limit = None if start is None else start + timeout
            if keyed_wait is not None:
                wait = keyed_wait(args, kwargs, deadline=limit)
            elif token_wait is not None:
                wait = token_wait(args, kwargs, deadline=limit)
            else:
                wait = 0.0
            if wait:
                if start is not None:
                    token_deadline(wait, start, args, kwargs)
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
            return retry_from(exc, args, kwargs, start, wait)
        except BaseException:
            if probe:
                guard.release(probe)  # type: ignore[union-attr]
            raise
        if guard is not None and probe:
            guard.ok(probe)
        if on_success is not None:
            on_success(result, args, kwargs, 1, wait)
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
    after_failure, rejected = engine.after_failure, engine.rejected
    checks_result = engine.rejects is not None

    def retry_from(
        first: Exception | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        start: float | None = None,
        first_wait: float = 0.0,
    ) -> Any:
        errors: list[Exception] = []
        error: Exception | None = None
        refused: Exception | None = None
        calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = ()
        # The errors' tracebacks reference this frame: clear it on the way out (no cycle).
        try:
            deadline = engine.deadline(start)
            calls = engine.calls(args, kwargs)
            # first_wait: the first call's token wait (its wrapper slept it).
            round_, index, wait, waited = 0, 0, 0.0, first_wait
            if first is not None:
                errors.append(first)
                round_, index, wait, error = after_failure(
                    errors, 0, 0, len(calls), deadline, args, kwargs, waited
                )
            while error is None:
                if wait > 0:
                    if guard is not None:  # open now: refused without the wait
                        guard.release(guard.enter())
                    sleep(wait)
                    waited += wait
                # Asked after the wait: the circuit may have opened meanwhile.
                probe = guard.enter() if guard is not None else 0
                call_args, call_kwargs = calls[index]
                try:
                    if keyed_wait is not None:
                        n = len(errors) + 1
                        given = (args, kwargs)
                        wait = keyed_wait(call_args, call_kwargs, n, waited, given, deadline)
                    elif token_wait is not None:
                        wait = token_wait(args, kwargs, len(errors) + 1, waited, deadline)
                    else:
                        wait = 0.0
                    if wait:
                        if deadline is not None and engine.clock() + wait >= deadline:
                            if probe:
                                guard.release(probe)  # type: ignore[union-attr]
                            error = engine.token_late(wait, deadline, errors, args, kwargs, waited)
                            break
                        sleep(wait)
                        waited += wait
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
                    round_, index, wait, error = after_failure(
                        errors, round_, index, len(calls), deadline, args, kwargs, waited
                    )
                    continue
                except BaseException:
                    if probe:
                        guard.release(probe)  # type: ignore[union-attr]
                    raise
                if guard is not None:
                    guard.ok(probe)
                if checks_result and (refused := rejected(result, len(errors) + 1)) is not None:
                    errors.append(refused)
                    round_, index, wait, error = after_failure(
                        errors, round_, index, len(calls), deadline, args, kwargs, waited
                    )
                    continue
                if on_success is not None:
                    on_success(result, args, kwargs, len(errors) + 1, waited)
                return result
            raise error
        finally:
            del first, errors, calls, error, refused

    return retry_from
