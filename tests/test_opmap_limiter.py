"""The shared-memory token bucket behind @opmap's global rate limit in process modes."""

from __future__ import annotations

import multiprocessing
import pickle

import pytest

from opero._ratelimit import SharedTokenBucket


def _reserve_many(bucket: SharedTokenBucket, count: int, out: multiprocessing.Queue) -> None:
    """Reserve `count` tokens in a child process and report how many were free."""
    out.put(sum(1 for _ in range(count) if bucket.reserve() == 0.0))


def test_burst_then_waits_grow_by_the_emission_interval():
    """The first `burst` reservations are free; the next ones wait one interval more each."""
    bucket = SharedTokenBucket(rate=0.001, burst=3)
    waits = [bucket.reserve() for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 999.0 < waits[3] <= 1000.0
    assert 1999.0 < waits[4] <= 2000.0
    bucket.close()


def test_rate_argument_overrides_the_rate():
    """reserve(rate) applies the given rate (a callable rate_limit passes its value)."""
    bucket = SharedTokenBucket(rate=1000.0, burst=1)
    assert bucket.reserve(0.01) == 0.0
    assert 99.0 < bucket.reserve(0.01) <= 100.0
    bucket.close()


def test_pickled_copy_shares_the_state():
    """An unpickled copy attaches to the same state file."""
    bucket = SharedTokenBucket(rate=0.001, burst=2)
    copy = pickle.loads(pickle.dumps(bucket))
    assert copy.path == bucket.path
    assert bucket.reserve() == 0.0
    assert copy.reserve() == 0.0
    assert copy.reserve() > 0.0
    bucket.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_share_one_bucket(method):
    """Four processes reserving at once get exactly `burst` free tokens in total."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{method} is not available here")
    ctx = multiprocessing.get_context(method)
    bucket = SharedTokenBucket(rate=0.001, burst=10)
    out = ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(bucket, 8, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    free = sum(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert free == 10
    bucket.close()


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1.0, 1), (float("nan"), 1), (1.0, 0)])
def test_bad_arguments(rate, burst):
    """A rate <= 0 or NaN, or a burst < 1, is a ValueError naming the argument."""
    with pytest.raises(ValueError, match=r"rate|burst"):
        SharedTokenBucket(rate, burst)


def test_close_removes_the_file():
    """close() in the creating process removes the state file."""
    import os

    bucket = SharedTokenBucket(rate=1.0)
    bucket.reserve()
    bucket.close()
    assert not os.path.exists(bucket.path)
