"""``@opmap(mode="dask", initializer=...)``: the initializer as a Dask worker plugin.

Imported only by a Dask map with an initializer (it needs ``distributed``).
The plugin is registered on the client once per map function and client;
Dask runs its ``setup`` once on every worker, and on workers that join later.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from typing import Any

from distributed import WorkerPlugin

from opero.errors import WorkerStartError

__all__ = ["InitializerPlugin", "register"]


class InitializerPlugin(WorkerPlugin):
    """Runs the pickled ``(initializer, initargs)`` once per Dask worker."""

    def __init__(self, init_blob: bytes) -> None:
        """Keep the pickled initializer and its arguments."""
        self.init_blob = init_blob

    def setup(self, worker: Any) -> None:
        """Call ``initializer(*initargs)`` on the worker."""
        initializer, initargs = pickle.loads(self.init_blob)
        initializer(*initargs)


def register(client: Any, init_blob: bytes, label: str) -> None:
    """Register the initializer on ``client``'s workers; raise WorkerStartError if it fails.

    The plugin's name is derived from the initializer and its arguments, so
    registering the same one again (another map, a new process) replaces it
    rather than piling up copies.
    """
    name = "opero-initializer-" + hashlib.sha256(init_blob).hexdigest()[:16]
    try:
        client.register_plugin(InitializerPlugin(init_blob), name=name)
    except Exception as exc:
        # Unregistered, so that a worker joining later does not fail the same way.
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)
        error = WorkerStartError(
            f"opmap {label}: the initializer raised on a Dask worker: "
            f"{type(exc).__name__}: {exc}; the map did not start"
        )
        raise error from exc
