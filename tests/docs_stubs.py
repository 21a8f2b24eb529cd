"""Stand-ins for the external calls the documentation's examples make.

``tests/test_docs_examples.py`` runs every ```python block of ``docs/`` and
``README.md`` in a fresh namespace pre-filled with the names in ``__all__``:
a database, an HTTP API, a slow computation. They answer at once, from memory,
and deterministically, so an example can assert what it shows. They live in an
importable module, so worker processes (``mode="process"``, Dask) can import
them by name when an example's function refers to them.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from typing import Any

__all__ = [
    "CALLS",
    "DOWN_HOSTS",
    "acall_api",
    "call_api",
    "call_backup_service",
    "compute_heavy_operation",
    "estimate_processing_time",
    "expensive_operation",
    "external_service_call",
    "fetch_from_database",
    "fetch_page",
    "fetch_resource",
    "fetch_url",
    "get_large_dataset",
    "get_popular_product_ids",
    "make_api_call",
    "post_results",
    "process_data",
    "process_single_item",
    "simple_operation",
]

CALLS: Counter[str] = Counter()
"""How many times each stub ran in this process (examples read it to show cache hits)."""

_lock = threading.Lock()

DOWN_HOSTS = frozenset({"primary.api.example.com", "fast.api.example.com"})
"""Hosts ``call_api`` treats as down: it raises ``ConnectionError`` for them."""


def _count(name: str) -> None:
    with _lock:
        CALLS[name] += 1


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def fetch_from_database(key: Any) -> dict[str, Any]:
    """Stub of a database read: a small record for ``key``."""
    _count("fetch_from_database")
    return {"id": key, "name": f"product {key}", "price": 10 * len(str(key))}


def get_popular_product_ids() -> list[int]:
    """Stub: the ids a shop would warm its cache with."""
    return [1, 2, 3, 5, 8, 13]


def make_api_call(data: Any) -> dict[str, Any]:
    """Stub of an HTTP API: answers ``{"status": "done", ...}`` for ``data``.

    A dict with ``"pending": n`` answers ``{"status": "pending"}`` for its first
    ``n`` calls (counted per ``data["id"]``), like a job still running.
    """
    _count("make_api_call")
    if isinstance(data, dict) and data.get("pending"):
        key = f"make_api_call:{data.get('id')}"
        with _lock:
            CALLS[key] += 1
            seen = CALLS[key]
        if seen <= int(data["pending"]):
            return {"status": "pending", "id": data.get("id")}
    return {"status": "done", "data": data}


def call_api(endpoint: str, payload: Any = None) -> dict[str, Any]:
    """Stub of an HTTP call: ``ConnectionError`` for hosts in ``DOWN_HOSTS``, else an answer."""
    _count("call_api")
    if _host(endpoint) in DOWN_HOSTS:
        raise ConnectionError(f"{endpoint} is not answering")
    return {"endpoint": endpoint, "data": payload, "status": "ok"}


async def acall_api(endpoint: str, payload: Any = None) -> dict[str, Any]:
    """Async twin of :func:`call_api`."""
    await asyncio.sleep(0)
    return call_api(endpoint, payload)


def call_backup_service(data: Any) -> dict[str, Any]:
    """Stub of a slower backup service that always answers."""
    _count("call_backup_service")
    return {"data": data, "status": "ok", "source": "backup"}


def expensive_operation(key: Any) -> str:
    """Stub of a slow computation: the key, upper-cased, as text."""
    _count("expensive_operation")
    return str(key).upper()


def simple_operation(data: Any) -> str:
    """Stub of the cheap, degraded variant of :func:`expensive_operation`."""
    _count("simple_operation")
    return f"simple:{data}"


def external_service_call(data: Any) -> dict[str, Any]:
    """Stub of a remote service behind a circuit breaker."""
    _count("external_service_call")
    return {"data": data, "status": "ok"}


def fetch_resource(resource_id: str) -> dict[str, Any]:
    """Stub of a REST resource read."""
    _count("fetch_resource")
    return {"id": resource_id, "kind": "resource"}


def process_data(data: Any) -> Any:
    """Stub of a processing step: returns the data with a marker."""
    _count("process_data")
    return {"processed": data}


def fetch_url(url: str) -> str:
    """Stub of an HTTP GET: the page's text."""
    _count("fetch_url")
    return f"<html>{url}</html>"


async def fetch_page(url: str) -> str:
    """Async stub of an HTTP GET."""
    await asyncio.sleep(0.001)
    return f"<html>{url}</html>"


def compute_heavy_operation(data: int) -> dict[str, int]:
    """Stub of a CPU-bound step: a sum of squares."""
    return {"input": data, "value": sum(i * i for i in range(int(data) * 100))}


def estimate_processing_time(item: int) -> int:
    """Stub: bigger items take longer."""
    return int(item)


def process_single_item(item: int) -> int:
    """Stub of a CPU-bound step on one item."""
    return int(item) * int(item)


def get_large_dataset() -> list[int]:
    """Stub: forty items of mixed sizes."""
    return [(i * 37) % 101 for i in range(40)]


async def post_results(url: str, payload: Any) -> dict[str, Any]:
    """Async stub of an HTTP POST: echoes the payload with the worker's pid."""
    await asyncio.sleep(0)
    return {"url": url, "posted": payload, "pid": os.getpid()}
