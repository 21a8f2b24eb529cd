"""The async driver of ``@opero``: the sync driver's loop, awaiting the function and waits.

:func:`build_async_call` mirrors :func:`opero._pipeline.sync.build_sync_call`
over the same :class:`~opero._pipeline.engine.Engine` decisions: it awaits the
function and waits with ``asyncio.sleep`` (or the private ``_asleep``), so it
never blocks the event loop. ``asyncio.CancelledError`` is a ``BaseException``
and is never caught, retried or wrapped.

``attempt_timeout`` runs each attempt under :func:`asyncio.timeout`: an attempt
still running then is cancelled and counts as a ``TimeoutError`` that is always
retryable (``retry_on`` is not consulted for it: the caller asked for it). A
cancellation of the caller is never turned into a ``TimeoutError``.
``timeout`` does not cancel a running attempt (as in stamina and tenacity): it
is checked between attempts; combine it with ``attempt_timeout`` to bound each
attempt too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opero import _testing
from opero._pipeline.breaker import BreakerGuard, breaker_guard
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import ATTEMPT_TIMEOUT, Engine, _no_token
from opero._pipeline.stats import counting_flag
from opero._ratelimit import MIN_WAIT

__all__ = ["build_async_call"]

ARetryFrom = Callable[..., Awaitable[Any]]
TakeToken = Callable[[float | None], Awaitable[float]]


def build_async_call(engine: Engine) -> Callable[..., Awaitable[Any]]:
    """Return the async function running retries, fallbacks and the rate limit (no cache)."""
    limited = engine.limiter is not None
    asleep = engine.asleep
    atoken_wait = engine.atoken_wait
    clock, timeout = engine.clock, engine.timeout

    def check_deadline(delay: float, start: float | None) -> None:
        if start is not None and timeout is not None and clock() + delay >= start + timeout:
            raise engine.token_late(delay, start + timeout, [])

    if engine.async_source:

        async def take_token(start: float | None = None) -> float:
            limit = None if start is None or timeout is None else start + timeout
            wait = await atoken_wait(deadline=limit)
            if wait:
                check_deadline(wait, start)
                await asleep(wait)
            return wait

    else:
        # The native bucket books without an await; its call is inlined here (as in the
        # generated sync wrapper) rather than going through token_wait: one frame less
        # per call of a rate-limited async function.
        reserve, check_wait = engine.reserve, engine.check_wait

        def testing_changed() -> None:
            # set_testing(rate_limit=False) rebinds the bucket: no per-call check.
            nonlocal reserve
            reserve = engine.reserve if _testing._rate_limit else _no_token

        async def take_token(start: float | None = None) -> float:
            delay = reserve()
            if delay > MIN_WAIT:
                check_wait(delay, start)
                check_deadline(delay, start)
                await asleep(delay)
                return delay
            return 0.0

    listener = None if engine.async_source else testing_changed
    keyed = engine.key_function is not None
    token: Callable[..., Awaitable[float]] = take_token
    if keyed:
        # A callable rate_limit_key: the token is booked in the bucket of the key.
        token, listener = _key_token(engine, check_deadline)
    func = engine.func
    if engine.attempt_timeout is not None:
        func = _with_attempt_timeout(func, engine.attempt_timeout, engine)
    guard = breaker_guard(engine.policy, engine.qualname, engine.func)
    retry_from = _aretry_from(engine, token, func, guard)
    count, counting = engine.counters.count, counting_flag(engine.policy)
    if engine.fallback is not None or engine.rejects is not None:
        # The loop makes the first call too: the candidates are sliced before it runs,
        # and a result is checked there.
        async def acall_loop(*args: Any, **kwargs: Any) -> Any:
            if counting.on:
                count()
            return await retry_from(None, args, kwargs)

        return _listening(acall_loop, listener if limited else None)
    generated = None
    # A details callback of the first call needs the arguments: the generic wrapper.
    if func is engine.func and not engine.events.needs_arguments:
        generated = specialize(
            func,
            Template(
                is_async=True,
                limiter=limited,
                keyed=keyed,
                on_success=engine.on_success is not None,
                guard=engine.guarded,
                breaker=guard is not None,
                breaker_await=guard is not None and guard.shared,
                clock=timeout is not None and (limited or engine.guarded),
                count=True,
                count_always=counting.always,
            ),
            {
                "__opero_runs": engine.counters.runs,
                "__opero_key": engine.key_function,
                "__opero_retry_from": retry_from,
                "__opero_take_token": token,
                "__opero_on_success": engine.on_success,
                "__opero_clock": clock,
                **_breaker_names(guard),
            },
        )
    wrapper = generated or _generic(engine, retry_from, token if limited else None, func, guard)
    return _listening(wrapper, listener if limited else None)


def _breaker_names(guard: BreakerGuard | None) -> dict[str, Any]:
    """Return the generated wrapper's names for the breaker (awaited when shared in Redis)."""
    if guard is None:
        return {}
    if guard.shared:
        return {
            "__opero_cb": guard.breaker,
            "__opero_enter": guard.aenter,
            "__opero_ok": guard.aok,
            "__opero_failed": guard.afailed,
            "__opero_release": guard.release,
        }
    # Local state: no await (its lock is never held across one).
    return {
        "__opero_cb": guard.breaker,
        "__opero_enter": guard.enter,
        "__opero_ok": guard.ok,
        "__opero_failed": guard.failed,
        "__opero_release": guard.release,
    }


