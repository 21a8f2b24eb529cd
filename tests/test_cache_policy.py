"""cache_policy: W-TinyLFU beside LRU in the memory store (issue 14)."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from opero import opero
from opero._bench._hitratio import hit_ratio, make_traces
from opero._opero_core import ManualClock, Store, make_key
from opero.cache import MemoryBackend
from opero.errors import ConfigurationError

POLICIES = ("lru", "tinylfu")


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cache": True, "cache_policy": "lfu"}, r"cache_policy must be 'lru' or 'tinylfu'"),
        ({"cache": True, "cache_policy": None}, r"cache_policy must be 'lru' or 'tinylfu'"),
        ({"cache": True, "cache_policy": ["tinylfu"]}, r"cache_policy must be"),
        ({"cache_policy": "tinylfu"}, r"cache_policy='tinylfu'\) has no effect without cache=True"),
        (
            {"cache": True, "cache_policy": "tinylfu", "cache_max_size": None},
            r"cache_policy='tinylfu'\) needs a bound.*cache_max_size",
        ),
        (
            {"cache": True, "cache_policy": "tinylfu", "cache_backend": "redis"},
            r"cache_policy='tinylfu'\) is only used with cache_backend='memory', not 'redis'",
        ),
        (
            {"cache": True, "cache_policy": "lru", "cache_backend": "disk"},
            r"cache_policy='lru'\) is only used with cache_backend='memory', not 'disk'",
        ),
    ],
)
def test_bad_cache_policy_is_a_configuration_error(options: dict[str, Any], match: str) -> None:
    """A bad or misplaced cache_policy fails at decoration, naming the option and the fix."""
    with pytest.raises(ConfigurationError, match=match):
        opero(**options)(lambda x: x)


def test_cache_policy_with_a_foreign_backend_object_is_rejected() -> None:
    """A backend object other than MemoryBackend cannot honour cache_policy: error, not no-op."""

    class Other:
        stable_keys = False

        def open(self, **kwargs: Any) -> Any:
            raise AssertionError("never opened")

    with pytest.raises(
        ConfigurationError, match=r"cache_policy='tinylfu'.*only used with the memory"
    ):
        opero(cache=True, cache_policy="tinylfu", cache_backend=Other())(lambda x: x)


def test_cache_policy_reaches_the_store_with_a_memory_backend_object() -> None:
    """cache_policy='tinylfu' with a MemoryBackend instance opens a W-TinyLFU store."""
    backend = MemoryBackend()

    @opero(cache=True, cache_max_size=8, cache_policy="tinylfu", cache_backend=backend)
    def f(x: int) -> int:
        return x

    f(1)
    (cache,) = list(backend._opened)
    assert cache.store.policy == "tinylfu"
    assert "policy=tinylfu" in repr(cache.store)


def test_store_policy_arguments_are_checked() -> None:
    """Store(policy=...) names the parameter; tinylfu needs a bound; lru stays the default."""
    assert Store(4).policy == "lru"
    assert Store(4, policy="tinylfu").policy == "tinylfu"
    with pytest.raises(ValueError, match=r"policy must be 'lru' or 'tinylfu', got \"LFU\""):
        Store(4, policy="LFU")
    with pytest.raises(ValueError, match="max_size must be an int >= 1 with policy 'tinylfu'"):
        Store(None, policy="tinylfu")
    with pytest.raises(TypeError):
        Store(4, policy=3)  # type: ignore[arg-type]


# --- behaviour through @opero ------------------------------------------------------------------


def test_a_value_read_right_after_it_was_computed_is_a_hit() -> None:
    """Under tinylfu a burst of new keys never starves the window: each is a hit when re-read."""
    calls: list[int] = []

    @opero(cache=True, cache_max_size=50, cache_policy="tinylfu")
    def f(x: int) -> int:
        calls.append(x)
        return x * 2

    for _ in range(20):  # make a hot set popular, so the main region rejects newcomers
        for k in range(50):
            f(k)
    before = f.cache_info()
    for k in range(1000, 1500):
        assert f(k) == 2 * k
        assert f(k) == 2 * k
    after = f.cache_info()
    assert after.hits - before.hits == 500
    assert after.misses - before.misses == 500
    assert calls.count(1000) == 1
    assert after.currsize == 50


@pytest.mark.parametrize("policy", POLICIES)
def test_counters_and_helpers_work_under_both_policies(policy: str) -> None:
    """cache_info, cache_get, cache_delete and cache_clear behave the same under each policy."""

    @opero(cache=True, cache_max_size=3, cache_policy=policy)
    def f(x: int) -> int:
        return x + 100

    for k in (1, 2, 1, 3, 4, 5):
        f(k)
    info = f.cache_info()
    assert (info.hits, info.misses, info.maxsize, info.currsize) == (1, 5, 3, 3)
    assert info.evictions == 2
    assert f.cache_get(5) == 105
    assert f.cache_delete(5) is True
    with pytest.raises(KeyError):
        f.cache_get(5)
    f.cache_clear()
    assert f.cache_info().currsize == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_per_entry_ttl_expires_under_both_policies(policy: str) -> None:
    """An entry past its TTL is never served and counts one expiration, whatever the policy."""
    clock = ManualClock(0.0)

    @opero(
        cache=True,
        cache_max_size=4,
        cache_ttl=10.0,
        cache_policy=policy,
        cache_backend=MemoryBackend(clock=clock),
    )
    def f(x: int) -> list[int]:
        return [x]

    first = f(1)
    clock.advance(9.999)
    assert f(1) is first
    clock.advance(0.001)
    assert f(1) is not first
    assert f.cache_info().expirations == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_single_flight_under_both_policies(policy: str) -> None:
    """Concurrent misses on one key compute once under each policy."""
    barrier = threading.Barrier(6)
    calls: list[int] = []
    gate = threading.Event()

    @opero(cache=True, cache_max_size=16, cache_policy=policy)
    def f(x: int) -> int:
        calls.append(x)
        gate.wait(5)
        return x

    results: list[int] = []

    def worker() -> None:
        barrier.wait(5)
        results.append(f(7))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    release = threading.Timer(0.2, gate.set)  # let the waiters pile up on the first call
    release.start()
    for t in threads:
        t.join(10)
    release.cancel()
    assert results == [7] * 6
    assert calls == [7]


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_operations_respect_the_bound(policy: str) -> None:
    """set_many_items/get_many_items keep the store within max_size and count like single calls."""
    s = Store(10, policy=policy)
    items = list(range(100))
    s.set_many_items(items, [i * 3 for i in items])
    assert len(s) == 10
    values, hits = s.get_many_items(items, None)
    assert hits == sum(v is not None for v in values) == 10
    assert all(v == i * 3 for i, v in zip(items, values, strict=True) if v is not None)
    # The last item stored is in the window: it is always kept.
    assert values[-1] == 99 * 3
    hits_, misses, evictions, _, size, max_size = s.info()
    assert (hits_, misses, evictions, size, max_size) == (10, 90, 90, 10, 10)


def test_tinylfu_misses_less_than_lru_on_skewed_traces() -> None:
    """On the bench's traces (scaled down) tinylfu beats LRU and stays near the best anchor."""
    cachetools = pytest.importorskip("cachetools")
    traces = make_traces(keys=10_000, length=100_000, seed=3)
    for name, trace in traces.items():
        lru = hit_ratio(functools.lru_cache(maxsize=100), trace)
        lfu = hit_ratio(cachetools.cached(cachetools.LFUCache(100)), trace)
        tiny = hit_ratio(opero(cache=True, cache_max_size=100, cache_policy="tinylfu"), trace)
        assert tiny > lru + 0.08, (name, tiny, lru)
        assert tiny > lfu - 0.02, (name, tiny, lfu)


