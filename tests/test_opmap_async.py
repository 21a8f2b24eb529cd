"""@opmap in async and async_process modes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import warnings

import pytest

import opmap_helpers as h
from opero import MapError, OpmapFailureWarning, opmap
from opero.errors import RateLimitTimeout


def test_async_mode_from_sync_code():
    """An async def item function maps from sync code and keeps input order."""

    @opmap(mode="async", workers=4, progress=False)
    async def double(x):
        await asyncio.sleep(0)
        return 2 * x

    assert double(range(20)) == [2 * x for x in range(20)]


def test_async_workers_bound_coroutines_in_flight():
    """At most `workers` coroutines run at once, and that many do run together."""
    active = 0
    peak = 0

    @opmap(mode="async", workers=3, retries=0, progress=False)
    async def meet(x):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        for _ in range(5):
            await asyncio.sleep(0)
        active -= 1
        return x

    assert meet(range(12)) == list(range(12))
    assert peak == 3


def test_async_amap_inside_running_loop():
    """Amap runs on the caller's loop; the plain call also works inside a loop."""

    @opmap(mode="async", workers=2, progress=False)
    async def inc(x):
        await asyncio.sleep(0)
        return x + 1

    async def main():
        loop_thread = threading.get_ident()
        awaited = await inc.amap([1, 2, 3])
        direct = inc([4, 5])
        return awaited, direct, loop_thread

    awaited, direct, _ = asyncio.run(main())
    assert awaited == [2, 3, 4]
    assert direct == [5, 6]


def test_async_failures_and_strict():
    """Async failures stay in place with a warning; strict raises the group."""

    @opmap(mode="async", workers=2, retries=0, progress=False)
    async def fail_odd(x):
        if x % 2:
            raise ValueError(x)
        return x

    with pytest.warns(OpmapFailureWarning, match="2 of 4 items failed"):
        results = fail_odd(range(4))
    assert results[0::2] == [0, 2]
    assert all(isinstance(r, ValueError) for r in results[1::2])

    strict = opmap(mode="async", workers=2, retries=0, strict=True, progress=False)(
        fail_odd.__wrapped__
    )
    with pytest.raises(MapError) as info:
        strict(range(4))
    assert info.value.indices == [1, 3]


def test_async_plain_def_runs_in_threads():
    """A plain def in async mode runs in worker threads, never on the loop's thread."""
    threads = set()

    @opmap(mode="async", workers=2, progress=False)
    def where(x):
        threads.add(threading.get_ident())
        return x

    async def main():
        return await where.amap(range(4)), threading.get_ident()

    results, loop_thread = asyncio.run(main())
    assert results == [0, 1, 2, 3]
    assert loop_thread not in threads


def test_async_cache_counts_calls():
    """With cache=True an item already computed is served from the cache."""
    calls = []

    @opmap(mode="async", workers=2, cache=True, retries=0, progress=False)
    async def square(x):
        calls.append(x)
        return x * x

    assert square([1, 2]) == [1, 4]
    assert square([2, 1, 3]) == [4, 1, 9]
    assert sorted(calls) == [1, 2, 3]


def test_async_unordered():
    """ordered=False returns results as they complete."""
    gate = None

    @opmap(mode="async", workers=2, ordered=False, progress=False)
    async def late_zero(x):
        nonlocal gate
        if gate is None:
            gate = asyncio.Event()
        if x == 0:
            await gate.wait()
        else:
            gate.set()
        return x

    assert late_zero([0, 1]) == [1, 0]


def test_async_process_pool():
    """Async def functions run on the aiomultiprocess pool, reused across calls."""
    assert h.ap_double(range(10)) == [2 * x for x in range(10)]
    assert h.ap_double([5]) == [10]


def test_async_process_failures_and_amap():
    """async_process failures stay in place, and amap awaits from a running loop."""
    with pytest.warns(OpmapFailureWarning, match="2 of 4 items failed"):
        results = h.ap_fail_odd(range(4))
    assert results[0::2] == [0, 2]
    assert all(isinstance(r, ValueError) for r in results[1::2])

    async def main():
        return await h.ap_double.amap([1, 2])

    assert asyncio.run(main()) == [2, 4]


def test_async_process_rate_limit_is_global():
    """The aiomultiprocess workers share one bucket: exactly `rate_burst` items get a token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        results = h.ap_rate_limited(range(16))
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 4
    assert sum(isinstance(r, RateLimitTimeout) for r in results) == 12


def test_interpreter_exits_after_pools_were_used(tmp_path):
    """A program that used the process and aiomultiprocess pools exits cleanly (no hang)."""
    script = tmp_path / "uses_pools.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(h.__file__)!r})\n"
        "import opmap_helpers as h\n"
        "if __name__ == '__main__':\n"
        "    assert h.ap_double([1, 2]) == [2, 4]\n"
        "    assert h.p_square([3]) == [9]\n"
        "    print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
