"""Memory of a long stream: RSS while ``f.imap`` maps millions of trivial items.

Run ``python -m opero._bench.imap_rss --mode thread --items 10000000``. It
prints the parent's resident set size (from ``/proc/self/statm``, Linux) before
the stream, every tenth of the way, and its peak (``ru_maxrss``): a stream
holds at most ``2 * workers`` chunks, so the figure stays flat however many
items go through. The items come from a generator and the results are summed,
never kept.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from opero import opmap

__all__ = ["main", "rss_mb"]


def rss_mb() -> float:
    """Return this process's current resident set size in MiB (0.0 where unknown)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def increment(x: int) -> int:
    """Return ``x + 1`` (the trivial item)."""
    return x + 1


def main(argv: list[str] | None = None) -> int:
    """Stream the items, printing the RSS as it goes; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="thread", choices=["thread", "process"])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    mapped = opmap(mode=args.mode, workers=args.workers, retries=0, progress=False)(increment)
    step = max(1, args.items // 10)
    total = 0
    start = time.perf_counter()
    print(f"mode={args.mode} items={args.items:,} workers={args.workers}")
    print(f"rss before: {rss_mb():.1f} MiB")
    for i, value in enumerate(mapped.imap(iter(range(args.items)))):
        if isinstance(value, Exception):
            raise value
        total += value
        if (i + 1) % step == 0:
            print(f"  after {i + 1:>12,} items: rss {rss_mb():.1f} MiB")
    elapsed = time.perf_counter() - start
    expected = args.items * (args.items + 1) // 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rate = args.items / elapsed
    print(f"rss peak: {peak:.1f} MiB; {rate:,.0f} items/s; sum ok: {total == expected}")
    return 0 if total == expected else 1


if __name__ == "__main__":
    sys.exit(main())
