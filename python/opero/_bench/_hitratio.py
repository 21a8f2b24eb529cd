"""Group ``hitratio``: how often each cache misses on skewed traffic (issue 14).

Every miss of a cache is a trip to the slow dependency it guards, so this
group counts misses, not nanoseconds. Three seeded traces of
:data:`TRACE_LENGTH` requests over :data:`KEYS` keys replay through caches
of :data:`CAPACITY` entries (1% of the keys):

* ``stationary``: Zipf, exponent 0.9;
* ``scan``: the same, with 20% of the requests one-off fresh keys interleaved;
* ``shift``: Zipf 0.9 whose hot set changes completely halfway.

The figure is misses per 1,000 requests (lower is better), so the ratio
column is opero's misses over the anchor's. The target against each anchor
is "opero's hit ratio at least the anchor's minus one point", converted to a
miss ratio from the anchor's figure measured in the same run. Replaying the
traces through the five caches takes about 10 s, so the group is opt-in:
``python -m opero bench --only hitratio``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from opero._bench._harness import Case, Figure, Group, Impl, LoopFn, Settings, check
from opero._bench._subjects import opero_decorator

__all__ = ["CAPACITY", "GROUP", "KEYS", "TRACE_LENGTH", "hit_ratio", "make_traces"]

KEYS = 100_000
"""Distinct keys of the Zipf distribution."""
CAPACITY = 1_000
"""Entries every cache may hold."""
TRACE_LENGTH = 1_000_000
"""Requests per trace."""
SEED = 14
"""Seed of the traces (the issue's number), so every run replays the same requests."""
_POINT = 0.01  # "the best anchor minus one point" of hit ratio

Trace = Sequence[int]
Decorate = Callable[[Callable[[int], int]], Callable[[int], int]]
"""Wraps a one-argument function in a cache."""
Subject = tuple[str, Callable[[], Decorate], tuple[str, ...]]


def make_traces(
    keys: int = KEYS, length: int = TRACE_LENGTH, seed: int = SEED
) -> dict[str, list[int]]:
    """Return the three traces by name: ``stationary``, ``scan`` and ``shift``.

    Args:
        keys: Distinct keys of the Zipf distribution (rank 0 is the hottest).
        length: Requests per trace.
        seed: Seed of the random generator.

    """
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / r**0.9 for r in range(1, keys + 1)))
    ranks = range(keys)

    def zipf(k: int) -> list[int]:
        return rng.choices(ranks, cum_weights=cum, k=k)

    stationary = zipf(length)
    # Fresh keys lie above every Zipf key, each used once.
    fresh = itertools.count(keys)
    scan = [next(fresh) if rng.random() < 0.2 else k for k in zipf(length)]
    half = length // 2
    # The second half draws from a disjoint key range: a completely new hot set.
    shift = zipf(half) + [k + 10 * keys for k in zipf(length - half)]
    return {"stationary": stationary, "scan": scan, "shift": shift}


def hit_ratio(decorate: Decorate, trace: Trace) -> float:
    """Replay ``trace`` through ``decorate(identity)`` and return the share of hits.

    Misses are counted as calls of the undecorated function, the same way for
    every cache, and each result is checked.

    Args:
        decorate: Wraps a one-argument function in a cache.
        trace: The keys requested, in order.

    """
    calls = [0]

    def identity(k: int) -> int:
        calls[0] += 1
        return k

    cached = decorate(identity)
    for k in trace:
        if cached(k) != k:
            raise AssertionError(f"the cache returned a wrong value for {k}")
    return 1.0 - calls[0] / len(trace)


def _lru() -> Decorate:
    return functools.lru_cache(maxsize=CAPACITY)


def _lfu() -> Decorate:
    import cachetools

    cache: Any = cachetools.LFUCache(CAPACITY)
    decorator: Decorate = cachetools.cached(cache)
    return decorator


def _moka() -> Decorate:
    import moka_py

    decorator: Decorate = moka_py.cached(maxsize=CAPACITY)
    return decorator


def _opero(policy: str) -> Decorate:
    return opero_decorator(cache=True, cache_max_size=CAPACITY, cache_policy=policy)


def _measured(
    ratios: dict[tuple[str, str], float], trace_name: str, label: str
) -> Callable[[contextlib.ExitStack], LoopFn]:
    def make(stack: contextlib.ExitStack) -> LoopFn:
        ratio = ratios.get((trace_name, label))
        check(ratio is not None, f"{label} was not measured on {trace_name}")
        figure = Figure(1000.0 * (1.0 - (ratio or 0.0)))
        return lambda _n: figure

    return make


_ANCHORS: tuple[Subject, ...] = (
    ("functools.lru_cache", _lru, ()),
    ("cachetools.LFUCache", _lfu, ("cachetools",)),
    ("moka_py.cached", _moka, ("moka_py",)),
    ("opero, lru", lambda: _opero("lru"), ()),
)


def _installed(modules: tuple[str, ...]) -> bool:
    try:
        for m in modules:
            __import__(m)
    except ImportError:
        return False
    return True


def _build(settings: Settings) -> list[Case]:
    traces = make_traces()
    ratios: dict[tuple[str, str], float] = {}
    cases: list[Case] = []
    subjects: list[Subject] = [("opero", lambda: _opero("tinylfu"), ()), *_ANCHORS]
    for name, trace in traces.items():
        for label, decorate, requires in subjects:
            if _installed(requires):
                ratios[(name, label)] = hit_ratio(decorate(), trace)
        # Target: hit ratio >= the anchor's minus one point, as a ratio of miss figures.
        targets: dict[str, float] = {}
        for label, _, _ in _ANCHORS:
            if (name, label) in ratios and label != "opero, lru":
                anchor_miss = 1.0 - ratios[(name, label)]
                targets[label] = (anchor_miss + _POINT) / anchor_miss
        cases.append(
            Case(
                f"{name}: opero tinylfu",
                Impl("opero", _measured(ratios, name, "opero"), once=True),
                [
                    Impl(label, _measured(ratios, name, label), req, once=True)
                    for label, _, req in _ANCHORS
                ],
                targets=targets,
            )
        )
    return cases


GROUP = Group(
    "hitratio",
    f"hit ratio: Zipf 0.9, {KEYS // 1000}k keys, capacity {CAPACITY:,}, "
    f"{TRACE_LENGTH / 1e6:g}M requests",
    "misses/1k",
    _build,
    default=False,
)
