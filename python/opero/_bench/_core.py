"""Group ``core``: the native pieces through their bindings (issue 2's targets).

Store ``get`` of a present key, key building + hash for 3 positional and 2
keyword arguments, token bucket ``reserve()`` when not throttled, and one
backoff delay; each against the libraries and the pure-Python equivalents.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from opero._bench._handwritten import PyBackoff, PyLRU, PyTokenBucket
from opero._bench._harness import Case, Group, Impl, LoopFn, Settings, call_loop, check

__all__ = ["GROUP"]

_KEY = 123_456_789
_ARGS = (1, "two", 3.0)
_KWARGS = {"a": 4, "b": "five"}


def _store(stack: contextlib.ExitStack) -> Any:
    from opero._opero_core import Store

    store = Store(1024)
    store.set(_KEY, "value")
    check(store.get(_KEY) == "value", "Store.get did not return the stored value")
    return store


def _store_item(stack: contextlib.ExitStack) -> LoopFn:
    store = _store(stack)
    check(store[_KEY] == "value", "Store[k] did not return the stored value")
    return call_loop("c[k]", {"c": store, "k": _KEY})


def _store_get(stack: contextlib.ExitStack) -> LoopFn:
    return call_loop("get(k)", {"get": _store(stack).get, "k": _KEY})


def _cachebox_dotget(stack: contextlib.ExitStack) -> LoopFn:
    import cachebox

    cache: cachebox.LRUCache[int, str] = cachebox.LRUCache(1024)
    cache[_KEY] = "value"
    return call_loop("get(k)", {"get": cache.get, "k": _KEY})


def _cachetools_dotget(stack: contextlib.ExitStack) -> LoopFn:
    import cachetools

    cache: cachetools.LRUCache[int, str] = cachetools.LRUCache(1024)
    cache[_KEY] = "value"
    return call_loop("get(k)", {"get": cache.get, "k": _KEY})


def _cachebox_get(stack: contextlib.ExitStack) -> LoopFn:
    import cachebox

    cache: cachebox.LRUCache[int, str] = cachebox.LRUCache(1024)
    cache[_KEY] = "value"
    return call_loop("c[k]", {"c": cache, "k": _KEY})


def _cachetools_get(stack: contextlib.ExitStack) -> LoopFn:
    import cachetools

    cache: cachetools.LRUCache[int, str] = cachetools.LRUCache(1024)
    cache[_KEY] = "value"
    return call_loop("c[k]", {"c": cache, "k": _KEY})


def _moka_get(stack: contextlib.ExitStack) -> LoopFn:
    import moka_py

    cache: moka_py.Moka[int, str] = moka_py.Moka(1024)
    cache.set(_KEY, "value")
    return call_loop("get(k)", {"get": cache.get, "k": _KEY})


def _pylru_get(stack: contextlib.ExitStack) -> LoopFn:
    cache = PyLRU(1024)
    cache.set(_KEY, "value")
    return call_loop("get(k)", {"get": cache.get, "k": _KEY})


def _make_key(stack: contextlib.ExitStack) -> LoopFn:
    from opero._opero_core import make_key

    check(
        make_key(_ARGS, _KWARGS) == make_key(_ARGS, dict(reversed(_KWARGS.items()))),
        "make_key depends on keyword order",
    )
    check(make_key((1,)) != make_key((1.0,)), "make_key gives f(1) and f(1.0) one key")
    return call_loop("hash(make_key(a, kw))", {"make_key": make_key, "a": _ARGS, "kw": _KWARGS})


def _hashkey(stack: contextlib.ExitStack) -> LoopFn:
    from cachetools.keys import hashkey

    return call_loop("hash(hashkey(*a, **kw))", {"hashkey": hashkey, "a": _ARGS, "kw": _KWARGS})


def _cachebox_key(stack: contextlib.ExitStack) -> LoopFn:
    import cachebox

    return call_loop(
        "hash(make_key(*a, **kw))", {"make_key": cachebox.make_key, "a": _ARGS, "kw": _KWARGS}
    )


def _functools_key(stack: contextlib.ExitStack) -> LoopFn:
    make = functools._make_key
    return call_loop("hash(make(a, kw, False))", {"make": make, "a": _ARGS, "kw": _KWARGS})


def _reserve(stack: contextlib.ExitStack) -> LoopFn:
    from opero._opero_core import TokenBucket

    bucket = TokenBucket(1e9, burst=1000)
    check(bucket.reserve() == 0.0, "TokenBucket.reserve() throttled an idle bucket")
    return call_loop("reserve()", {"reserve": bucket.reserve})


def _py_reserve(stack: contextlib.ExitStack) -> LoopFn:
    bucket = PyTokenBucket(1e9, burst=1000)
    return call_loop("reserve()", {"reserve": bucket.reserve})


def _pyrate_acquire(stack: contextlib.ExitStack) -> LoopFn:
    from pyrate_limiter import Duration, Limiter, Rate

    limiter = Limiter(Rate(1_000_000_000, Duration.SECOND))
    stack.callback(getattr(limiter, "close", lambda: None))
    check(limiter.try_acquire("bench", blocking=False) is True, "pyrate-limiter refused")
    return call_loop("acquire('bench', blocking=False)", {"acquire": limiter.try_acquire})


def _backoff_delay(stack: contextlib.ExitStack) -> LoopFn:
    from opero._opero_core import Backoff

    backoff = Backoff(0.1, 30.0, 1.5, jitter=True, seed=7)
    base = 0.1 * 1.5**3
    check(base / 2 <= backoff.delay(3) <= base, "Backoff.delay(3) is outside its band")
    return call_loop("delay(3)", {"delay": backoff.delay})


def _py_backoff_delay(stack: contextlib.ExitStack) -> LoopFn:
    return call_loop("delay(3)", {"delay": PyBackoff(0.1, 30.0, 1.5).delay})


def _build(settings: Settings) -> list[Case]:
    lru = "handwritten dict LRU"
    return [
        Case(
            "Store[k], present key",
            Impl("opero Store[k]", _store_item),
            [
                Impl("cachebox.LRUCache[k]", _cachebox_get, ("cachebox",)),
                Impl("cachetools.LRUCache[k]", _cachetools_get, ("cachetools",)),
            ],
            targets={"cachebox.LRUCache[k]": 1.2, "cachetools.LRUCache[k]": 1 / 3},
        ),
        Case(
            "Store.get(k), present key",
            Impl("opero Store.get", _store_get),
            [
                Impl("cachebox .get(k)", _cachebox_dotget, ("cachebox",)),
                Impl("cachetools .get(k)", _cachetools_dotget, ("cachetools",)),
                Impl("moka_py.Moka.get", _moka_get, ("moka_py",)),
                Impl(lru, _pylru_get),
            ],
        ),
        Case(
            "key+hash, 3 args + 2 kw",
            Impl("opero make_key", _make_key),
            [
                Impl("cachetools hashkey", _hashkey, ("cachetools",)),
                Impl("cachebox.make_key", _cachebox_key, ("cachebox",)),
                Impl("functools._make_key", _functools_key),
            ],
            targets={"cachetools hashkey": 0.5},
        ),
        Case(
            "TokenBucket.reserve, free",
            Impl("opero TokenBucket", _reserve),
            [
                Impl("handwritten bucket+lock", _py_reserve),
                Impl("pyrate_limiter", _pyrate_acquire, ("pyrate_limiter",)),
            ],
            max_ns=100.0,
        ),
        Case(
            "Backoff.delay(3), jitter",
            Impl("opero Backoff", _backoff_delay),
            [Impl("handwritten formula", _py_backoff_delay)],
        ),
    ]


GROUP = Group(
    "core", "native core: store, keys, token bucket, backoff (direct calls)", "ns/op", _build
)
