"""Group ``ratelimit``: a call through ``@opero(rate_limit=...)`` when not throttled (issue 3).

The rate is 1e9/s so no call waits: this times the cost of taking a token
around a call, sync and async, against a pure-Python bucket behind a lock,
pyrate-limiter and aiolimiter; and a per-key limit (a callable
``rate_limit_key`` over 100 keys, issue 12) against the plain one. Before
timing, opero proves it really spaces calls at a low rate.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time

from opero._bench._handwritten import py_rate_limited, py_rate_limited_async
from opero._bench._harness import Case, Group, Impl, LoopFn, Settings, call_loop, check
from opero._bench._subjects import aok, event_loop, ok, opero_decorator

__all__ = ["GROUP"]

_RATE = 1e9


def _check_spacing() -> None:
    slow = opero_decorator(rate_limit=50.0)(ok)
    start = time.perf_counter()
    for _ in range(3):
        slow(1)
    elapsed = time.perf_counter() - start
    # 3 calls at 50/s with burst 1 start at 0, 20 and 40 ms.
    check(elapsed >= 0.03, f"rate_limit=50: 3 calls took {elapsed * 1e3:.1f} ms, expected >= 40")


def _opero_sync(stack: contextlib.ExitStack) -> LoopFn:
    _check_spacing()
    f = opero_decorator(rate_limit=_RATE)(ok)
    check(f(1) == 2, "wrong result")
    return call_loop("f(1)", {"f": f})


def _opero_async(stack: contextlib.ExitStack) -> LoopFn:
    loop = event_loop(stack)
    f = opero_decorator(rate_limit=_RATE)(aok)
    check(loop.run_until_complete(f(1)) == 2, "wrong result")
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


def _handwritten(stack: contextlib.ExitStack) -> LoopFn:
    f = py_rate_limited(_RATE)(ok)
    return call_loop("f(1)", {"f": f})


def _handwritten_async(stack: contextlib.ExitStack) -> LoopFn:
    loop = event_loop(stack)
    f = py_rate_limited_async(_RATE)(aok)
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


def _pyrate(stack: contextlib.ExitStack) -> LoopFn:
    from pyrate_limiter import Duration, Limiter, Rate

    limiter = Limiter(Rate(int(_RATE), Duration.SECOND))
    stack.callback(getattr(limiter, "close", lambda: None))
    acquire = limiter.try_acquire

    @functools.wraps(ok)
    def f(x: int) -> int:
        acquire("bench")
        return ok(x)

    check(f(1) == 2, "wrong result")
    return call_loop("f(1)", {"f": f})


def _aiolimiter(stack: contextlib.ExitStack) -> LoopFn:
    from aiolimiter import AsyncLimiter

    loop = event_loop(stack)
    limiter = AsyncLimiter(_RATE, 1.0)

    async def f(x: int) -> int:
        async with limiter:
            return await aok(x)

    check(loop.run_until_complete(f(1)) == 2, "wrong result")
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


#: The keys of the per-key row: 100 users, cycled through by the calls.
_KEYS = tuple(f"user-{i}" for i in range(100))


def _cycle_loop(f: object) -> LoopFn:
    """Loop ``f(x)`` over x = 0..99 in turn (the same statement for both rows)."""
    return call_loop("f(next(xs))", {"f": f, "xs": itertools.cycle(range(100))})


def _opero_keyed(stack: contextlib.ExitStack) -> LoopFn:
    f = opero_decorator(rate_limit=_RATE, rate_limit_key=lambda x: _KEYS[x])(ok)
    check(f(1) == 2, "wrong result")
    return _cycle_loop(f)


def _opero_plain_cycled(stack: contextlib.ExitStack) -> LoopFn:
    f = opero_decorator(rate_limit=_RATE)(ok)
    check(f(1) == 2, "wrong result")
    return _cycle_loop(f)


def _build(settings: Settings) -> list[Case]:
    return [
        Case(
            "call, rate_limit=1e9 sync",
            Impl("opero", _opero_sync),
            [
                Impl("handwritten bucket+lock", _handwritten),
                Impl("pyrate_limiter", _pyrate, ("pyrate_limiter",)),
            ],
            targets={"handwritten bucket+lock": 1.0},
        ),
        Case(
            "call, rate_limit=1e9 async",
            Impl("opero", _opero_async),
            [
                Impl("handwritten bucket+lock", _handwritten_async),
                Impl("aiolimiter", _aiolimiter, ("aiolimiter",)),
            ],
        ),
        Case(
            "call, per-key (100 keys)",
            Impl("opero", _opero_keyed),
            [Impl("opero rate_limit=1e9", _opero_plain_cycled)],
            targets={"opero rate_limit=1e9": 1.5},
        ),
    ]


GROUP = Group("ratelimit", "rate-limit acquire: @opero(rate_limit=1e9)", "ns/op", _build)