def test_traces_are_seeded_and_shaped_as_documented() -> None:
    """make_traces is deterministic; scan has ~20% one-off keys; shift's halves share no key."""
    a = make_traces(keys=1000, length=10_000, seed=1)
    assert a == make_traces(keys=1000, length=10_000, seed=1)
    fresh = [k for k in a["scan"] if k >= 1000]
    assert len(fresh) == len(set(fresh))
    assert 0.17 < len(fresh) / 10_000 < 0.23
    shift = a["shift"]
    assert not set(shift[:5000]) & set(shift[5000:])
    assert all(len(t) == 10_000 for t in a.values())


# --- the store's invariants under both policies ---------------------------------------------------

KEYS = st.integers(0, 15)


class PolicyMachine(RuleBasedStateMachine):
    """Any policy: never above capacity, never an expired or stale value, counters consistent."""

    policy = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(100.0)
        self.max = 4
        self.store = Store(self.max, ttl=5.0, policy=self.policy, clock=self.clock)
        # key -> (value, expiry) of the last write; the store may have dropped it since.
        self.written: dict[Any, tuple[int, float]] = {}
        self.hits = 0
        self.misses = 0
        self.new_entries = 0
        self.deleted_live = 0

    def _check_get(self, key: Any, got: Any, hit: bool) -> None:
        if hit:
            value, expiry = self.written[key]
            assert got == value
            assert self.clock.now() < expiry
            self.hits += 1
        else:
            self.misses += 1

    def _write(self, key: Any, value: int, ttl: float | None) -> None:
        if key not in self.store:
            self.new_entries += 1
        self.written[key] = (value, self.clock.now() + (ttl if ttl is not None else 5.0))

    @rule(k=KEYS, v=st.integers(), ttl=st.sampled_from([None, 1.0, 20.0]))
    def set(self, k: int, v: int, ttl: float | None) -> None:
        """Store a value (default or per-entry TTL)."""
        self._write(k, v, ttl)
        self.store.set(k, v, ttl)

    @rule(k=KEYS)
    def get(self, k: int) -> None:
        """Look a key up: a hit is the last value written, never an expired one."""
        try:
            got = self.store.get(k)
        except KeyError:
            self._check_get(k, None, False)
        else:
            self._check_get(k, got, True)

    @rule(ks=st.lists(KEYS, max_size=6))
    def get_many(self, ks: list[int]) -> None:
        """Look a batch up: values agree with the writes, hits are counted."""
        values, hits = self.store.get_many_items(ks, None)
        assert hits == sum(v is not None for v in values)
        for k, v in zip(ks, values, strict=True):
            self._check_get(make_key((k,)), v, v is not None)

    @rule(ks=st.lists(KEYS, max_size=6, unique=True), v=st.integers())
    def set_many(self, ks: list[int], v: int) -> None:
        """Store a batch of absent items under their call keys."""
        # A present item could be evicted by the batch before its own write,
        # which makes it new again: keep the accounting exact with absent items.
        ks = [k for k in ks if make_key((k,)) not in self.store]
        for k in ks:
            self._write(make_key((k,)), v + k, None)
        self.store.set_many_items(ks, [v + k for k in ks])

    @rule(k=KEYS)
    def delete(self, k: int) -> None:
        """Delete a key: True only for a live entry."""
        live = k in self.store
        assert self.store.delete(k) is live
        self.deleted_live += live

    @rule(dt=st.sampled_from([0.5, 1.0, 4.999, 5.0, 30.0]))
    def advance(self, dt: float) -> None:
        """Move the clock."""
        self.clock.advance(dt)

    @rule()
    def clear(self) -> None:
        """Clear the store: everything goes, the counters stay."""
        self.deleted_live += len(self.store)
        self.store.clear()
        assert len(self.store) == 0

    @invariant()
    def within_bounds_and_counted(self) -> None:
        """Size never exceeds max_size; hits/misses and entry accounting agree."""
        hits, misses, evictions, expirations, size, max_size = self.store.info()
        assert size == len(self.store) <= self.max == max_size
        assert (hits, misses) == (self.hits, self.misses)
        assert self.new_entries == size + evictions + expirations + self.deleted_live


