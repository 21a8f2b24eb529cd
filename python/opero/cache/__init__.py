"""Cache backends for ``@opero``: memory (native LRU/TTL store), Redis and disk.

Pass a name (``cache_backend="memory" | "redis" | "disk"``) or one of these
objects (``cache_backend=RedisBackend(client)``) to ``@opero``. The Redis and
disk backends import their client libraries only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opero.cache._base import MISS, CacheBackend, CacheInfo, FunctionCache

if TYPE_CHECKING:
    from opero._opero_core import ManualClock
    from opero.cache._disk import DiskBackend
    from opero.cache._memory import MemoryBackend
    from opero.cache._redis import RedisBackend

__all__ = [
    "MISS",
    "CacheBackend",
    "CacheInfo",
    "DiskBackend",
    "FunctionCache",
    "ManualClock",
    "MemoryBackend",
    "RedisBackend",
]

_LAZY = {
    "ManualClock": "opero._opero_core",
    "MemoryBackend": "opero.cache._memory",
    "RedisBackend": "opero.cache._redis",
    "DiskBackend": "opero.cache._disk",
}


def __getattr__(name: str) -> Any:
    """Import a backend class on first access, so ``import opero`` stays light."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'opero.cache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
