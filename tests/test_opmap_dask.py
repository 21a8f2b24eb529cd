"""@opmap in dask mode, on a real distributed.LocalCluster with two worker processes."""

from __future__ import annotations

import warnings

import pytest

import opmap_helpers as h
from opero import OpmapFailureWarning, opmap
from opero.errors import RateLimitTimeout

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.dask


@pytest.fixture(scope="module")
def client():
    """Start a two-process LocalCluster and yield its client (one per module)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as dask_client,
    ):
        yield dask_client


def test_dask_map_uses_the_current_client(client):
    """A module-level map finds the current client and returns results in order."""
    assert h.d_square(range(100)) == [x * x for x in range(100)]


def test_dask_items_are_batched_into_tasks(client):
    """Items travel in a few tasks, not one task per item."""
    square = opmap(mode="dask", client=client, workers=2, chunksize=25, retries=0, progress=False)(
        h.trivial
    )
    with distributed.get_task_stream(client) as stream:
        assert square(range(100)) == list(range(1, 101))
    assert len(stream.data) == 4


def test_dask_failures_in_place(client):
    """A failed item on a Dask worker leaves its exception in its place."""
    with pytest.warns(OpmapFailureWarning, match="3 of 6 items failed"):
        results = h.d_fail_odd(range(6))
    assert results[0::2] == [0, 2, 4]
    assert all(isinstance(r, ValueError) for r in results[1::2])


def test_dask_lambda_by_value_and_unordered(client):
    """A lambda travels by value; ordered=False returns every result."""
    add = opmap(mode="dask", client=client, ordered=False, retries=0, progress=False)(
        lambda x: x + 100
    )
    assert sorted(add(range(20))) == list(range(100, 120))


def test_dask_rate_limit_shared_by_local_workers(client):
    """Workers on the client's host share one bucket: exactly `rate_burst` items get a token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpmapFailureWarning)
        results = h.d_rate_limited(range(20))
    granted = [r for r in results if not isinstance(r, BaseException)]
    assert len(granted) == 5
    assert sum(isinstance(r, RateLimitTimeout) for r in results) == 15


def test_dask_workers_bound_tasks_in_flight(client, tmp_path):
    """With workers=1 the map's tasks never overlap: starts and stops alternate in the log."""
    log = str(tmp_path / "spans")
    one_at_a_time = opmap(
        mode="dask", client=client, workers=1, chunksize=1, retries=0, progress=False
    )(h.logged_span)
    assert one_at_a_time([(log, x) for x in range(8)]) == list(range(8))
    with open(log) as handle:
        events = handle.read().split()
    assert events == ["start", "stop"] * 8


def test_dask_imap_streams_with_bounded_tasks(client):
    """A Dask imap yields in order from an endless generator and stops pulling when closed."""
    f = opmap(mode="dask", client=client, workers=2, retries=0, progress=False)(h.scaled)
    pulled = [0]

    def source():
        while True:
            yield pulled[0]
            pulled[0] += 1

    stream = f.imap(source(), scale=2)
    first = [next(stream) for _ in range(30)]
    stream.close()
    assert first == [2 * i for i in range(30)]
    seen = pulled[0]
    assert seen <= 30 + 4 * 4096
    assert sorted(f.imap(range(100), ordered=False)) == list(range(100))
    assert pulled[0] == seen
