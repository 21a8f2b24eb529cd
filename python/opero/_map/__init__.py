"""``@opmap``: one function mapped over many items on a pool.

* :mod:`~opero._map.decorator`: ``opmap`` and the :class:`MappedFunction` it
  returns (options, caching and limits per item, results and failures).
* :mod:`~opero._map.pools`: threads, asyncio, aiomultiprocess, executors, Dask,
  and the job helpers every pool shares.
* :mod:`~opero._map.process_pool`: the reused process pool (fork, spawn,
  forkserver) that notices every dead worker.
* :mod:`~opero._map.progress`: the optional tqdm progress bar.

The errors of a map (``MapError``, ``OpmapFailureWarning``, ``WorkerDiedError``,
``WorkerStartError``) live in :mod:`opero.errors`.
"""

from opero._map.decorator import MODES, MappedFunction, opmap

__all__ = ["MODES", "MappedFunction", "opmap"]
