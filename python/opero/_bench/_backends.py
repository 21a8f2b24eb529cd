"""Groups ``redis`` and ``disk``: cache hits through the shared backends (issue 5's targets).

Not part of the default run. ``--only redis`` starts its own ``redis-server``
on a free loopback port (no persistence) when the binary exists, and stops it
at the end; it never touches a server that is already running. The anchor is
what a user would write by hand: a redis-py ``GET`` plus ``pickle.loads`` of
the same value (sync and ``redis.asyncio``). ``--only disk`` compares a disk
cache hit with ``diskcache.Cache.get`` of the same value.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import socket
import subprocess
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
from opero._bench._subjects import opero_decorator

__all__ = ["GROUPS"]

_VALUE = {"user": 42, "name": "Ada", "tags": ["a", "b", "c"], "score": 3.5}


def _value(x: int) -> dict[str, Any]:
    return dict(_VALUE, user=x)


async def _avalue(x: int) -> dict[str, Any]:
    return dict(_VALUE, user=x)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(stack: contextlib.ExitStack, holder: dict[str, str]) -> str:
    """Start a private redis-server once per group and return its URL."""
    if "url" in holder:
        return holder["url"]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise Unavailable("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    deadline = time.monotonic() + 10
    while not _ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    holder["url"] = f"redis://127.0.0.1:{port}/0"
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

    raw = "redis GET+pickle.loads"
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
        "Redis cache hit: @opero(cache_backend='redis')",
        "ns/op",
        _build_redis,
        default=False,
    ),
    Group(
        "disk", "disk cache hit: @opero(cache_backend='disk')", "ns/op", _build_disk, default=False
    ),
]
