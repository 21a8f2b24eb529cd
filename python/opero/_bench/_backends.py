"""Groups ``redis`` and ``disk``: the shared backends (issue 5's targets).

Not part of the default run. ``--only redis`` starts its own ``redis-server``
on a free loopback port (no persistence) when the binary exists, and stops it
at the end; it never touches a server that is already running. The anchor is
what a user would write by hand: a redis-py ``GET`` plus ``pickle.loads`` of
the same value (sync and ``redis.asyncio``). The group also times a call through
``@opero(rate_limit_backend="redis")`` against the same GCRA script sent by hand
with ``EVALSHA`` and against a bare ``PING`` (the round-trip floor), after
proving that each decision is one round trip. ``--only disk`` compares a disk
cache hit with ``diskcache.Cache.get`` of the same value.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import tempfile
import time
from typing import Any

from opero._bench._harness import (
    Case,
    Group,
    Impl,
    LoopFn,
    Settings,
    Unavailable,
    call_loop,
    check,
)
from opero._bench._redis import find_redis_server, private_redis
from opero._bench._subjects import ok, opero_decorator

__all__ = ["GROUPS"]

_RATE = 1e9
_BURST = 1_000
_DECISIONS = 20

_VALUE = {"user": 42, "name": "Ada", "tags": ["a", "b", "c"], "score": 3.5}


def _value(x: int) -> dict[str, Any]:
    return dict(_VALUE, user=x)


async def _avalue(x: int) -> dict[str, Any]:
    return dict(_VALUE, user=x)


def _start_redis(stack: contextlib.ExitStack, holder: dict[str, str]) -> str:
    """Start a private redis-server once per group (stopped with ``stack``); return its URL."""
    if "url" in holder:
        return holder["url"]
    binary = find_redis_server()
    if binary is None:
        raise Unavailable("redis-server is not installed (apt-get install redis-server)")
    holder["url"] = stack.enter_context(private_redis(binary)).url
    return holder["url"]


def _build_redis(settings: Settings) -> list[Case]:
    holder: dict[str, str] = {}

    def opero_sync(stack: contextlib.ExitStack) -> LoopFn:
        url = _start_redis(stack, holder)
        calls = [0]

        def fetch(x: int) -> dict[str, Any]:
            calls[0] += 1
            return _value(x)

        f = opero_decorator(cache=True, cache_backend="redis", cache_redis_url=url)(fetch)
        check(f(1) == _value(1) and f(1) == _value(1), "redis-cached call returned a wrong value")
        check(calls[0] == 1, "two calls with a redis cache ran the function twice")
        return call_loop("f(1)", {"f": f})

    def raw_sync(stack: contextlib.ExitStack) -> LoopFn:
        import redis

        url = _start_redis(stack, holder)
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        client.set("bench:raw", pickle.dumps(_value(1)))

        def f(x: int) -> Any:
            data: Any = client.get("bench:raw")
            return pickle.loads(data) if data is not None else _value(x)

        check(f(1) == _value(1), "raw GET returned a wrong value")
        return call_loop("f(1)", {"f": f})

    def opero_async(stack: contextlib.ExitStack) -> LoopFn:
        url = _start_redis(stack, holder)
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        f = opero_decorator(cache=True, cache_backend="redis", cache_redis_url=url)(_avalue)
        check(loop.run_until_complete(f(1)) == _value(1), "async redis cache: wrong value")
        check(loop.run_until_complete(f(1)) == _value(1), "async redis cache: wrong value")
        return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)

    def raw_async(stack: contextlib.ExitStack) -> LoopFn:
        import redis.asyncio

        url = _start_redis(stack, holder)
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        client = redis.asyncio.Redis.from_url(url)
        stack.callback(lambda: loop.run_until_complete(client.aclose()))
        loop.run_until_complete(client.set("bench:raw", pickle.dumps(_value(1))))

        async def f(x: int) -> Any:
            data: Any = await client.get("bench:raw")
            return pickle.loads(data) if data is not None else _value(x)

        check(loop.run_until_complete(f(1)) == _value(1), "raw async GET: wrong value")
        return call_loop("await f(1)", {"f": f, "loop": loop}, is_async=True)

    def opero_limit(stack: contextlib.ExitStack) -> LoopFn:
        import redis

        url = _start_redis(stack, holder)
        f = opero_decorator(
            rate_limit=_RATE,
            rate_burst=_BURST,
            rate_limit_backend="redis",
            rate_limit_key="bench",
            rate_limit_redis_url=url,
        )(ok)
        check(f(1) == 2, "redis rate-limited call returned a wrong value")  # loads the script
        admin = redis.Redis.from_url(url)
        stack.callback(admin.close)
        admin.config_resetstat()
        for _ in range(_DECISIONS):
            f(1)
        stats: dict[str, Any] = admin.info("commandstats")
        # The script's own GET/SET/TIME and this probe's CONFIG/INFO are not round trips.
        script = {"cmdstat_get", "cmdstat_set", "cmdstat_time"}
        sent = {k: v["calls"] for k, v in stats.items() if k not in script}
        sent = {
            k: n for k, n in sent.items() if not k.startswith(("cmdstat_config", "cmdstat_info"))
        }
        check(
            sent == {"cmdstat_evalsha": _DECISIONS},
            f"{_DECISIONS} rate-limited calls sent {sent}, expected one EVALSHA each",
        )
        check(admin.exists("{opero:rl:bench}") == 1, "the shared bucket key is missing")
        return call_loop("f(1)", {"f": f})

    def raw_limit(stack: contextlib.ExitStack) -> LoopFn:
        import redis

        from opero._ratelimit.redis import GCRA_SCRIPT

        client = redis.Redis.from_url(_start_redis(stack, holder))
        stack.callback(client.close)
        sha = client.script_load(GCRA_SCRIPT)
        evalsha, key, interval = client.evalsha, "{opero:rl:bench-raw}", 1e6 / _RATE

        def f(x: int) -> int:
            _now, wait = evalsha(sha, 1, key, interval, _BURST)
            if wait:
                time.sleep(wait / 1e6)
            return ok(x)

        check(f(1) == 2, "raw EVALSHA call returned a wrong value")
        return call_loop("f(1)", {"f": f})

    def raw_ping(stack: contextlib.ExitStack) -> LoopFn:
        import redis

        client = redis.Redis.from_url(_start_redis(stack, holder))
        stack.callback(client.close)
        check(client.ping() is True, "PING did not answer")
        return call_loop("ping()", {"ping": client.ping})

    def opero_breaker(stack: contextlib.ExitStack) -> LoopFn:
        import redis

        from opero import CircuitBreaker

        url = _start_redis(stack, holder)
        breaker = CircuitBreaker(name="bench", backend="redis", redis_url=url)
        f = opero_decorator(retries=3, circuit_breaker=breaker)(ok)
        check(f(1) == 2, "a call behind a Redis breaker returned a wrong value")
        admin = redis.Redis.from_url(url)
        stack.callback(admin.close)
        admin.config_resetstat()
        for _ in range(_DECISIONS):
            f(1)
        stats: dict[str, Any] = admin.info("commandstats")
        sent = {
            k: v["calls"]
            for k, v in stats.items()
            if k not in {"cmdstat_hmget", "cmdstat_time"}
            and not k.startswith(("cmdstat_config", "cmdstat_info"))
        }
        check(
            sent == {"cmdstat_evalsha": _DECISIONS},
            f"{_DECISIONS} calls behind a closed Redis breaker sent {sent}, expected one EVALSHA",
        )
        return call_loop("f(1)", {"f": f})

    def raw_breaker(stack: contextlib.ExitStack) -> LoopFn:
        import redis

        from opero._pipeline.breaker_redis import ENTER_SCRIPT

        client = redis.Redis.from_url(_start_redis(stack, holder))
        stack.callback(client.close)
        sha = client.script_load(ENTER_SCRIPT)
        evalsha, keys = client.evalsha, ("{opero:cb:raw}", "{opero:cb:raw}:probes")

        def f(x: int) -> int:
            evalsha(sha, 2, *keys, 1, 30_000_000, "p")
            return ok(x)

        check(f(1) == 2, "raw EVALSHA call returned a wrong value")
        return call_loop("f(1)", {"f": f})

    raw = "redis GET+pickle.loads"
    raw_script = "raw EVALSHA, same script"
    return [
        Case(
            "redis hit, sync",
            Impl("opero", opero_sync, ("redis",)),
            [Impl(raw, raw_sync, ("redis",))],
            targets={raw: 1.3},
        ),
        Case(
            "redis hit, async",
            Impl("opero", opero_async, ("redis",)),
            [Impl(raw, raw_async, ("redis",))],
            targets={raw: 1.3},
        ),
        Case(
            "redis rate limit, sync",
            Impl("opero", opero_limit, ("redis",)),
            [
                Impl(raw_script, raw_limit, ("redis",)),
                Impl("redis-py PING", raw_ping, ("redis",)),
            ],
        ),
        Case(
            "redis breaker, closed, sync",
            Impl("opero", opero_breaker, ("redis",)),
            [
                Impl(raw_script, raw_breaker, ("redis",)),
                Impl("redis-py PING", raw_ping, ("redis",)),
            ],
        ),
    ]


def _build_disk(settings: Settings) -> list[Case]:
    holder: dict[str, str] = {}

    def tmpdir(stack: contextlib.ExitStack) -> str:
        if "dir" not in holder:
            holder["dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="opero-bench-"))
        return holder["dir"]

    def opero_disk(stack: contextlib.ExitStack) -> LoopFn:
        path = os.path.join(tmpdir(stack), "opero")
        calls = [0]

        def fetch(x: int) -> dict[str, Any]:
            calls[0] += 1
            return _value(x)

        f = opero_decorator(cache=True, cache_backend="disk", cache_dir=path)(fetch)
        check(f(1) == _value(1) and f(1) == _value(1), "disk-cached call returned a wrong value")
        check(calls[0] == 1, "two calls with a disk cache ran the function twice")
        return call_loop("f(1)", {"f": f})

    def raw_disk(stack: contextlib.ExitStack) -> LoopFn:
        import diskcache  # type: ignore[import-untyped]

        cache = stack.enter_context(diskcache.Cache(os.path.join(tmpdir(stack), "raw")))
        cache.set("bench", _value(1))
        check(cache.get("bench") == _value(1), "diskcache returned a wrong value")
        return call_loop("get('bench')", {"get": cache.get})

    return [
        Case(
            "disk hit",
            Impl("opero", opero_disk, ("diskcache",)),
            [Impl("diskcache.Cache.get", raw_disk, ("diskcache",))],
            targets={"diskcache.Cache.get": 1.5},
        ),
    ]


GROUPS = [
    Group(
        "redis",
        "Redis backend: cache hit and shared rate limit",
        "ns/op",
        _build_redis,
        default=False,
    ),
    Group(
        "disk", "disk cache hit: @opero(cache_backend='disk')", "ns/op", _build_disk, default=False
    ),
]
