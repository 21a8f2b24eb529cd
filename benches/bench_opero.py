"""Benchmark of @opero against its anchors, measured in the same run.

Run: ``.venv/bin/python benches/bench_opero.py`` (``--quick`` for a short run).

Prints ns per call for opero and each anchor (functools.lru_cache, cachetools,
cachebox, moka-py, tenacity, backoff, a handwritten try/except loop, a
pure-Python token bucket with a lock), and the ratio behind each target of
issue 3. Each figure is the best of several repeats of a timed loop; every row
is measured in this process, so ratios compare like with like even on a busy
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opero import opero

try:
    import cachetools
except ImportError:  # pragma: no cover
    cachetools = None
try:
    import cachebox
except ImportError:  # pragma: no cover
    cachebox = None
try:
    import moka_py
except ImportError:  # pragma: no cover
    moka_py = None
try:
    import tenacity
except ImportError:  # pragma: no cover
    tenacity = None
try:
    import backoff
except ImportError:  # pragma: no cover
    backoff = None

REPEATS = 7
N = 200_000


def timed(call: Callable[[], Any], n: int) -> float:
    """Return the best ns per iteration of ``call`` (which runs ``n`` iterations)."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        call()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def paired_hit1(fa: Callable[..., Any], fb: Callable[..., Any], n: int) -> tuple[float, float]:
    """Time n one-arg hits of two functions, alternating runs so load hits both alike."""
    fa(1)
    fb(1)

    def loop(f: Callable[..., Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                f(1)

        return run

    best_a = best_b = float("inf")
    for _ in range(REPEATS * 2):
        best_a = min(best_a, timed_once(loop(fa), n))
        best_b = min(best_b, timed_once(loop(fb), n))
    return best_a, best_b


def timed_once(call: Callable[[], Any], n: int) -> float:
    """Return ns per iteration of one run of ``call``."""
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / n


def hit1(f: Callable[..., Any], n: int) -> float:
    """Time n hits with one int argument."""
    f(1)

    def loop() -> None:
        for _ in range(n):
            f(1)

    return timed(loop, n)


def hit5(f: Callable[..., Any], n: int) -> float:
    """Time n hits with 3 positional and 2 keyword arguments."""
    f(1, 2, 3, d=4, e=5)

    def loop() -> None:
        for _ in range(n):
            f(1, 2, 3, d=4, e=5)

    return timed(loop, n)


def misses(f: Callable[..., Any], keys: list[int]) -> float:
    """Time calls over ``keys`` (mostly misses with eviction)."""
    return timed(lambda: [f(k) for k in keys], len(keys))


def plain_calls(f: Callable[..., Any], n: int) -> float:
    """Time n calls of f(1)."""

    def loop() -> None:
        for _ in range(n):
            f(1)

    return timed(loop, n)


def async_calls(f: Callable[..., Awaitable[Any]], n: int) -> float:
    """Time n awaited calls of f(1) inside one event loop."""

    async def loop() -> None:
        for _ in range(n):
            await f(1)

    async def main() -> float:
        await f(1)
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter_ns()
            await loop()
            best = min(best, (time.perf_counter_ns() - start) / n)
        return best

    return asyncio.run(main())


class PyBucket:
    """A pure-Python token bucket with a lock (the anchor of the rate-limit row)."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self) -> float:
        """Take a token; return the wait in seconds (0 when one is free)."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= 1.0
            if self.tokens >= 0:
                return 0.0
            return -self.tokens / self.rate


def row(name: str, value: float, anchor: float | None = None, target: float | None = None) -> str:
    """Format one line: ns/call, ratio to the anchor, and the target verdict."""
    text = f"  {name:<52} {value:>9.1f} ns"
    if anchor is not None:
        ratio = value / anchor
        text += f"   {ratio:5.2f}x"
        if target is not None:
            text += f"  (target <= {target:.2f}x: {'ok' if ratio <= target else 'MISSED'})"
    return text


def main() -> None:
    """Run every group and print the table."""
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = N // 5 if args.quick else N
    if args.quick:
        REPEATS = 3

    def body(x: Any) -> Any:
        return x

    def body5(a: int, b: int, c: int, d: int = 0, e: int = 0) -> int:
        return a

    print("cache hit, 1 int arg")
    lru1 = hit1(functools.lru_cache(maxsize=1024)(body), n)
    print(row("functools.lru_cache (anchor)", lru1))
    if cachetools is not None:
        print(
            row(
                "cachetools.cached(LRUCache)",
                hit1(cachetools.cached(cachetools.LRUCache(1024))(body), n),
                lru1,
            )
        )
    if cachebox is not None:
        print(
            row(
                "cachebox.cached(LRUCache)",
                hit1(cachebox.cached(cachebox.LRUCache(1024))(body), n),
                lru1,
            )
        )
    if moka_py is not None:
        print(row("moka_py.cached", hit1(moka_py.cached(maxsize=1024)(body), n), lru1))
    op1 = hit1(opero(cache=True)(body), n)
    print(row("@opero(cache=True)", op1, lru1, 2.0))
    plain, ttl = paired_hit1(opero(cache=True)(body), opero(cache=True, cache_ttl=3600)(body), n)
    print(row("@opero(cache=True, cache_ttl=3600) vs no TTL (paired)", ttl, plain, 1.10))
    full = opero(
        cache=True, retries=3, rate_limit=1e9, arg_fallback="x", on_success=lambda r: None
    )(body)
    plain, full_hit = paired_hit1(opero(cache=True)(body), full, n)
    print(row("full stack hit vs @opero(cache=True) hit (paired)", full_hit, plain, 1.10))

    print("cache hit, 3 positional + 2 keyword args")
    lru5 = hit5(functools.lru_cache(maxsize=1024)(body5), n)
    print(row("functools.lru_cache (anchor)", lru5))
    if cachetools is not None:
        print(
            row(
                "cachetools.cached(LRUCache)",
                hit5(cachetools.cached(cachetools.LRUCache(1024))(body5), n),
                lru5,
            )
        )
    if cachebox is not None:
        print(
            row(
                "cachebox.cached(LRUCache)",
                hit5(cachebox.cached(cachebox.LRUCache(1024))(body5), n),
                lru5,
            )
        )
    if moka_py is not None:
        print(row("moka_py.cached", hit5(moka_py.cached(maxsize=1024)(body5), n), lru5))
    print(row("@opero(cache=True)", hit5(opero(cache=True)(body5), n), lru5, 1.0))

    print("cache miss with eviction (max size 1024, 10k distinct keys, uniform)")
    rng = random.Random(1)
    keys = [rng.randrange(10_000) for _ in range(n // 4)]
    lru_miss = misses(functools.lru_cache(maxsize=1024)(body), keys)
    print(row("functools.lru_cache (anchor)", lru_miss))
    if cachetools is not None:
        print(
            row(
                "cachetools.cached(LRUCache)",
                misses(cachetools.cached(cachetools.LRUCache(1024))(body), keys),
                lru_miss,
            )
        )
    print(row("@opero(cache=True)", misses(opero(cache=True)(body), keys), lru_miss, 3.0))
    print(
        row(
            "@opero(cache=True, retries=0)",
            misses(opero(cache=True, retries=0)(body), keys),
            lru_miss,
            3.0,
        )
    )

    print("retry, success path")

    def handwritten(x: Any) -> Any:
        for attempt in range(4):
            try:
                return body(x)
            except Exception:
                if attempt == 3:
                    raise
                time.sleep(0.1 * 1.5**attempt)
        return None

    hand = plain_calls(handwritten, n)
    print(row("handwritten try/except loop (anchor)", hand))
    if tenacity is not None:
        ten = tenacity.retry(stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_exponential())(
            body
        )
        print(row("tenacity.retry", plain_calls(ten, n // 10), hand))
    if backoff is not None:
        bo = backoff.on_exception(backoff.expo, Exception, max_tries=4)(body)
        print(row("backoff.on_exception", plain_calls(bo, n // 5), hand))
    print(row("@opero(retries=3)", plain_calls(opero(retries=3)(body), n), hand, 1.0))

    async def abody(x: Any) -> Any:
        return x

    async def ahandwritten(x: Any) -> Any:
        for attempt in range(4):
            try:
                return await abody(x)
            except Exception:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.1 * 1.5**attempt)
        return None

    ahand = async_calls(ahandwritten, n)
    print(row("async handwritten try/except loop (anchor)", ahand))
    if tenacity is not None:
        aten = tenacity.retry(stop=tenacity.stop_after_attempt(4))(abody)
        print(row("async tenacity.retry", async_calls(aten, n // 10), ahand))
    print(row("async @opero(retries=3)", async_calls(opero(retries=3)(abody), n), ahand, 1.2))

    print("async cache hit, 1 int arg (no target; for reference)")

    async def acached_plain(x: Any) -> Any:
        return await abody(x)

    aplain = async_calls(acached_plain, n)
    print(row("await of a plain async wrapper (anchor)", aplain))
    if moka_py is not None:
        print(
            row("async moka_py.cached", async_calls(moka_py.cached(maxsize=1024)(abody), n), aplain)
        )
    print(row("async @opero(cache=True)", async_calls(opero(cache=True)(abody), n), aplain))

    print("rate limit, one call through a bucket that never throttles")
    bucket = PyBucket(1e9, 1_000_000)

    def through_bucket(x: Any) -> Any:
        delay = bucket.acquire()
        if delay > 0:
            time.sleep(delay)
        return body(x)

    pyb = plain_calls(through_bucket, n)
    print(row("pure-Python bucket with lock + call (anchor)", pyb))
    print(row("@opero(rate_limit=1e9)", plain_calls(opero(rate_limit=1e9)(body), n), pyb, 1.0))
    print(
        row(
            "@opero(rate_limit=1e9, retries=0)",
            plain_calls(opero(rate_limit=1e9, retries=0)(body), n),
            pyb,
            1.0,
        )
    )


if __name__ == "__main__":
    main()
