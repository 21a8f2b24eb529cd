"""The rate-limit stage of ``@opero``: one token before every real call.

* :mod:`~opero._ratelimit.local`: the :class:`Limiter` each decorated function
  builds, over a native ``TokenBucket`` (per function, or shared process-wide
  by ``rate_limit_key``), a Redis limiter, or an ``@opmap`` shared limiter.
* :mod:`~opero._ratelimit.keyed`: one bucket per key of a callable
  ``rate_limit_key``, in a bounded map.
* :mod:`~opero._ratelimit.windows`: several sliding windows booked at once
  (``rate_limit=[(calls, seconds), ...]``).
* :mod:`~opero._ratelimit.shared_memory`: a bucket in shared memory, one for
  every worker process of an ``@opmap``.
* :mod:`~opero._ratelimit.redis`: GCRA in Redis, shared by processes and hosts
  (``rate_limit_backend="redis"``; imported only then, as it needs redis-py).
"""

from opero._ratelimit.local import MIN_WAIT, Limiter, shared_bucket
from opero._ratelimit.shared_memory import SharedTokenBucket

__all__ = ["MIN_WAIT", "Limiter", "SharedTokenBucket", "shared_bucket"]
