"""Group ``retry``: the success path of ``@opero(retries=3)``, sync and async (issue 3).

The function succeeds at once, so this times what the retry machinery costs
when it is not needed, against a handwritten ``try``/``except`` loop, tenacity
and backoff. Before timing, opero proves it really retries a flaky function.
The ``timeout=10`` rows (issue 12) time the same success with a deadline against
plain ``retries=3``: the deadline must cost at most 1.2x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from opero._bench._handwritten import py_retry, py_retry_async
from opero._bench._harness import Case, Group, Impl, LoopFn, Settings, call_loop, check
from opero._bench._subjects import Decorator, aok, event_loop, ok, opero_decorator

__all__ = ["GROUP"]


def _opero_sync(stack: contextlib.ExitStack) -> LoopFn:
    calls = [0]

    def flaky(x: int) -> int:
        calls[0] += 1
        if calls[0] < 3:
            raise ConnectionError("transient")
        return x + 1

    retried = opero_decorator(retries=3, min_delay=0.001, max_delay=0.001)(flaky)
    check(retried(1) == 2 and calls[0] == 3, f"retries=3 made {calls[0]} calls, expected 3")
    return call_loop("f(1)", {"f": opero_decorator(retries=3)(ok)})


def _opero_async(stack: contextlib.ExitStack) -> LoopFn:
    loop = event_loop(stack)
    calls = [0]

    async def flaky(x: int) -> int:
        calls[0] += 1
        if calls[0] < 3:
            raise ConnectionError("transient")
        return x + 1

    retried = opero_decorator(retries=3, min_delay=0.001, max_delay=0.001)(flaky)
    result = loop.run_until_complete(retried(1))
    check(result == 2 and calls[0] == 3, f"async retries=3 made {calls[0]} calls, expected 3")
    f = opero_decorator(retries=3)(aok)
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


def _breaker_sync(stack: contextlib.ExitStack) -> LoopFn:
    from opero import CircuitBreaker, CircuitOpenError

    calls = [0]

    def down(x: int) -> int:
        calls[0] += 1
        raise ConnectionError("down")

    guarded = opero_decorator(retries=3, min_delay=0, circuit_breaker=CircuitBreaker(2))(down)
    with contextlib.suppress(CircuitOpenError):
        guarded(1)
    check(calls[0] == 2, f"a breaker opening after 2 failures let {calls[0]} calls through")
    f = opero_decorator(retries=3, circuit_breaker=CircuitBreaker())(ok)
    check(f(1) == 2, "wrong result")
    return call_loop("f(1)", {"f": f})


def _breaker_async(stack: contextlib.ExitStack) -> LoopFn:
    from opero import CircuitBreaker

    loop = event_loop(stack)
    f = opero_decorator(retries=3, circuit_breaker=CircuitBreaker())(aok)
    check(loop.run_until_complete(f(1)) == 2, "wrong result")
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


def _sync(decorate: Callable[[], Decorator]) -> Callable[[contextlib.ExitStack], LoopFn]:
    def make(stack: contextlib.ExitStack) -> LoopFn:
        f = decorate()(ok)
        check(f(1) == 2, "wrong result")
        return call_loop("f(1)", {"f": f})

    return make


def _async(decorate: Callable[[], Decorator]) -> Callable[[contextlib.ExitStack], LoopFn]:
    def make(stack: contextlib.ExitStack) -> LoopFn:
        loop = event_loop(stack)
        f = decorate()(aok)
        check(loop.run_until_complete(f(1)) == 2, "wrong result")
        return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)

    return make


def _opero_timeout_sync(stack: contextlib.ExitStack) -> LoopFn:
    now = [0.0]

    def down() -> None:
        now[0] += 1.0
        raise ConnectionError("down")

    deadline = opero_decorator(
        retries=10, timeout=2.5, min_delay=0.0, _clock=lambda: now[0], _sleep=lambda s: None
    )(down)
    with contextlib.suppress(ConnectionError):
        deadline()
    check(now[0] == 3.0, f"timeout=2.5 with 1 s calls made {now[0]:g} calls, expected 3")
    return call_loop("f(1)", {"f": opero_decorator(retries=3, timeout=10.0)(ok)})


def _opero_timeout_async(stack: contextlib.ExitStack) -> LoopFn:
    loop = event_loop(stack)
    f = opero_decorator(retries=3, timeout=10.0)(aok)
    check(loop.run_until_complete(f(1)) == 2, "wrong result")
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


def _timeout_breaker_sync(stack: contextlib.ExitStack) -> LoopFn:
    from opero import CircuitBreaker

    f = opero_decorator(retries=3, timeout=10.0, circuit_breaker=CircuitBreaker())(ok)
    check(f(1) == 2, "wrong result")
    return call_loop("f(1)", {"f": f})


def _tenacity() -> Decorator:
    import tenacity

    decorator: Decorator = tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential_jitter(initial=0.1, max=30.0, exp_base=1.5),
        reraise=True,
    )
    return decorator


def _backoff() -> Decorator:
    import backoff

    decorator: Decorator = backoff.on_exception(
        backoff.expo, Exception, max_tries=4, factor=0.1, base=1.5, max_value=30.0
    )
    return decorator


def _build(settings: Settings) -> list[Case]:
    return [
        Case(
            "success, retries=3, sync",
            Impl("opero", _opero_sync),
            [
                Impl("handwritten try/except", _sync(lambda: py_retry(3))),
                Impl("tenacity.retry", _sync(_tenacity), ("tenacity",)),
                Impl("backoff.on_exception", _sync(_backoff), ("backoff",)),
            ],
            targets={"handwritten try/except": 1.0},
        ),
        Case(
            "success, retries=3, async",
            Impl("opero", _opero_async),
            [
                Impl("handwritten try/except", _async(lambda: py_retry_async(3))),
                Impl("tenacity.retry", _async(_tenacity), ("tenacity",)),
                Impl("backoff.on_exception", _async(_backoff), ("backoff",)),
            ],
            targets={"handwritten try/except": 1.2},
        ),
        # Issue 12: a closed breaker stays within 1.2x of the plain retries=3 path.
        Case(
            "retries=3, closed breaker, sync",
            Impl("opero", _breaker_sync),
            [
                Impl("@opero(retries=3)", _sync(lambda: opero_decorator(retries=3))),
                Impl("handwritten try/except", _sync(lambda: py_retry(3))),
            ],
            targets={"@opero(retries=3)": 1.2},
        ),
        Case(
            "retries=3, closed breaker, async",
            Impl("opero", _breaker_async),
            [Impl("@opero(retries=3)", _async(lambda: opero_decorator(retries=3)))],
            targets={"@opero(retries=3)": 1.2},
        ),
        # issue 12: a deadline costs one clock read on success.
        Case(
            "retries=3, timeout=10, sync",
            Impl("opero", _opero_timeout_sync),
            [Impl("opero retries=3", _opero_sync)],
            targets={"opero retries=3": 1.2},
        ),
        Case(
            "retries=3, timeout=10, async",
            Impl("opero", _opero_timeout_async),
            [Impl("opero retries=3", _opero_async)],
            targets={"opero retries=3": 1.2},
        ),
        # issue 12: a deadline and a closed breaker together.
        Case(
            "retries=3, timeout=10, closed breaker, sync",
            Impl("opero", _timeout_breaker_sync),
            [Impl("opero retries=3", _opero_sync)],
            targets={"opero retries=3": 1.2},
        ),
    ]


GROUP = Group("retry", "retry, success path: @opero(retries=3)", "ns/op", _build)
