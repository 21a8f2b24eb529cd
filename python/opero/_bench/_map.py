"""Groups ``map`` and ``dask``: ``@opmap`` over many items (issue 4's targets).

Each figure is one whole map (after a warm-up map, so pools are warm) turned
into items/s; the ratio is still opero's time over the anchor's. Two workers
everywhere. ``--quick`` shrinks the CPU job; the trivial maps stay at 10k items
because they are cheap. The ``dask`` group starts a ``distributed.LocalCluster``
and is not part of the default run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

from opero._bench._harness import Case, Group, Impl, LoopFn, Settings, check

__all__ = ["GROUPS"]

WORKERS = 2
TRIVIAL_ITEMS = 10_000
CPU_ITEM_S = 0.005

MapFn = Callable[[Sequence[int]], list[Any]]


def square(x: int) -> int:
    """Return ``x * x`` (the trivial item)."""
    return x * x


def spin(x: int) -> int:
    """Keep one CPU busy for 5 ms, then return ``x`` (the CPU-bound item)."""
    end = time.perf_counter() + CPU_ITEM_S
    while time.perf_counter() < end:
        pass
    return x


def _job(map_fn: MapFn, items: Sequence[int], func: Callable[[int], int]) -> LoopFn:
    expected = [func(x) for x in items] if func is square else list(items)
    result = list(map_fn(items))
    check(result == expected, f"map returned wrong results (first: {result[:3]!r})")

    def loop(n: int) -> None:
        for _ in range(n):
            map_fn(items)

    return loop


def _opmap(**options: Any) -> Callable[[Callable[[int], int]], MapFn]:
    from opero import opmap

    decorator: Callable[[Callable[[int], int]], MapFn] = opmap(
        workers=WORKERS, progress=False, **options
    )
    return decorator


def _opero_impl(mode: str, items: Sequence[int], func: Callable[[int], int]) -> Impl:
    return Impl(
        "opero @opmap",
        lambda stack: _job(_opmap(mode=mode)(func), items, func),
        once=True,
        ops=len(items),
    )


def _imap_impls(mode: str, items: Sequence[int], func: Callable[[int], int]) -> list[Impl]:
    """Return ``list(f.imap(items))`` and the list call ``f(items)`` of the same map."""

    def streamed(stack: contextlib.ExitStack) -> LoopFn:
        mapped: Any = _opmap(mode=mode)(func)
        return _job(lambda xs: list(mapped.imap(xs)), items, func)

    def listed(stack: contextlib.ExitStack) -> LoopFn:
        return _job(_opmap(mode=mode)(func), items, func)

    return [
        Impl("opero imap", streamed, once=True, ops=len(items)),
        Impl("opero list call", listed, once=True, ops=len(items)),
    ]


def _serial(items: Sequence[int], func: Callable[[int], int]) -> Impl:
    return Impl(
        "serial list comp.",
        lambda stack: _job(lambda xs: [func(x) for x in xs], items, func),
        once=True,
        ops=len(items),
    )


def _thread_pool(items: Sequence[int], func: Callable[[int], int]) -> Impl:
    def make(stack: contextlib.ExitStack) -> LoopFn:
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(WORKERS))
        return _job(lambda xs: list(pool.map(func, xs)), items, func)

    return Impl("ThreadPoolExecutor.map", make, once=True, ops=len(items))


def _mp_pool(items: Sequence[int], func: Callable[[int], int]) -> Impl:
    def make(stack: contextlib.ExitStack) -> LoopFn:
        pool = multiprocessing.get_context().Pool(WORKERS)
        stack.callback(pool.join)
        stack.callback(pool.terminate)
        return _job(lambda xs: pool.map(func, xs), items, func)

    return Impl("multiprocessing.Pool.map", make, once=True, ops=len(items))


def _process_pool(items: Sequence[int], func: Callable[[int], int]) -> Impl:
    chunk = max(1, -(-len(items) // (4 * WORKERS)))  # Pool.map's automatic chunk size

    def make(stack: contextlib.ExitStack) -> LoopFn:
        pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(WORKERS))
        return _job(lambda xs: list(pool.map(func, xs, chunksize=chunk)), items, func)

    return Impl("ProcessPoolExecutor", make, once=True, ops=len(items))


def _fresh_items_impl(label: str, options: dict[str, Any], n_items: int) -> Impl:
    """Return a process map over items never seen before on each run (the cache stays cold)."""

    def make(stack: contextlib.ExitStack) -> LoopFn:
        mapped = _opmap(mode="process", **options)(square)
        bases = itertools.count(1_000_000, n_items)

        def run(n: int) -> None:
            for _ in range(n):
                base = next(bases)
                mapped(range(base, base + n_items))

        first = next(bases)
        result = mapped(range(first, first + n_items))
        check(list(result) == [x * x for x in range(first, first + n_items)], "wrong results")
        return run

    return Impl(label, make, once=True, ops=n_items)


def _build_map(settings: Settings) -> list[Case]:
    trivial = list(range(TRIVIAL_ITEMS))
    cpu = list(range(40 if settings.quick else 200))
    cpu_label = f"process, {len(cpu)}x5ms CPU"
    return [
        Case(
            f"thread, {TRIVIAL_ITEMS // 1000}k trivial",
            _opero_impl("thread", trivial, square),
            [_thread_pool(trivial, square), _serial(trivial, square)],
            targets={"ThreadPoolExecutor.map": 0.1},
        ),
        Case(
            f"process, {TRIVIAL_ITEMS // 1000}k trivial, warm",
            _opero_impl("process", trivial, square),
            [_mp_pool(trivial, square), _process_pool(trivial, square)],
            targets={"multiprocessing.Pool.map": 1.25},
        ),
        Case(
            cpu_label,
            _opero_impl("process", cpu, spin),
            [_serial(cpu, spin), _mp_pool(cpu, spin), _process_pool(cpu, spin)],
            targets={"serial list comp.": 1 / 1.85},
        ),
        Case(
            f"thread, imap, {TRIVIAL_ITEMS // 1000}k trivial",
            (imaps := _imap_impls("thread", trivial, square))[0],
            [imaps[1]],
            targets={"opero list call": 1.2},
        ),
        Case(
            f"process, imap, {TRIVIAL_ITEMS // 1000}k trivial",
            (pimaps := _imap_impls("process", trivial, square))[0],
            [pimaps[1]],
            targets={"opero list call": 1.2},
        ),
        Case(
            "process, retries+cache",
            _fresh_items_impl("opero", {"retries": 3, "cache": True}, TRIVIAL_ITEMS),
            [_fresh_items_impl("opero, no options", {}, TRIVIAL_ITEMS)],
            targets={"opero, no options": 1.2},
        ),
    ]


def _build_dask(settings: Settings) -> list[Case]:
    n_items = 2_000 if settings.quick else TRIVIAL_ITEMS
    per_item = list(range(500 if settings.quick else 2_000))
    holder: dict[str, Any] = {}

    def client(stack: contextlib.ExitStack) -> Any:
        if "client" not in holder:
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(
                LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
                )
            )
            holder["client"] = stack.enter_context(Client(cluster))  # type: ignore[no-untyped-call]
        return holder["client"]

    def opero_make(stack: contextlib.ExitStack) -> LoopFn:
        c = client(stack)
        mapped = _opmap(mode="dask", client=c)(square)
        return _job(mapped, list(range(n_items)), square)

    def per_item_make(stack: contextlib.ExitStack) -> LoopFn:
        c = client(stack)
        return _job(lambda xs: c.gather(c.map(square, xs, pure=False)), per_item, square)

    cpu = list(range(40 if settings.quick else 200))

    def opero_cpu(stack: contextlib.ExitStack) -> LoopFn:
        mapped = _opmap(mode="dask", client=client(stack))(spin)
        return _job(mapped, cpu, spin)

    return [
        Case(
            f"dask, {n_items // 1000}k trivial",
            Impl("opero @opmap", opero_make, ("distributed",), once=True, ops=n_items),
            [
                Impl(
                    "client.map per item",
                    per_item_make,
                    ("distributed",),
                    once=True,
                    ops=len(per_item),
                )
            ],
            targets={"client.map per item": 1 / 50},
        ),
        Case(
            f"dask, {len(cpu)}x5ms CPU",
            Impl("opero @opmap", opero_cpu, ("distributed",), once=True, ops=len(cpu)),
            [_serial(cpu, spin)],
            targets={"serial list comp.": 1 / 1.6},
        ),
    ]


GROUPS = [
    Group("map", "parallel map: @opmap, 2 workers", "items/s", _build_map),
    Group(
        "dask",
        "Dask: @opmap(mode='dask'), LocalCluster of 2",
        "items/s",
        _build_dask,
        default=False,
    ),
]
