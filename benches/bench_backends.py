"""Benchmark of the Redis and disk cache backends and the Redis rate limiter, against anchors.

Run: ``.venv/bin/python benches/bench_backends.py`` (``--quick`` for a short run).

Starts its own ``redis-server`` on a free loopback port (no persistence) and
measures, in this process and in the same run:

* a Redis cache hit through ``@opero`` against raw redis-py ``GET`` plus
  ``pickle.loads`` of the same value, sync and ``redis.asyncio`` (target <= 1.3x);
* a disk cache hit through ``@opero`` against ``diskcache.Cache.get`` of the
  same value (target <= 1.5x);
* the Redis rate limiter: round trips per decision (counted by Redis in
  ``INFO commandstats``; target 1) and its latency against a raw ``PING``.

Timed loops are interleaved (anchor, opero, anchor, opero, ...) and each figure
is the best of the repeats, so a busy machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import diskcache
import redis
import redis.asyncio

from opero import opero
from opero._ratelimit_redis import GCRA_SCRIPT, RedisRateLimiter

VALUE = {"id": 12345, "name": "widget " * 4, "tags": ["a", "b", "c"], "price": 19.99}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.01)
    client.close()
    return proc, url


def best_of_interleaved(
    loops: dict[str, Callable[[], Any]], n: int, repeats: int
) -> dict[str, float]:
    """Run each loop (n iterations) in turn, ``repeats`` times; return best us per iteration."""
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(repeats):
        for name, loop in loops.items():
            start = time.perf_counter()
            loop()
            best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
    return best


def abest_of_interleaved(
    loops: dict[str, Callable[[], Awaitable[Any]]], n: int, repeats: int
) -> dict[str, float]:
    """Async twin of :func:`best_of_interleaved` (one event loop for every round)."""

    async def run() -> dict[str, float]:
        best = dict.fromkeys(loops, float("inf"))
        for _ in range(repeats):
            for name, loop in loops.items():
                start = time.perf_counter()
                await loop()
                best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
        return best

    return asyncio.run(run())


def bench_redis_sync(url: str, n: int, repeats: int) -> dict[str, float]:
    raw = redis.Redis.from_url(url)

    @opero(cache=True, cache_backend="redis", cache_redis_url=url)
    def product(product_id: int) -> dict[str, Any]:
        return VALUE

    product(12345)  # fill
    (key,) = raw.keys("opero:*product*")
    assert pickle.loads(raw.get(key)) == product(12345)

    def anchor() -> None:
        get, loads = raw.get, pickle.loads
        for _ in range(n):
            loads(get(key))

    def through_opero() -> None:
        for _ in range(n):
            product(12345)

    return best_of_interleaved(
        {"redis-py GET + pickle.loads": anchor, "@opero hit": through_opero}, n, repeats
    )


def bench_redis_async(url: str, n: int, repeats: int) -> dict[str, float]:
    @opero(cache=True, cache_backend="redis", cache_redis_url=url)
    async def aproduct(product_id: int) -> dict[str, Any]:
        return VALUE

    state: dict[str, Any] = {}

    async def setup() -> None:
        await aproduct(12345)
        client = redis.asyncio.Redis.from_url(url)
        (key,) = await client.keys("opero:*aproduct*")
        state.update(client=client, key=key)

    async def anchor() -> None:
        get, loads, key = state["client"].get, pickle.loads, state["key"]
        for _ in range(n):
            loads(await get(key))

    async def through_opero() -> None:
        for _ in range(n):
            await aproduct(12345)

    async def run() -> dict[str, float]:
        await setup()
        best = {"redis.asyncio GET + pickle.loads": float("inf"), "@opero hit": float("inf")}
        for _ in range(repeats):
            for name, loop in (
                ("redis.asyncio GET + pickle.loads", anchor),
                ("@opero hit", through_opero),
            ):
                start = time.perf_counter()
                await loop()
                best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
        await state["client"].aclose()
        return best

    return asyncio.run(run())


def bench_disk(directory: str, n: int, repeats: int) -> dict[str, float]:
    anchor_cache = diskcache.Cache(str(Path(directory) / "anchor"))
    anchor_cache.set("product:12345", VALUE)

    @opero(cache=True, cache_backend="disk", cache_dir=str(Path(directory) / "opero"))
    def product(product_id: int) -> dict[str, Any]:
        return VALUE

    product(12345)

    def anchor() -> None:
        get = anchor_cache.get
        for _ in range(n):
            get("product:12345")

    def through_opero() -> None:
        for _ in range(n):
            product(12345)

    return best_of_interleaved(
        {"diskcache.Cache.get": anchor, "@opero hit": through_opero}, n, repeats
    )


def bench_limiter(url: str, n: int, repeats: int) -> dict[str, float]:
    raw = redis.Redis.from_url(url)
    limiter = RedisRateLimiter("bench", rate=1e9, burst=1_000_000, url=url)
    limiter.reserve()  # load the script
    raw.config_resetstat()
    for _ in range(n):
        limiter.reserve()
    stats = raw.info("commandstats")
    script_internal = {"cmdstat_get", "cmdstat_set", "cmdstat_time"}
    client_commands = sum(
        v["calls"]
        for k, v in stats.items()
        if k not in script_internal and not k.startswith(("cmdstat_config", "cmdstat_info"))
    )
    ping_client = redis.Redis.from_url(url)

    def anchor() -> None:
        for _ in range(n):
            ping_client.ping()

    def decisions() -> None:
        for _ in range(n):
            limiter.reserve()

    sha = raw.script_load(GCRA_SCRIPT)

    def raw_evalsha() -> None:
        evalsha = ping_client.evalsha
        for _ in range(n):
            evalsha(sha, 1, "{opero:rl:bench-raw}", 0.001, 1_000_000)

    timings = best_of_interleaved(
        {
            "redis-py PING": anchor,
            "RedisRateLimiter.reserve": decisions,
            "raw EVALSHA (same script)": raw_evalsha,
        },
        n,
        repeats,
    )
    timings["round trips per decision"] = client_commands / n
    return timings


def report(title: str, rows: dict[str, float], target: float | None) -> None:
    names = list(rows)
    anchor, ours = rows[names[0]], rows[names[1]]
    print(f"\n{title}")
    for name in names[:2]:
        print(f"  {name:<36} {rows[name]:9.2f} us/call")
    ratio = ours / anchor
    verdict = (
        ""
        if target is None
        else f"  (target <= {target:.1f}x: {'met' if ratio <= target else 'MISSED'})"
    )
    print(f"  ratio opero / anchor                 {ratio:9.2f}x{verdict}")
    for name in names[2:]:
        unit = "" if "per decision" in name else " us/call"
        print(f"  {name:<36} {rows[name]:9.2f}{unit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n, repeats = (500, 3) if args.quick else (3000, 7)
    with tempfile.TemporaryDirectory(prefix="opero-bench-") as directory:
        proc, url = start_redis(directory)
        try:
            print(f"redis-server {url}, {n} calls x {repeats} interleaved repeats, best taken")
            report("Redis cache hit, sync", bench_redis_sync(url, n, repeats), 1.3)
            report("Redis cache hit, asyncio", bench_redis_async(url, n, repeats), 1.3)
            report("Disk cache hit", bench_disk(directory, n * 5, repeats), 1.5)
            report("Redis rate limiter decision", bench_limiter(url, n, repeats), None)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