class LRUPolicyMachine(PolicyMachine):
    """PolicyMachine over an LRU store."""

    policy = "lru"


class TinyLFUPolicyMachine(PolicyMachine):
    """PolicyMachine over a W-TinyLFU store."""

    policy = "tinylfu"


TestLRUPolicy = LRUPolicyMachine.TestCase
TestLRUPolicy.settings = settings(max_examples=80, stateful_step_count=60, deadline=None)
TestTinyLFUPolicy = TinyLFUPolicyMachine.TestCase
TestTinyLFUPolicy.settings = settings(max_examples=80, stateful_step_count=60, deadline=None)


def test_bench_reports_a_figure_a_loop_measured_itself(tmp_path: Any) -> None:
    """A loop returning a Figure (misses per 1,000) is reported as that figure, ratios included."""
    from opero._bench._harness import Case, Figure, Group, Impl, Settings, run_group
    from opero._bench._report import Meta, format_row, machine_info, write_plot

    def fixed(value: float) -> Any:
        return lambda stack: lambda n: Figure(value)

    group = Group(
        "fig",
        "figures",
        "misses/1k",
        lambda s: [
            Case(
                "trace",
                Impl("opero", fixed(550.0), once=True),
                [Impl("anchor", fixed(660.0), once=True)],
                targets={"anchor": 1.0},
            )
        ],
        default=False,
    )
    settings = Settings(target_ns=1_000_000, repeat=2)
    result = run_group(group, settings)
    (row,) = result.rows
    assert row.timing is not None
    assert row.timing.best_ns == 550.0
    assert row.ratio(row.anchors[0]) == pytest.approx(550 / 660)
    assert "550" in format_row(row, group.unit)
    assert "ok" in format_row(row, group.unit)
    pytest.importorskip("matplotlib")
    write_plot([result], tmp_path / "fig.png", Meta(settings, 1.0, machine_info()))
    assert (tmp_path / "fig.png").stat().st_size > 0
