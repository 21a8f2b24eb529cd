"""Cache backends for ``@opero``: memory (native LRU/TTL store), Redis and disk."""

from opero.cache._base import MISS, CacheBackend, CacheInfo, FunctionCache

__all__ = ["MISS", "CacheBackend", "CacheInfo", "FunctionCache"]
