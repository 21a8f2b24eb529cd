"""The ``@opero`` call pipeline: cache → retry → fallback → rate limit → function.

Modules, outside in:

* :mod:`~opero._pipeline.options`: every option declared once (name, stage,
  default, check, doc) and the cross-option rules;
* :mod:`~opero._pipeline.policy`: the frozen per-stage policies built from it;
* :mod:`~opero._pipeline.decorate`: ``opero()`` and the one cache adapter
  (none, native memory, backend) around the uncached pipeline;
* :mod:`~opero._pipeline.singleflight`: concurrent misses compute once
  (threads and asyncio tasks);
* :mod:`~opero._pipeline.engine`: the retry/fallback/exhaustion decisions, once;
* :mod:`~opero._pipeline.sync` and :mod:`~opero._pipeline.aio`: the two drivers,
  short loops over the engine;
* :mod:`~opero._pipeline.codegen`: first-call wrappers generated with the
  function's own parameters (registered in ``linecache``);
* :mod:`~opero._pipeline.fallback` and :mod:`~opero._pipeline.callbacks`.
"""
