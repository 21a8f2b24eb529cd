"""The async driver of ``@opero``: the sync driver's loop, awaiting the function and waits.

:func:`build_async_call` mirrors :func:`opero._pipeline.sync.build_sync_call`
over the same :class:`~opero._pipeline.engine.Engine` decisions: it awaits the
function and waits with ``asyncio.sleep`` (or the private ``_asleep``), so it
never blocks the event loop. ``asyncio.CancelledError`` is a ``BaseException``
and is never caught, retried or wrapped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opero._pipeline.breaker import BreakerGuard, breaker_guard
from opero._pipeline.codegen import Template, specialize
from opero._pipeline.engine import Engine
from opero._ratelimit import MIN_WAIT

__all__ = ["build_async_call"]

ARetryFrom = Callable[[Exception | None, tuple[Any, ...], dict[str, Any]], Awaitable[Any]]


def build_async_call(engine: Engine) -> Callable[..., Awaitable[Any]]:
    """Return the async function running retries, fallbacks and the rate limit (no cache)."""
    limited = engine.limiter is not None
    asleep = engine.asleep
    atoken_wait = engine.atoken_wait

    if engine.async_source:

        async def take_token() -> None:
            wait = await atoken_wait()
            if wait:
                await asleep(wait)

    else:
        # The native bucket books without an await; its call is inlined here (as in the
        # generated sync wrapper) rather than going through token_wait: one frame less
        # per call of a rate-limited async function.
        reserve, check_wait = engine.reserve, engine.check_wait

        async def take_token() -> None:
            delay = reserve()
            if delay > MIN_WAIT:
                check_wait(delay)
                await asleep(delay)

    # A callable rate_limit_key: the token is booked in the bucket of the key.
    token = take_token if engine.key_function is None else _key_token(engine)
    guard = breaker_guard(engine.policy, engine.qualname, engine.func)
    retry_from = _aretry_from(engine, token, guard)
    if engine.fallback is not None:
        # The loop makes the first call too: the candidates are sliced before it runs.
        async def acall_fallback(*args: Any, **kwargs: Any) -> Any:
            return await retry_from(None, args, kwargs)

        return acall_fallback
    generated = specialize(
        engine.func,
        Template(
            is_async=True,
            limiter=limited,
            keyed=engine.key_function is not None,
            on_success=engine.on_success is not None,
            guard=engine.guarded,
            breaker=guard is not None,
            breaker_await=guard is not None and guard.shared,
        ),
        {
            "__opero_key": engine.key_function,
            "__opero_retry_from": retry_from,
            "__opero_take_token": token,
            "__opero_on_success": engine.on_success,
            **_breaker_names(guard),
        },
    )
    return generated or _generic(engine, retry_from, token if limited else None, guard)


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


def _key_token(engine: Engine) -> Callable[[Any], Awaitable[None]]:
    """Return ``take_token(key)`` for a callable ``rate_limit_key``."""
    akey_token_wait, asleep = engine.akey_token_wait, engine.asleep
    if engine.async_source:

        async def take_token(key: Any) -> None:
            wait = await akey_token_wait(key)
            if wait:
                await asleep(wait)

        return take_token
    # An in-memory map books without an await: inlined, as for a single bucket.
    reserve, check_wait = engine.reserve, engine.check_wait

    async def take_native_token(key: Any) -> None:
        delay = reserve(key)
        if delay > MIN_WAIT:
            check_wait(delay)
            await asleep(delay)

    return take_native_token


def _generic(
    engine: Engine,
    retry_from: ARetryFrom,
    take_token: Callable[..., Awaitable[None]] | None,
    guard: BreakerGuard | None = None,
) -> Callable[..., Awaitable[Any]]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, on_success = engine.func, engine.on_success
    key_function = engine.key_function
    guarded = engine.guarded

    async def acall(*args: Any, **kwargs: Any) -> Any:
        probe = (guard.breaker._check and await guard.aenter()) if guard is not None else 0
        try:
            if key_function is not None:
                assert take_token is not None
                await take_token(key_function(*args, **kwargs))
            elif take_token is not None:
                await take_token()
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
            return await retry_from(exc, args, kwargs)
        except BaseException:
            if probe:
                guard.release(probe)  # type: ignore[union-attr]
            raise
        if guard is not None and probe:
            await guard.aok(probe)
        if on_success is not None:
            on_success(result)
        return result

    return acall


def _aretry_from(
    engine: Engine,
    take_token: Callable[..., Awaitable[None]],
    guard: BreakerGuard | None = None,
) -> ARetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed.

    With a circuit breaker, each call asks it before its wait and token: an open
    circuit ends the loop at once with ``CircuitOpenError`` (never retried).
    """
    func, asleep, on_success = engine.func, engine.asleep, engine.on_success
    limited = engine.limiter is not None
    key_function = engine.key_function
    after_failure = engine.after_failure

    async def retry_from(
        first: Exception | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
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
                        guard.release(await guard.aenter())
                    await asleep(wait)
                # Asked after the wait: the circuit may have opened meanwhile.
                probe = (await guard.aenter()) if guard is not None else 0
                call_args, call_kwargs = calls[index]
                try:
                    if key_function is not None:
                        await take_token(key_function(*call_args, **call_kwargs))
                    elif limited:
                        await take_token()
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
                    round_, index, wait, error = after_failure(errors, round_, index, len(calls))
                except BaseException:
                    if probe:
                        guard.release(probe)  # type: ignore[union-attr]
                    raise
                else:
                    if guard is not None:
                        await guard.aok(probe)
                    if on_success is not None:
                        on_success(result)
                    return result
            raise error
        finally:
            del first, errors, calls, error

    return retry_from
