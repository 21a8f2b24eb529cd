"""Groups ``cache_hit`` and ``cache_miss``: the ``@opero`` memory cache (issue 3's targets).

Hits with 1 int argument, with 3 positional + 2 keyword arguments, with a TTL,
with the full stack of options and of an ``async def`` function; misses with
eviction (max size 1024, 10k distinct keys drawn uniformly) under both cache
policies. Every opero case first proves the cache caches.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

from opero._bench._handwritten import py_lru_cached
from opero._bench._harness import Case, Group, Impl, LoopFn, Settings, call_loop, check
from opero._bench._subjects import Decorator, event_loop, opero_decorator

__all__ = ["GROUPS"]

_SIZE = 1024
_TTL = 600.0
_HIT1 = "f(1)"
_HIT5 = "f(1, 2, 3, a=4, b=5)"


def _one(x: int) -> int:
    return x + 1


def _five(x: int, y: int, z: int, a: int = 0, b: int = 0) -> int:
    return x + y + z + a + b


def _counting(func: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    calls = [0]

    @functools.wraps(func)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return func(*args, **kwargs)

    return counted, calls


def _hit_loop(decorate: Decorator, stmt: str, *, verify: bool = False) -> LoopFn:
    func, expected = (_one, 2) if stmt == _HIT1 else (_five, 15)
    counted, calls = _counting(func)
    f = decorate(counted)
    first, second = eval(stmt, {"f": f}), eval(stmt, {"f": f})
    check(first == expected and second == expected, f"{stmt} returned {first!r}, {second!r}")
    if verify:
        check(calls[0] == 1, f"{stmt} twice ran the function {calls[0]} times: no cache hit")
    return call_loop(stmt, {"f": f})


def _lru() -> Decorator:
    return functools.lru_cache(maxsize=_SIZE)


def _cachetools(ttl: float | None = None) -> Decorator:
    import cachetools

    cache: Any = cachetools.TTLCache(_SIZE, ttl) if ttl else cachetools.LRUCache(_SIZE)
    decorator: Decorator = cachetools.cached(cache)
    return decorator


def _cachebox(ttl: float | None = None) -> Decorator:
    import cachebox

    cache: Any = cachebox.TTLCache(_SIZE, ttl) if ttl else cachebox.LRUCache(_SIZE)
    decorator: Decorator = cachebox.cached(cache)
    return decorator


def _moka(ttl: float | None = None) -> Decorator:
    import moka_py

    decorator: Decorator = moka_py.cached(maxsize=_SIZE, ttl=ttl)
    return decorator


def _hit_anchors(stmt: str, ttl: float | None = None) -> list[Impl]:
    def make(factory: Callable[[], Decorator]) -> Callable[[contextlib.ExitStack], LoopFn]:
        return lambda stack: _hit_loop(factory(), stmt)

    suffix = " ttl" if ttl else ""
    return [
        Impl("functools.lru_cache", make(_lru)),
        Impl(f"cachetools.cached{suffix}", make(lambda: _cachetools(ttl)), ("cachetools",)),
        Impl(f"cachebox.cached{suffix}", make(lambda: _cachebox(ttl)), ("cachebox",)),
        Impl(f"moka_py.cached{suffix}", make(lambda: _moka(ttl)), ("moka_py",)),
        Impl(f"handwritten LRU{suffix}", make(lambda: py_lru_cached(_SIZE, ttl))),
    ]


def _opero_hit(stmt: str, **options: Any) -> Callable[[contextlib.ExitStack], LoopFn]:
    return lambda stack: _hit_loop(opero_decorator(**options), stmt, verify=True)


def _full_stack(stack: contextlib.ExitStack) -> LoopFn:
    calls = [0]

    def f(x: int, model: tuple[str, ...] = ("primary", "backup")) -> int:
        calls[0] += 1
        return x + 1

    g = opero_decorator(cache=True, retries=3, rate_limit=1e9, arg_fallback="model")(f)
    check(g(1) == 2 and g(1) == 2 and calls[0] == 1, "full-stack @opero did not serve a hit")
    return call_loop(_HIT1, {"f": g})


async def _aone(x: int) -> int:
    return x + 1


def _async_hit_loop(
    stack: contextlib.ExitStack, decorate: Decorator, *, verify: bool = False
) -> LoopFn:
    loop = event_loop(stack)
    calls = [0]

    @functools.wraps(_aone)
    async def counted(x: int) -> int:
        calls[0] += 1
        return await _aone(x)

    f = decorate(counted)
    first, second = loop.run_until_complete(f(1)), loop.run_until_complete(f(1))
    check(first == 2 and second == 2, f"await f(1) returned {first!r}, {second!r}")
    if verify:
        check(calls[0] == 1, f"await f(1) twice ran the function {calls[0]} times: no cache hit")
    return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)


def _plain_async_wrapper() -> Decorator:
    """Return a decorator whose wrapper only awaits the function: the floor of any async cache."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await func(*args, **kwargs)

        return wrapper

    return decorate


