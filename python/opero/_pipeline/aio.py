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
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import ATTEMPT_TIMEOUT, Engine, _no_token
from opero._ratelimit import MIN_WAIT

__all__ = ["build_async_call"]

ARetryFrom = Callable[..., Awaitable[Any]]
TakeToken = Callable[[float | None], Awaitable[None]]


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

        async def take_token(start: float | None = None) -> None:
            wait = await atoken_wait()
            if wait:
                check_deadline(wait, start)
                await asleep(wait)

    else:
        # The native bucket books without an await; its call is inlined here (as in the
        # generated sync wrapper) rather than going through token_wait: one frame less
        # per call of a rate-limited async function.
        reserve, check_wait = engine.reserve, engine.check_wait

        def testing_changed() -> None:
            # set_testing(rate_limit=False) rebinds the bucket: no per-call check.
            nonlocal reserve
            reserve = engine.reserve if _testing._rate_limit else _no_token

        async def take_token(start: float | None = None) -> None:
            delay = reserve()
            if delay > MIN_WAIT:
                check_wait(delay)
                check_deadline(delay, start)
                await asleep(delay)

    listener = None if engine.async_source else testing_changed
    func = engine.func
    if engine.attempt_timeout is not None:
        func = _with_attempt_timeout(func, engine.attempt_timeout)
    retry_from = _aretry_from(engine, take_token, func)
    if engine.fallback is not None or engine.rejects is not None:
        # The loop makes the first call too: the candidates are sliced before it runs,
        # and a result is checked there.
        async def acall_loop(*args: Any, **kwargs: Any) -> Any:
            return await retry_from(None, args, kwargs)

        return _listening(acall_loop, listener if limited else None)
    generated = None
    if func is engine.func:
        generated = specialize(
            func,
            Template(
                is_async=True,
                limiter=limited,
                on_success=engine.on_success is not None,
                guard=engine.guarded,
                clock=timeout is not None and (limited or engine.guarded),
            ),
            {
                "__opero_retry_from": retry_from,
                "__opero_take_token": take_token,
                "__opero_on_success": engine.on_success,
                "__opero_clock": clock,
            },
        )
    wrapper = generated or _generic(engine, retry_from, take_token if limited else None, func)
    return _listening(wrapper, listener if limited else None)


def _listening(
    wrapper: Callable[..., Awaitable[Any]], listener: Callable[[], None] | None
) -> Callable[..., Awaitable[Any]]:
    """Keep ``listener`` alive with ``wrapper`` and register it with the testing switch."""
    if listener is not None:
        wrapper.__dict__["__opero_testing_listener__"] = listener
        _testing.listen(listener)
    return wrapper


def _with_attempt_timeout(
    func: Callable[..., Awaitable[Any]], seconds: float
) -> Callable[..., Awaitable[Any]]:
    """Return ``func`` with each call cancelled after ``seconds`` (a marked ``TimeoutError``)."""

    async def attempt(*args: Any, **kwargs: Any) -> Any:
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                return await func(*args, **kwargs)
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the function's own TimeoutError
            error = TimeoutError(f"the attempt took more than attempt_timeout={seconds:g} s")
            error.__dict__[ATTEMPT_TIMEOUT] = True
            raise error from exc

    return attempt


def _generic(
    engine: Engine,
    retry_from: ARetryFrom,
    take_token: TakeToken | None,
    func: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    on_success = engine.on_success
    clock = engine.clock if engine.timeout is not None else None

    async def acall(*args: Any, **kwargs: Any) -> Any:
        start = None if clock is None else clock()
        if take_token is not None:
            await take_token(start)
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            return await retry_from(exc, args, kwargs, start)
        if on_success is not None:
            on_success(result)
        return result

    return acall


def _aretry_from(
    engine: Engine, take_token: TakeToken, func: Callable[..., Awaitable[Any]]
) -> ARetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed."""
    asleep, on_success = engine.asleep, engine.on_success
    limited = engine.limiter is not None
    after_failure, rejected = engine.after_failure, engine.rejected
    checks_result = engine.rejects is not None

    async def retry_from(
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
                    await asleep(wait)
                if limited:
                    if deadline is None:
                        await take_token(None)
                    elif (wait := await engine.atoken_wait()) > 0:
                        if engine.clock() + wait >= deadline:
                            error = engine.token_late(wait, deadline, errors)
                            break
                        await asleep(wait)
                call_args, call_kwargs = calls[index]
                try:
                    result = await func(*call_args, **call_kwargs)
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
