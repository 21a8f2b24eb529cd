"""The bench's one reference token bucket and the ``benches/`` entry point over the one harness."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opero._bench._handwritten import PyTokenBucket, py_rate_limited
from opero._opero_core import ManualClock, TokenBucket

ROOT = Path(__file__).resolve().parent.parent


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(0.5, 200.0),
    burst=st.integers(1, 8),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=100),
)
def test_reference_bucket_agrees_with_the_native_bucket(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """Under one manual clock the reference bucket asks for the same waits as the native one."""
    clock = ManualClock(100.0)
    native = TokenBucket(rate, burst, clock=clock)
    reference = PyTokenBucket(rate, burst, clock=clock.now)
    for gap in gaps:
        clock.advance(gap)
        assert reference.reserve() == pytest.approx(native.reserve(), abs=1e-6)


def test_reference_bucket_burst_then_one_per_interval() -> None:
    """The reference bucket gives `burst` free tokens, then one every 1/rate seconds."""
    clock = ManualClock()
    bucket = PyTokenBucket(4.0, 2, clock=clock.now)
    assert [bucket.reserve() for _ in range(5)] == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75])
    clock.advance(10.0)
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.25])


def test_reference_bucket_threads_get_distinct_slots() -> None:
    """Reservations from eight threads under a frozen clock are all different slots."""
    bucket = PyTokenBucket(100.0, 1, clock=ManualClock().now)
    waits: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [bucket.reserve() for _ in range(50)]
        with lock:
            waits.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(round(w * 100) for w in waits) == list(range(400))


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [(0.0, 1, "rate"), (float("inf"), 1, "rate"), (float("nan"), 1, "rate"), (1.0, 0, "burst")],
)
def test_reference_bucket_rejects_bad_arguments(rate: float, burst: int, message: str) -> None:
    """A rate that is not positive and finite, or a burst below 1, is a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        PyTokenBucket(rate, burst)


def test_rate_limited_anchor_really_spaces_calls() -> None:
    """The ratelimit group's handwritten anchor sleeps between calls at a low rate."""
    import time

    f = py_rate_limited(50.0)(lambda x: x + 1)
    start = time.perf_counter()
    assert [f(i) for i in range(3)] == [1, 2, 3]
    # 3 calls at 50/s with burst 1 start at 0, 20 and 40 ms.
    assert time.perf_counter() - start >= 0.035


def _run_benches(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benches" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_benches_entry_point_is_the_bench_command() -> None:
    """``benches/run.py`` forwards to ``python -m opero bench``: same usage, same group check."""
    helped = _run_benches("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: python -m opero bench")
    refused = _run_benches("--only", "nosuch")
    assert refused.returncode == 2
    assert "unknown group nosuch" in refused.stderr
    assert sorted(p.name for p in (ROOT / "benches").glob("*.py")) == ["run.py"]