def _async_hit_case() -> Case:
    def make(factory: Callable[[], Decorator]) -> Callable[[contextlib.ExitStack], LoopFn]:
        return lambda stack: _async_hit_loop(stack, factory())

    return Case(
        "hit, await f(1)",
        Impl(
            "opero",
            lambda stack: _async_hit_loop(stack, opero_decorator(cache=True), verify=True),
        ),
        [
            Impl("plain async wrapper", make(_plain_async_wrapper)),
            Impl("cachebox.cached", make(_cachebox), ("cachebox",)),
            Impl("moka_py.cached", make(_moka), ("moka_py",)),
        ],
    )


def _build_hit(settings: Settings) -> list[Case]:
    plain = Impl("opero, cache only", _opero_hit(_HIT1, cache=True))
    return [
        Case(
            "hit, f(1)",
            Impl("opero", _opero_hit(_HIT1, cache=True)),
            _hit_anchors(_HIT1),
            targets={"functools.lru_cache": 2.0},
        ),
        Case(
            "hit, f(1,2,3,a=4,b=5)",
            Impl("opero", _opero_hit(_HIT5, cache=True)),
            _hit_anchors(_HIT5),
            targets={"functools.lru_cache": 1.0},
        ),
        Case(
            f"hit, f(1), ttl={_TTL:g}s",
            Impl("opero", _opero_hit(_HIT1, cache=True, cache_ttl=_TTL)),
            [Impl("opero, no TTL", _opero_hit(_HIT1, cache=True)), *_hit_anchors(_HIT1, _TTL)],
            targets={"opero, no TTL": 1.1},
        ),
        Case(
            "hit, full stack, f(1)",
            Impl("opero", _full_stack),
            [plain],
            targets={"opero, cache only": 1.1},
        ),
        _async_hit_case(),
    ]


def _keys() -> Callable[[], int]:
    rng = random.Random(20240607)
    keys = [rng.randrange(10_000) for _ in range(200_000)]
    return itertools.cycle(keys).__next__


def _miss_loop(decorate: Decorator, *, verify: bool = False, lru: bool = True) -> LoopFn:
    counted, calls = _counting(_one)
    f = decorate(counted)
    check(f(-5) == -4, "miss returned a wrong value")
    if verify:
        for k in range(2 * _SIZE):
            f(k)
        before = calls[0]
        f(2 * _SIZE - 1)
        check(calls[0] == before, "the most recent key was not kept")
        info = getattr(f, "cache_info")()  # noqa: B009 (a decorated function's helper)
        check(info.currsize == _SIZE, f"{info.currsize} entries held, bound {_SIZE}")
        if lru:
            f(0)
            check(calls[0] == before + 1, f"a key evicted long ago was still served (size {_SIZE})")
    return call_loop("f(key())", {"f": f, "key": _keys()})


def _build_miss(settings: Settings) -> list[Case]:
    def make(factory: Callable[[], Decorator]) -> Callable[[contextlib.ExitStack], LoopFn]:
        return lambda stack: _miss_loop(factory())

    def opero_miss(policy: str) -> Callable[[contextlib.ExitStack], LoopFn]:
        decorate = opero_decorator(cache=True, cache_max_size=_SIZE, cache_policy=policy)
        return lambda stack: _miss_loop(decorate, verify=True, lru=policy == "lru")

    # Issue 14: a miss that evicts costs at most 1.2x lru_cache's, under both policies.
    return [
        Case(
            "miss+evict, 10k keys/1024",
            Impl("opero", opero_miss("lru")),
            [
                Impl("functools.lru_cache", make(_lru)),
                Impl("cachetools.cached", make(_cachetools), ("cachetools",)),
                Impl("cachebox.cached", make(_cachebox), ("cachebox",)),
                Impl("moka_py.cached", make(_moka), ("moka_py",)),
                Impl("handwritten LRU", make(lambda: py_lru_cached(_SIZE))),
            ],
            targets={"functools.lru_cache": 1.2},
        ),
        Case(
            "miss+evict, tinylfu",
            Impl("opero", opero_miss("tinylfu")),
            [
                Impl("functools.lru_cache", make(_lru)),
                Impl("moka_py.cached", make(_moka), ("moka_py",)),
            ],
            targets={"functools.lru_cache": 1.2},
        ),
    ]


GROUPS = [
    Group("cache_hit", "cache hit: @opero(cache=True)", "ns/op", _build_hit),
    Group("cache_miss", "cache miss with eviction: @opero(cache=True)", "ns/op", _build_miss),
]
