"""Benchmark of opero's native core against its anchors, in one process.

Run: ``python benches/bench_core.py [--quick] [--rounds N]``. Every statement
is timed in interleaved rounds (each round times every statement once) and the
best round is kept, which is the least noisy figure on a shared machine. It
prints ns per operation, the ratio to the anchor measured in the same run, the
target from issues 2 and 3, and whether it is met.
"""

from __future__ import annotations

import argparse
import functools
import random
import threading
import time
import timeit
from dataclasses import dataclass
from typing import Any

from opero import _opero_core as core

try:
    import cachebox
except ImportError:  # pragma: no cover - optional anchor
    cachebox = None
import cachetools
import cachetools.keys


class PyBucket:
    """The pure-Python anchor: a GCRA token bucket behind a lock."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self.tat = float("-inf")
        self.lock = threading.Lock()

    def reserve(self) -> float:
        with self.lock:
            now = time.monotonic()
            tat = max(self.tat, now) + self.interval
            self.tat = tat
            return max(0.0, tat - self.burst * self.interval - now)


@dataclass
class Case:
    """One comparison: our statement, the anchor's, and the target ratio (or ns)."""

    name: str
    ours: str
    anchor_name: str
    anchor: str
    limit: float
    absolute: bool = False


def f1(x: int) -> int:
    return x


def f5(a: int, b: str, c: float, *, x: int, y: str) -> tuple[Any, ...]:
    return (a, b, c, x, y)


def namespace() -> dict[str, Any]:
    """Build every object the statements use (anchors warmed like ours)."""
    ns: dict[str, Any] = {}
    store = core.Store(1024)
    store.set(17, "v")
    ns.update(store=store, ct=cachetools.LRUCache(1024))
    ns["ct"][17] = "v"
    if cachebox is not None:
        ns["cb"] = cachebox.LRUCache(1024)
        ns["cb"][17] = "v"
    ns.update(make_key=core.make_key, hashkey=cachetools.keys.hashkey)
    ns.update(args=(1, "abc", 2.5), kwargs={"x": 10, "y": "z"})
    ns.update(bucket=core.TokenBucket(1e12, 1_000_000), pyb=PyBucket(1e12, 1_000_000))
    ns.update(
        lru1=functools.lru_cache(maxsize=1024)(f1),
        lru5=functools.lru_cache(maxsize=1024)(f5),
        cc1=core.CachedCall(core.Store(1024), f1),
        cc5=core.CachedCall(core.Store(1024), f5),
        cc1t=core.CachedCall(core.Store(1024, ttl=3600.0), f1),
        cc5t=core.CachedCall(core.Store(1024, ttl=3600.0), f5),
    )
    for name in ("lru1", "cc1", "cc1t"):
        ns[name](3)
    for name in ("lru5", "cc5", "cc5t"):
        ns[name](1, "abc", 2.5, x=10, y="z")
    rnd = random.Random(1)
    ns["keys"] = [rnd.randrange(10_000) for _ in range(20_000)]
    ns["lrum"] = functools.lru_cache(maxsize=1024)(f1)
    ns["ccm"] = core.CachedCall(core.Store(1024), f1)
    return ns


CALL5 = "{}(1, 'abc', 2.5, x=10, y='z')"


def cases() -> list[Case]:
    """The comparisons, with the targets of issues 2 and 3."""
    out = []
    if cachebox is not None:
        out += [
            Case("Store[key] (present)", "store[17]", "cachebox.LRUCache[key]", "cb[17]", 1.2),
            Case(
                "Store.get(key) (present)", "store.get(17)", "cachebox.LRUCache[key]", "cb[17]", 1.2
            ),
            Case(
                "Store.get(key) (present)", "store.get(17)", "cachebox .get(key)", "cb.get(17)", 1.2
            ),
        ]
    out += [
        Case("Store[key] (present)", "store[17]", "cachetools.LRUCache[key]", "ct[17]", 1 / 3),
        Case(
            "Store.get(key) (present)", "store.get(17)", "cachetools.LRUCache[key]", "ct[17]", 1 / 3
        ),
        Case(
            "make_key 3+2 args + hash",
            "hash(make_key(args, kwargs))",
            "hash(cachetools hashkey)",
            "hash(hashkey(*args, **kwargs))",
            0.5,
        ),
        Case(
            "TokenBucket.reserve()",
            "bucket.reserve()",
            "Python bucket + lock",
            "pyb.reserve()",
            100.0,
            True,
        ),
        Case("CachedCall hit, 1 int arg", "cc1(3)", "lru_cache hit", "lru1(3)", 2.0),
        Case(
            "CachedCall hit, 3+2 args",
            CALL5.format("cc5"),
            "lru_cache hit",
            CALL5.format("lru5"),
            1.0,
        ),
        Case("CachedCall hit, 1 int, TTL on", "cc1t(3)", "same without TTL", "cc1(3)", 1.1),
        Case(
            "CachedCall hit, 3+2, TTL on",
            CALL5.format("cc5t"),
            "same without TTL",
            CALL5.format("cc5"),
            1.1,
        ),
        Case(
            "CachedCall misses, 10k keys / 1024 (x20k)",
            "for k in keys: ccm(k)",
            "lru_cache same stream",
            "for k in keys: lrum(k)",
            3.0,
        ),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    a = parser.parse_args()
    rounds = a.rounds or (7 if a.quick else 25)
    number = 20_000 if a.quick else 100_000
    ns = namespace()
    todo = cases()
    stmts = sorted({c.ours for c in todo} | {c.anchor for c in todo})
    timers = {s: timeit.Timer(s, globals=ns) for s in stmts}
    loops = {s: 1 if s.startswith("for ") else number for s in stmts}
    best = dict.fromkeys(stmts, float("inf"))
    for _ in range(rounds):
        for s in stmts:
            n = loops[s]
            best[s] = min(best[s], timers[s].timeit(n) / n * 1e9)
    per_item = len(ns["keys"])
    for s in stmts:
        if s.startswith("for "):
            best[s] /= per_item
    print(f"{'operation':<42} {'ns':>7}  {'anchor':<26} {'ns':>7}  {'ratio':>6}  target")
    for c in todo:
        ours, anchor = best[c.ours], best[c.anchor]
        ratio = ours / anchor
        ok = ours <= c.limit if c.absolute else ratio <= c.limit
        target = f"<= {c.limit:.0f} ns" if c.absolute else f"<= {c.limit:.2f}x"
        mark = "ok" if ok else "MISSED"
        print(
            f"{c.name:<42} {ours:7.1f}  {c.anchor_name:<26} {anchor:7.1f}  x{ratio:5.2f}  "
            f"{target} {mark}"
        )


if __name__ == "__main__":
    main()