def _key_token(
    engine: Engine, check_deadline: Callable[[float, float | None], None]
) -> tuple[Callable[..., Awaitable[float]], Callable[[], None] | None]:
    """Return ``take_token(key, start=None)`` for a callable ``rate_limit_key``.

    Also returns the testing-switch listener of the in-memory map (``None`` for
    Redis, whose ``akey_token_wait`` reads the switch itself).
    """
    akey_token_wait, asleep, timeout = engine.akey_token_wait, engine.asleep, engine.timeout
    if engine.async_source:

        async def take_token(key: Any, start: float | None = None) -> float:
            limit = None if start is None or timeout is None else start + timeout
            wait = await akey_token_wait(key, deadline=limit)
            if wait:
                check_deadline(wait, start)
                await asleep(wait)
            return wait

        return take_token, None
    # An in-memory map books without an await: inlined, as for a single bucket.
    reserve, check_wait = engine.reserve, engine.check_wait

    def testing_changed() -> None:
        # set_testing(rate_limit=False) rebinds the map: no per-call check.
        nonlocal reserve
        reserve = engine.reserve if _testing._rate_limit else _no_token

    async def take_native_token(key: Any, start: float | None = None) -> float:
        delay = reserve(key)
        if delay > MIN_WAIT:
            check_wait(delay, start)
            check_deadline(delay, start)
            await asleep(delay)
            return delay
        return 0.0

    return take_native_token, testing_changed


def _listening(
    wrapper: Callable[..., Awaitable[Any]], listener: Callable[[], None] | None
) -> Callable[..., Awaitable[Any]]:
    """Keep ``listener`` alive with ``wrapper`` and register it with the testing switch."""
    if listener is not None:
        wrapper.__dict__["__opero_testing_listener__"] = listener
        _testing.listen(listener)
    return wrapper


def _with_attempt_timeout(
    func: Callable[..., Awaitable[Any]], seconds: float, owner: Engine
) -> Callable[..., Awaitable[Any]]:
    """Return ``func`` with each call cancelled after ``seconds`` (a marked ``TimeoutError``).

    The mark names ``owner``: only that engine retries the error regardless of
    ``retry_on`` (an outer layer, or a function re-raising it, applies its own rules).
    """
    # Unguarded (no retry, callback or fallback), no engine reads the mark.
    mark = owner if owner.guarded else None

    async def attempt(*args: Any, **kwargs: Any) -> Any:
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                return await func(*args, **kwargs)
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the function's own TimeoutError
            error = TimeoutError(f"the attempt took more than attempt_timeout={seconds:g} s")
            if mark is not None:
                error.__dict__[ATTEMPT_TIMEOUT] = mark
            try:
                raise error from exc
            finally:
                del error  # its traceback holds this frame (no cycle)

    return attempt


