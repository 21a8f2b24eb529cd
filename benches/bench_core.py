"""Benchmark of opero's native core against its anchors, in one process.

Run: ``python benches/bench_core.py [--quick]``. Prints ns per operation and
the ratio to each anchor measured in the same run, and the issue's target.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import timeit
from collections.abc import Callable
from typing import Any

from opero import _opero_core as core

try:
    import cachebox
except ImportError:  # pragma: no cover - optional anchor
    cachebox = None
try:
    import cachetools
    import cachetools.keys
except ImportError:  # pragma: no cover - optional anchor
    cachetools = None


def ns_per_op(stmt: Callable[[], Any], number: int, repeat: int) -> float:
    """Best-of-``repeat`` (min is the least noisy on a shared machine) ns per call."""
    timer = timeit.Timer(stmt)
    runs = timer.repeat(repeat=repeat, number=number)
    return min(runs) / number * 1e9


def loop_ns(body: str, setup: str, ns: dict[str, Any], number: int, repeat: int) -> float:
    """ns per iteration of ``body`` inlined in a loop (no extra Python call frame)."""
    timer = timeit.Timer(body, setup=setup, globals=ns)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


class PyBucket:
    """The pure-Python anchor: a GCRA bucket behind a lock."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self.tat = float("-inf")
        self.lock = threading.Lock()

    def reserve(self) -> float:
        import time

        with self.lock:
            now = time.monotonic()
            tat = max(self.tat, now) + self.interval
            self.tat = tat
            return max(0.0, tat - self.burst * self.interval - now)


ROWS: list[tuple[str, float, str, float, str]] = []


def row(name: str, ns: float, anchor: str, anchor_ns: float, target: str) -> None:
    ROWS.append((name, ns, anchor, anchor_ns, target))
    ratio = ns / anchor_ns
    print(f"{name:<44} {ns:8.1f} ns  {anchor:<34} {anchor_ns:8.1f} ns  x{ratio:5.2f}  ({target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = parser.parse_args()
    number = 200_000 if a.quick else 1_000_000
    repeat = 5 if a.quick else 9
    g: dict[str, Any] = {}

    # Store.get of a present key.
    store = core.Store(1024)
    store.set(17, "v")
    g.update(store=store)
    ours = loop_ns("store.get(17)", "", g, number, repeat)
    ours_item = loop_ns("store[17]", "", g, number, repeat)
    if cachebox is not None:
        cb = cachebox.LRUCache(1024)
        cb[17] = "v"
        g.update(cb=cb)
        cb_ns = loop_ns("cb[17]", "", g, number, repeat)
        row("Store.get(present)", ours, "cachebox.LRUCache[key]", cb_ns, "<= 1.2x")
        row("Store[key] (present)", ours_item, "cachebox.LRUCache[key]", cb_ns, "<= 1.2x")
    if cachetools is not None:
        ct = cachetools.LRUCache(1024)
        ct[17] = "v"
        g.update(ct=ct)
        anchor = loop_ns("ct[17]", "", g, number // 2, repeat)
        row("Store.get(present)", ours, "cachetools.LRUCache[key]", anchor, "<= 0.33x")

    # Key build + hash, 3 positional + 2 keyword args.
    g.update(make_key=core.make_key, args=(1, "abc", 2.5), kwargs={"x": 10, "y": "z"})
    ours = loop_ns("hash(make_key(args, kwargs))", "", g, number, repeat)
    if cachetools is not None:
        g.update(hashkey=cachetools.keys.hashkey)
        anchor = loop_ns("hash(hashkey(*args, **kwargs))", "", g, number, repeat)
        row("make_key 3+2 args + hash", ours, "hash(cachetools.keys.hashkey)", anchor, "<= 0.5x")

    # Token bucket reserve, unthrottled.
    bucket = core.TokenBucket(1e12, 1_000_000)
    pyb = PyBucket(1e12, 1_000_000)
    g.update(bucket=bucket, pyb=pyb)
    ours = loop_ns("bucket.reserve()", "", g, number, repeat)
    anchor = loop_ns("pyb.reserve()", "", g, number // 2, repeat)
    row("TokenBucket.reserve()", ours, "pure-Python bucket with lock", anchor, "<= 100 ns")

    # CachedCall hits against functools.lru_cache.
    def f1(x: int) -> int:
        return x

    def f5(a: int, b: str, c: float, *, x: int, y: str) -> tuple[Any, ...]:
        return (a, b, c, x, y)

    lru1 = functools.lru_cache(maxsize=1024)(f1)
    lru5 = functools.lru_cache(maxsize=1024)(f5)
    cc1 = core.CachedCall(core.Store(1024), f1)
    cc5 = core.CachedCall(core.Store(1024), f5)
    cc1t = core.CachedCall(core.Store(1024, ttl=3600.0), f1)
    cc5t = core.CachedCall(core.Store(1024, ttl=3600.0), f5)
    g.update(lru1=lru1, lru5=lru5, cc1=cc1, cc5=cc5, cc1t=cc1t, cc5t=cc5t)
    for fn in ("lru1", "cc1", "cc1t"):
        g[fn](3)
    for fn in ("lru5", "cc5", "cc5t"):
        g[fn](1, "abc", 2.5, x=10, y="z")
    lru1_ns = loop_ns("lru1(3)", "", g, number, repeat)
    row("CachedCall hit, 1 int arg", loop_ns("cc1(3)", "", g, number, repeat), "lru_cache hit", lru1_ns, "<= 2x")
    row("CachedCall hit, 1 int arg, TTL", loop_ns("cc1t(3)", "", g, number, repeat), "lru_cache hit", lru1_ns, "<= 2.2x")
    call5 = "{}(1, 'abc', 2.5, x=10, y='z')"
    lru5_ns = loop_ns(call5.format("lru5"), "", g, number, repeat)
    row("CachedCall hit, 3+2 args", loop_ns(call5.format("cc5"), "", g, number, repeat), "lru_cache hit", lru5_ns, "<= 1.0x")
    row("CachedCall hit, 3+2 args, TTL", loop_ns(call5.format("cc5t"), "", g, number, repeat), "lru_cache hit", lru5_ns, "<= 1.1x")

    # Misses with eviction: max 1024, 10k distinct keys, uniform.
    import random

    rnd = random.Random(1)
    keys = [rnd.randrange(10_000) for _ in range(100_000)]
    lrum = functools.lru_cache(maxsize=1024)(f1)
    ccm = core.CachedCall(core.Store(1024), f1)
    g.update(keys=keys, lrum=lrum, ccm=ccm)
    n_keys = len(keys)
    anchor = loop_ns("for k in keys: lrum(k)", "", g, 1, repeat) / n_keys
    ours = loop_ns("for k in keys: ccm(k)", "", g, 1, repeat) / n_keys
    row("CachedCall mostly-miss 10k keys/1024", ours, "lru_cache same stream", anchor, "<= 3x")
    print(f"(hit rate in the miss stream: {cc_hit_rate(ccm):.2f}; lru_cache {lrum.cache_info().hits / max(1, lrum.cache_info().hits + lrum.cache_info().misses):.2f})")
    print(f"median ratio: {statistics.median(r[1] / r[3] for r in ROWS):.2f}")


def cc_hit_rate(cc: Any) -> float:
    hits, misses, *_ = cc.store.info()
    return hits / max(1, hits + misses)


if __name__ == "__main__":
    main()
