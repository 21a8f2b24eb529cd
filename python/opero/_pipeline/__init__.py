"""The ``@opero`` call pipeline: cache → retry → fallback → rate limit → function.

Modules, in the order a decoration uses them:

* :mod:`~opero._pipeline.options`: every option declared once (name, stage,
  default, check, one-line doc) and the cross-option rules; the value checks
  live in :mod:`~opero._pipeline.checks`;
* :mod:`~opero._pipeline.policy`: the frozen per-stage policies built from it;
* :mod:`~opero._pipeline.decorate`: ``opero()`` and ``_decorate``, which puts
  the cache adapter around the uncached pipeline;
* :mod:`~opero._pipeline.caching`: the one cache adapter (none, native memory,
  backend), with :mod:`~opero._pipeline.singleflight` (concurrent misses
  compute once, in threads and in asyncio tasks);
* :mod:`~opero._pipeline.engine`: the retry, fallback, wait, give-up and token
  decisions, written once;
* :mod:`~opero._pipeline.sync` and :mod:`~opero._pipeline.aio`: the two
  drivers, short loops over the engine;
* :mod:`~opero._pipeline.codegen`: first-call wrappers generated with the
  function's own parameters (registered in ``linecache``);
* :mod:`~opero._pipeline.fallback` (the ``values[i:]`` candidates) and
  :mod:`~opero._pipeline.callbacks` (arity adapted once, or one
  :class:`~opero.CallDetails` from :mod:`~opero._pipeline.details`; errors
  logged);
* :mod:`~opero._pipeline.stats`: the counters behind ``f.stats()`` and
  :mod:`opero.instrumentation`.
"""