def _generic(
    engine: Engine,
    retry_from: ARetryFrom,
    take_token: Callable[..., Awaitable[float]] | None,
    func: Callable[..., Awaitable[Any]],
    guard: BreakerGuard | None = None,
) -> Callable[..., Awaitable[Any]]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    on_success = engine.on_success
    clock = engine.clock if engine.timeout is not None else None
    key_function = engine.key_function
    guarded = engine.guarded
    count, counting = engine.counters.count, counting_flag(engine.policy)
    # A details on_rate_limit_wait is told the call's arguments: book through the engine.
    detailed = take_token is not None and key_function is None and engine.events.needs_arguments
    atoken_wait, asleep, timeout = engine.atoken_wait, engine.asleep, engine.timeout or 0.0

    async def acall(*args: Any, **kwargs: Any) -> Any:
        if counting.on:
            count()
        start = None if clock is None else clock()
        probe = (guard.breaker._check and await guard.aenter()) if guard is not None else 0
        waited = 0.0
        try:
            if key_function is not None:
                assert take_token is not None
                waited = await take_token(key_function(*args, **kwargs), start)
            elif detailed:
                limit = None if start is None else start + timeout
                if waited := await atoken_wait(args, kwargs, deadline=limit):
                    if start is not None and engine.clock() + waited >= start + timeout:
                        raise engine.token_late(waited, start + timeout, [], args, kwargs)
                    await asleep(waited)
            elif take_token is not None:
                waited = await take_token(start)
        except BaseException:
            if probe:  # no call was made: the probe gives its slot back
                guard.release(probe)  # type: ignore[union-attr]
            raise
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            if guard is not None:
                await guard.afailed(exc, probe, args, kwargs)
                if not guarded:
                    raise
            return await retry_from(exc, args, kwargs, start, waited)
        except BaseException:
            if probe:
                guard.release(probe)  # type: ignore[union-attr]
            raise
        if guard is not None and probe:
            await guard.aok(probe)
        if on_success is not None:
            on_success(result, args, kwargs, 1, waited)
        return result

    return acall


def _aretry_from(
    engine: Engine,
    take_token: Callable[..., Awaitable[float]],
    func: Callable[..., Awaitable[Any]],
    guard: BreakerGuard | None = None,
) -> ARetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed.

    With a circuit breaker, each call asks it before its wait and token: an open
    circuit ends the loop at once with ``CircuitOpenError`` (never retried).
    """
    asleep, on_success = engine.asleep, engine.on_success
    limited = engine.limiter is not None
    key_function = engine.key_function
    after_failure, rejected = engine.after_failure, engine.rejected
    checks_result = engine.rejects is not None

    async def retry_from(
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
                        guard.release(await guard.aenter())
                    await asleep(wait)
                    waited += wait
                # Asked after the wait: the circuit may have opened meanwhile.
                probe = (await guard.aenter()) if guard is not None else 0
                call_args, call_kwargs = calls[index]
                try:
                    if limited:
                        n = len(errors) + 1
                        if key_function is None:
                            wait = await engine.atoken_wait(args, kwargs, n, waited, deadline)
                        else:
                            key = key_function(*call_args, **call_kwargs)
                            wait = await engine.akey_token_wait(
                                key, args, kwargs, n, waited, deadline
                            )
                        if wait > 0:
                            if deadline is not None and engine.clock() + wait >= deadline:
                                if probe:
                                    guard.release(probe)  # type: ignore[union-attr]
                                error = engine.token_late(
                                    wait, deadline, errors, args, kwargs, waited
                                )
                                break
                            await asleep(wait)
                            waited += wait
                except BaseException:
                    if probe:  # no call was made: the probe gives its slot back
                        guard.release(probe)  # type: ignore[union-attr]
                    raise
                try:
                    result = await func(*call_args, **call_kwargs)
                except Exception as exc:
                    if guard is not None:
                        await guard.afailed(exc, probe, call_args, call_kwargs, len(errors) + 1)
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
                    await guard.aok(probe)
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
