"""The guide's @opmap patterns (spec/advanced-features.md), with its own code.

Only the external calls are stubbed: the I/O task body, the dataset helpers and
``aiohttp``'s session (the async process pattern posts its result to an API).
The guide's functions live at module level, as in the guide, so worker
processes import them by name.
"""

from __future__ import annotations

import os
from typing import Any, List  # noqa: UP035 - the guide's own imports

import numpy as np  # noqa: F401 - imported by the guide's example

from opero import opmap

# --------------------------------------------------------------------------- stubs

IO_CALLS: list[Any] = []


def fetch_item(item: Any) -> None:
    """Stub of the guide's I/O-bound operation: records the call."""
    IO_CALLS.append(item)


def estimate_processing_time(item: int) -> int:
    """Stub: larger items take longer."""
    return item


def process_single_item(item: int) -> tuple[int, int]:
    """Stub: the item squared, with the worker's pid."""
    return item * item, os.getpid()


def get_large_dataset() -> list[int]:
    """Stub: forty items of mixed sizes."""
    return [(i * 37) % 101 for i in range(40)]


def compute_heavy_operation(data: int) -> dict[str, int]:
    """Stub: a small CPU job."""
    return {"value": sum(range(data))}


class _StubResponse:
    """What ``session.post(...)`` yields: ``json()`` echoes the request."""

    def __init__(self, url: str, payload: Any) -> None:
        self.url = url
        self.payload = payload

    async def __aenter__(self) -> _StubResponse:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def json(self) -> dict[str, Any]:
        return {"url": self.url, "posted": self.payload, "pid": os.getpid()}


class _StubSession:
    """Stub of ``aiohttp.ClientSession``: no network."""

    async def __aenter__(self) -> _StubSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def post(self, url: str, json: Any = None) -> _StubResponse:
        return _StubResponse(url, json)


class aiohttp:
    """Stub of the ``aiohttp`` module: only ``ClientSession``."""

    ClientSession = _StubSession


# --------------------------------------------------------------------------- the guide's code


def get_optimal_workers(mode: str) -> int:
    """Calculate optimal worker count based on mode and system."""
    cpu_count = os.cpu_count() or 4

    if mode == "thread":
        # I/O-bound: can use more workers than CPUs
        return min(cpu_count * 4, 32)
    elif mode == "process":
        # CPU-bound: match CPU count
        return cpu_count
    else:
        return 4


@opmap(mode="thread", workers=get_optimal_workers("thread"), retries=3, cache=True)
def parallel_io_task(item):
    # Your I/O-bound operation
    fetch_item(item)  # the guide's body is `pass`; the stub records the call


def distribute_tasks_by_size(items: List[Any], workers: int) -> List[List[Any]]:  # noqa: UP006
    """Distribute tasks to balance workload across workers."""
    # Sort items by expected processing time
    sorted_items = sorted(items, key=lambda x: estimate_processing_time(x))

    # Round-robin distribution for balanced load
    chunks = [[] for _ in range(workers)]
    for i, item in enumerate(sorted_items):
        chunks[i % workers].append(item)

    return chunks


@opmap(
    mode="process",
    workers=4,
    ordered=False,  # Don't need order preservation
)
def process_with_load_balancing(chunk):
    # Process a balanced chunk of items
    return [process_single_item(item) for item in chunk]


@opmap(
    mode="async_process",  # Requires opero[aiomultiprocess]
    workers=4,
    retries=2,
)
async def cpu_intensive_async_task(data):
    """CPU-intensive task that also does async I/O."""
    # Perform CPU-intensive computation
    result = compute_heavy_operation(data)

    # Also perform async I/O
    async with aiohttp.ClientSession() as session:  # noqa: SIM117 - the guide's code
        async with session.post("https://api.example.com/results", json=result) as response:
            return await response.json()


# --------------------------------------------------------------------------- tests


def test_dynamic_worker_allocation():
    """The guide's thread map runs with its computed worker count, retries and cache."""
    IO_CALLS.clear()
    assert parallel_io_task.workers == min((os.cpu_count() or 4) * 4, 32)
    assert parallel_io_task(range(50)) == [None] * 50
    assert sorted(IO_CALLS) == list(range(50))
    assert parallel_io_task(range(50)) == [None] * 50
    assert len(IO_CALLS) == 50


def test_custom_task_distribution():
    """Balanced chunks go to four processes unordered; every item comes back once."""
    all_items = get_large_dataset()
    distributed = distribute_tasks_by_size(all_items, 4)
    results = process_with_load_balancing(distributed)
    assert len(results) == 4
    assert sorted(len(chunk) for chunk in results) == [10, 10, 10, 10]
    squares = sorted(value for chunk in results for value, _pid in chunk)
    assert squares == sorted(item * item for item in all_items)
    assert os.getpid() not in {pid for chunk in results for _value, pid in chunk}


def test_async_process_pool():
    """The guide's async function runs on the aiomultiprocess pool with the session stubbed."""
    results = cpu_intensive_async_task([3, 4, 5])
    assert [r["posted"] for r in results] == [{"value": 3}, {"value": 6}, {"value": 10}]
    assert {r["url"] for r in results} == {"https://api.example.com/results"}
    assert os.getpid() not in {r["pid"] for r in results}
