"""What the cache backends and the Redis rate limiter share about the services they use.

* :mod:`~opero._connections.health`: one :class:`Outage` per service (a Redis
  URL, a cache directory): warned once per outage, probed every
  ``retry_interval`` seconds while down.
* :mod:`~opero._connections.redis`: :class:`RedisConnector`, the pooled
  redis-py clients (per URL, per process, per event loop), full-pool handling
  and URL checks. It imports redis-py only when a client is made.
"""
