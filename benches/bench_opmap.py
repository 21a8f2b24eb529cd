"""Benchmark of @opmap against its anchors, measured in the same run.

Run: ``.venv/bin/python benches/bench_opmap.py [--quick] [--no-dask]``

Anchors: ``ThreadPoolExecutor.map``, ``multiprocessing.Pool.map`` (warm, automatic
chunks), ``ProcessPoolExecutor.map`` (chunked), Dask ``client.map`` (one task
per item) and the serial loop for the CPU job. Each figure is the best of
several repeats; the ratios are what to quote (the machine is shared).
Functions live in ``tests/opmap_helpers.py`` so worker processes import them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import opmap_helpers as h
from opero import opmap

WORKERS = 2
TRIVIAL = 10_000


def best(fn: Callable[[], Any], repeat: int) -> float:
    """Return the best wall time of ``repeat`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_interleaved(fns: list[Callable[[], Any]], repeat: int) -> list[float]:
    """Return the best time of each function, running them in turn ``repeat`` times.

    Interleaving exposes every contender to the same background load.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [min(bucket) for bucket in times]


def row(
    name: str, seconds: float, anchor: float | None = None, note: str = "", unit: str = "ms"
) -> None:
    """Print one aligned line: the time in ``unit`` (ms or us) and the ratio to the anchor."""
    ratio = f"{seconds / anchor:8.3f}x anchor time" if anchor else ""
    scale = 1e3 if unit == "ms" else 1e6
    print(f"  {name:<52} {seconds * scale:10.2f} {unit}  {ratio}  {note}")


def bench_thread(repeat: int) -> None:
    """Thread mode on 10k trivial items vs ThreadPoolExecutor.map (same worker count)."""
    items = list(range(TRIVIAL))
    workers = min(32, (os.cpu_count() or 1) + 4)
    default = opmap(mode="thread", progress=False)(h.trivial)
    bare = opmap(mode="thread", progress=False, retries=0)(h.trivial)
    default(items)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(h.trivial, items))
        anchor = best(lambda: list(pool.map(h.trivial, items)), repeat)
    print(f"thread, {TRIVIAL} trivial items, {workers} workers")
    row("ThreadPoolExecutor.map (anchor)", anchor)
    t = best(lambda: default(items), repeat)
    row("opmap thread (default options: retries=3)", t, anchor, f"{anchor / t:.1f}x faster")
    t = best(lambda: bare(items), repeat)
    row("opmap thread (retries=0)", t, anchor, f"{anchor / t:.1f}x faster")


def bench_process(repeat: int, cpu_items: int) -> None:
    """Process mode: trivial items on a warm pool, the CPU job, retries+cache overhead."""
    items = list(range(TRIVIAL))
    plain = opmap(mode="process", workers=WORKERS, retries=0, progress=False)(h.trivial)
    start = time.perf_counter()
    plain(items)
    cold = time.perf_counter() - start
    default = opmap(mode="process", workers=WORKERS, progress=False)(h.trivial)
    default(items)
    with multiprocessing.Pool(WORKERS) as mp_pool:
        mp_pool.map(h.trivial, items)
        anchor, t, t_default = best_interleaved(
            [lambda: mp_pool.map(h.trivial, items), lambda: plain(items), lambda: default(items)],
            repeat * 5,
        )
        print(f"process, {TRIVIAL} trivial items, {WORKERS} workers")
        row("multiprocessing.Pool.map warm, auto chunks (anchor)", anchor)
        row("opmap process warm (retries=0)", t, anchor)
        row("opmap process warm (default options: retries=3)", t_default, anchor)
        row("opmap process cold (first call, pool start)", cold, anchor)

    print("process: per-item overhead of retries=3 + an empty cache (filled in the parent)")
    for label, fn, count in (
        ("trivial items", h.trivial, TRIVIAL),
        ("0.1 ms items", h.cpu_100us, 2000),
    ):
        work = list(range(count))
        bare = opmap(mode="process", workers=WORKERS, retries=0, progress=False)(fn)
        full = opmap(mode="process", workers=WORKERS, retries=3, cache=True, progress=False)(fn)

        def with_empty_cache(full: Any = full, work: list[int] = work) -> None:
            full.item_function.cache_clear()
            full(work)

        with_empty_cache()
        bare(work)
        t_bare, t_full = best_interleaved(
            [lambda bare=bare, work=work: bare(work), with_empty_cache], repeat
        )
        row(f"{count} {label}: retries=0, no cache (anchor)", t_bare)
        row(f"{count} {label}: retries=3, cache=True (empty)", t_full, t_bare)

    cpu = list(range(cpu_items))
    cpu_map = opmap(mode="process", workers=WORKERS, retries=0, progress=False)(h.cpu_item)
    cpu_map(cpu[:WORKERS])
    serial = best(lambda: [h.cpu_item(x) for x in cpu], 1)
    with ProcessPoolExecutor(WORKERS) as ppe:
        chunk = max(1, cpu_items // (WORKERS * 4))
        list(ppe.map(h.cpu_item, cpu[:WORKERS]))
        t_ppe = best(lambda: list(ppe.map(h.cpu_item, cpu, chunksize=chunk)), repeat)
    t_opmap = best(lambda: cpu_map(cpu), repeat)
    print(f"CPU job, {cpu_items} items x 5 ms, {WORKERS} workers")
    row("serial loop (anchor)", serial)
    row("ProcessPoolExecutor.map, chunked", t_ppe, serial, f"speed-up {serial / t_ppe:.2f}x")
    row("opmap process", t_opmap, serial, f"speed-up {serial / t_opmap:.2f}x")


def bench_dask(repeat: int, cpu_items: int, anchor_items: int) -> None:
    """Dask mode vs client.map per item, and the CPU job, on a 2-worker LocalCluster."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        items = list(range(TRIVIAL))
        few = list(range(anchor_items))
        trivial_map = opmap(mode="dask", client=client, retries=0, progress=False)(h.trivial)
        trivial_map(items)

        def per_item() -> None:
            futures = client.map(h.trivial, few, pure=False)
            client.gather(futures)
            del futures

        per_item()
        anchor = best(per_item, max(1, repeat // 2)) / anchor_items
        t = best(lambda: trivial_map(items), repeat) / TRIVIAL
        print(f"dask, trivial items, {WORKERS} worker processes (time per item)")
        row(f"client.map, one task per item ({anchor_items} items, anchor)", anchor, unit="us")
        row(f"opmap dask ({TRIVIAL} items)", t, anchor, f"{anchor / t:.0f}x faster", unit="us")

        cpu = list(range(cpu_items))
        cpu_map = opmap(mode="dask", client=client, retries=0, progress=False)(h.cpu_item)
        cpu_map(cpu[:WORKERS])
        serial = best(lambda: [h.cpu_item(x) for x in cpu], 1)
        t_cpu = best(lambda: cpu_map(cpu), repeat)

        def dask_per_item() -> None:
            futures = client.map(h.cpu_item, cpu, pure=False)
            client.gather(futures)
            del futures

        t_anchor = best(dask_per_item, 1)
        print(f"dask CPU job, {cpu_items} items x 5 ms")
        row("serial loop (anchor)", serial)
        row("client.map per item", t_anchor, serial, f"speed-up {serial / t_anchor:.2f}x")
        row("opmap dask", t_cpu, serial, f"speed-up {serial / t_cpu:.2f}x")


def main() -> None:
    """Run every group and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask groups")
    args = parser.parse_args()
    repeat = 3 if args.quick else 7
    print(f"opmap benchmark, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    bench_thread(repeat)
    bench_process(repeat, 200)
    if not args.no_dask:
        bench_dask(repeat, 200, 1000 if args.quick else 2000)


if __name__ == "__main__":
    main()
