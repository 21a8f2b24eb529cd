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
    retry_from = _aretry_from(engine, token)
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
        ),
        {
            "__opero_key": engine.key_function,
            "__opero_retry_from": retry_from,
            "__opero_take_token": token,
            "__opero_on_success": engine.on_success,
        },
    )
    return generated or _generic(engine, retry_from, token if limited else None)


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
    engine: Engine, retry_from: ARetryFrom, take_token: Callable[..., Awaitable[None]] | None
) -> Callable[..., Awaitable[Any]]:
    """Return the first-call wrapper for callables whose parameters are not generated."""
    func, on_success = engine.func, engine.on_success
    key_function = engine.key_function

    async def acall(*args: Any, **kwargs: Any) -> Any:
        if key_function is not None:
            assert take_token is not None
            await take_token(key_function(*args, **kwargs))
        elif take_token is not None:
            await take_token()
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            return await retry_from(exc, args, kwargs)
        if on_success is not None:
            on_success(result)
        return result

    return acall


def _aretry_from(engine: Engine, take_token: Callable[..., Awaitable[None]]) -> ARetryFrom:
    """Return the loop: from the start (``first=None``) or after the first call failed."""
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
                    await asleep(wait)
                call_args, call_kwargs = calls[index]
                if key_function is not None:
                    await take_token(key_function(*call_args, **call_kwargs))
                elif limited:
                    await take_token()
                try:
                    result = await func(*call_args, **call_kwargs)
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
