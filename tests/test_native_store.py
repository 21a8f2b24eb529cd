"""The native ``Store``: LRU order, TTL under a manual clock, counters, bad input.

The hypothesis state machines check it against ``cachetools.LRUCache`` and
``cachetools.TTLCache`` (driven by the same manual clock) as oracles.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import weakref
from typing import Any

import cachetools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from faultkit import run_scenario
from opero._opero_core import ManualClock, Store, make_key


def test_get_set_delete_and_len() -> None:
    """Values come back by key, a miss raises KeyError, delete reports presence."""
    s = Store(10)
    s.set("a", 1)
    s.set(("t", 1), [1, 2])
    assert s.get("a") == 1
    assert s["a"] == 1
    assert s.get(("t", 1)) == [1, 2]
    assert len(s) == 2
    assert "a" in s
    assert "zz" not in s
    with pytest.raises(KeyError):
        s.get("zz")
    assert s.delete("a") is True
    assert s.delete("a") is False
    assert len(s) == 1


def test_get_is_a_one_argument_method() -> None:
    """Store.get takes its key directly (METH_O), refuses other arities and foreign selves."""
    s = Store(4)
    s.set("k", 1)
    assert Store.get.__text_signature__ == "($self, key, /)"
    assert Store.get(s, "k") == s.get("k") == 1
    with pytest.raises(TypeError):
        s.get(key="k")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        s.get()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        s.get("k", "extra")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Store.get(object(), "k")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        s.get("absent")


def test_lru_eviction_order() -> None:
    """The least recently used entry is evicted first; a get refreshes recency."""
    s = Store(2)
    s.set(1, "one")
    s.set(2, "two")
    s.get(1)
    s.set(3, "three")
    assert 2 not in s
    assert 1 in s
    assert 3 in s
    hits, misses, evictions, expirations, size, max_size = s.info()
    assert (hits, misses, evictions, expirations, size, max_size) == (1, 0, 1, 0, 2, 2)


def test_counters_count_hits_and_misses() -> None:
    """Every get counts exactly one hit or one miss; clear keeps the counters."""
    s = Store(4)
    s.set("k", 1)
    s.get("k")
    for _ in range(3):
        with pytest.raises(KeyError):
            s.get("nope")
    s.clear()
    assert len(s) == 0
    assert s.info()[:2] == (1, 3)


def test_unbounded_store() -> None:
    """max_size=None never evicts."""
    s = Store(None)
    for i in range(5000):
        s.set(i, i)
    assert len(s) == 5000
    assert s.max_size is None
    assert s.info()[2] == 0


def test_ttl_expires_exactly_at_deadline() -> None:
    """An entry set at t with ttl d is returned before t+d and never at or after it."""
    clock = ManualClock(100.0)
    s = Store(10, ttl=5.0, clock=clock)
    s.set("k", "v")
    clock.advance(4.999)
    assert s.get("k") == "v"
    clock.advance(0.001)
    with pytest.raises(KeyError):
        s.get("k")
    hits, misses, _, expirations, size, _ = s.info()
    assert (hits, misses, expirations, size) == (1, 1, 1, 0)


def test_per_entry_ttl_overrides_store_ttl() -> None:
    """set(..., ttl=) gives one entry its own lifetime."""
    clock = ManualClock()
    s = Store(10, ttl=100.0, clock=clock)
    s.set("short", 1, ttl=1.0)
    s.set("long", 2)
    clock.advance(2.0)
    assert "short" not in s
    assert s.get("long") == 2
    plain = Store(10, clock=clock)
    plain.set("x", 1, ttl=0.5)
    clock.advance(0.5)
    assert "x" not in plain


def test_expired_entries_are_dropped_before_live_ones_are_evicted() -> None:
    """When full, expired entries make room before any live entry is evicted."""
    clock = ManualClock()
    s = Store(2, ttl=1.0, clock=clock)
    s.set("old", 1)
    clock.advance(0.6)
    s.set("young", 2)
    clock.advance(0.5)  # old expired, young alive
    s.set("new", 3)
    assert s.get("young") == 2
    assert s.get("new") == 3
    assert s.info()[2] == 0  # no eviction


def test_delete_of_expired_entry_reports_absent() -> None:
    """Deleting an entry whose TTL passed returns False, like a missing key."""
    clock = ManualClock()
    s = Store(ttl=1.0, clock=clock)
    s.set("k", 1)
    clock.advance(1.0)
    assert s.delete("k") is False


def test_call_keys_match_make_key() -> None:
    """get_call/set_call/delete_call use the same key as make_key, kwargs order ignored."""
    s = Store()
    s.set_call((1, "a"), {"x": 1, "y": 2}, "value")
    assert s.get_call((1, "a"), {"y": 2, "x": 1}) == "value"
    assert s.get(make_key((1, "a"), {"y": 2, "x": 1})) == "value"
    with pytest.raises(KeyError):
        s.get_call((1, "a"), {"x": 1})
    assert s.delete_call((1, "a"), {"x": 1, "y": 2}) is True
    assert len(s) == 0


def test_key_objects_and_plain_values_are_distinct_keys() -> None:
    """A Key is looked up by its own encoding, distinct from the plain value 1."""
    s = Store()
    s.set(make_key((1,)), "call")
    s.set(1, "value")
    assert s.get(make_key((1,))) == "call"
    assert s.get(1) == "value"


def test_typed_keys_in_store() -> None:
    """1, 1.0 and True are three different store keys."""
    s = Store()
    s.set(1, "int")
    s.set(1.0, "float")
    s.set(True, "bool")
    assert (s.get(1), s.get(1.0), s.get(True)) == ("int", "float", "bool")


class Opaque:
    """A user object keyed by its own __hash__/__eq__."""

    def __init__(self, v: int, store: Store | None = None) -> None:
        self.v = v
        self.store = store
        self.eq_calls = 0

    def __hash__(self) -> int:
        return hash(self.v)

    def __eq__(self, other: object) -> bool:
        self.eq_calls += 1
        if self.store is not None:
            len(self.store)  # re-enters the store from inside __eq__
        return isinstance(other, Opaque) and other.v == self.v


def test_opaque_keys_use_python_equality() -> None:
    """Equal user objects find the same entry; unequal ones with equal hashes do not."""
    s = Store()
    s.set(Opaque(1), "one")
    assert s.get(Opaque(1)) == "one"

    class Same(Opaque):
        def __hash__(self) -> int:
            return 0

    s.set(Same(1), "a")
    s.set(Same(2), "b")
    assert s.get(Same(1)) == "a"
    assert s.get(Same(2)) == "b"
    s.set(Same(1), "a2")
    assert s.get(Same(1)) == "a2"
    assert len(s) == 3


def test_eq_that_reenters_the_store_does_not_deadlock() -> None:
    """__eq__ runs outside the store's lock, so it may call the store itself."""
    s = Store()
    s.set(Opaque(1), "one")
    probe = Opaque(1, store=s)
    assert s.get(probe) == "one"
    assert s.delete(probe) is True


class Boom(Exception):
    """Raised by a hostile __eq__."""


class BadEq:
    """An object whose equality always raises."""

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        raise Boom("eq failed")


def test_exceptions_from_eq_propagate() -> None:
    """An exception raised by a key's __eq__ reaches the caller, never swallowed."""
    s = Store()
    s.set(BadEq(), 1)
    with pytest.raises(Boom):
        s.get(BadEq())


def test_unhashable_key_names_the_parameter() -> None:
    """An unhashable non-builtin key raises TypeError pointing to cache_key=."""

    class NoHash:
        __hash__ = None  # type: ignore[assignment]

    s = Store()
    with pytest.raises(TypeError, match=r"key of type '.*NoHash'.*cache_key="):
        s.set(NoHash(), 1)


def test_values_are_dropped_outside_the_lock() -> None:
    """A value whose __del__ uses the store on eviction neither deadlocks nor panics."""
    s = Store(1)
    seen: list[int] = []

    class Noisy:
        def __del__(self) -> None:
            seen.append(len(s))
            s.set("from-del", 0)

    s.set("a", Noisy())
    s.set("b", 1)  # evicts Noisy
    gc.collect()
    assert seen == [1]
    assert len(s) == 1


def test_threads_share_one_store() -> None:
    """Concurrent sets and gets from many threads keep the size bound and lose nothing live."""
    s = Store(64)
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for i in range(2000):
                s.set((base, i % 100), i)
                with contextlib.suppress(KeyError):
                    s.get((base, (i * 7) % 100))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(s) == 64
    hits, misses, _, _, size, _ = s.info()
    assert hits + misses == 8 * 2000
    assert size == 64


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"max_size": 0}, ValueError, "max_size must be an int >= 1 or None"),
        ({"max_size": -5}, ValueError, "max_size"),
        ({"max_size": 2.5}, TypeError, "max_size"),
        ({"max_size": "10"}, TypeError, "max_size"),
        ({"ttl": 0}, ValueError, "ttl must be a finite number of seconds > 0"),
        ({"ttl": -1.0}, ValueError, "ttl"),
        ({"ttl": math.nan}, ValueError, "ttl"),
        ({"ttl": math.inf}, ValueError, "ttl"),
        ({"ttl": "1"}, TypeError, "ttl"),
        ({"clock": 3}, TypeError, "clock"),
    ],
)
def test_bad_constructor_arguments(
    kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    """Each bad argument raises ValueError/TypeError naming it and the accepted range."""
    with pytest.raises(exc, match=match):
        Store(**kwargs)


def test_bad_per_entry_ttl() -> None:
    """set(..., ttl=) validates like the constructor."""
    s = Store()
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="ttl"):
            s.set("k", 1, ttl=bad)
    assert len(s) == 0


def test_properties_and_repr() -> None:
    """max_size and ttl read back; repr shows them."""
    s = Store(7, ttl=2.5)
    assert (s.max_size, s.ttl) == (7, 2.5)
    assert "max_size=7" in repr(s)
    assert Store().max_size == 1024
    assert Store().ttl is None


KEYS = st.one_of(st.integers(-3, 12), st.sampled_from(["a", "b", 1.5, (1, 2), None, True]))


def _typed(k: Any) -> Any:
    """Tag a key with its type: cachetools treats 1, 1.0 and True as one key."""
    return (type(k).__name__, k)


class LRUMachine(RuleBasedStateMachine):
    """Store(max_size) behaves like cachetools.LRUCache(max_size)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 5
        self.store = Store(self.size)
        self.model: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(self.size)

    @rule(k=KEYS, v=st.integers())
    def set(self, k: Any, v: int) -> None:
        """Store a value in both."""
        self.store.set(k, v)
        self.model[_typed(k)] = v

    @rule(k=KEYS)
    def get(self, k: Any) -> None:
        """Both return the same value or both miss."""
        try:
            want = self.model[_typed(k)]
        except KeyError:
            with pytest.raises(KeyError):
                self.store.get(k)
        else:
            assert self.store.get(k) == want

    @rule(k=KEYS)
    def delete(self, k: Any) -> None:
        """Both report the same presence."""
        present = _typed(k) in self.model
        if present:
            del self.model[_typed(k)]
        assert self.store.delete(k) is present

    @rule(k=KEYS)
    def contains(self, k: Any) -> None:
        """Membership agrees."""
        assert (k in self.store) == (_typed(k) in self.model)

    @invariant()
    def same_size(self) -> None:
        """Sizes agree after every step."""
        assert len(self.store) == len(self.model)


class TTLMachine(RuleBasedStateMachine):
    """Store(max_size, ttl) behaves like cachetools.TTLCache under one manual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(1000.0)
        self.store = Store(4, ttl=3.0, clock=self.clock)
        self.model: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(
            4, ttl=3.0, timer=self.clock.now
        )

    @rule(k=KEYS, v=st.integers())
    def set(self, k: Any, v: int) -> None:
        """Store a value in both."""
        self.store.set(k, v)
        self.model[_typed(k)] = v

    @rule(k=KEYS)
    def get(self, k: Any) -> None:
        """Both return the same value or both miss."""
        try:
            want = self.model[_typed(k)]
        except KeyError:
            with pytest.raises(KeyError):
                self.store.get(k)
        else:
            assert self.store.get(k) == want

    @rule(k=KEYS)
    def delete(self, k: Any) -> None:
        """Both report the same presence."""
        try:
            del self.model[_typed(k)]
            present = True
        except KeyError:
            present = False
        assert self.store.delete(k) is present

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.999, 3.0, 10.0]))
    def advance(self, dt: float) -> None:
        """Move the shared clock."""
        self.clock.advance(dt)

    @rule(k=KEYS)
    def contains(self, k: Any) -> None:
        """Membership agrees."""
        assert (k in self.store) == (_typed(k) in self.model)

    @invariant()
    def same_size(self) -> None:
        """Sizes agree after every step."""
        assert len(self.store) == len(self.model)


TestLRUMachine = LRUMachine.TestCase
TestLRUMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
TestTTLMachine = TTLMachine.TestCase
TestTTLMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_reference_cycles_through_values_are_collected() -> None:
    """A value that refers back to its store does not keep both alive forever."""

    class Node:
        store: Store | None = None

    s = Store()
    node = Node()
    node.store = s
    s.set("n", node)
    s.set(Opaque(3), node)
    ref = weakref.ref(node)
    del node, s
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------------------
# Batch operations on one-argument calls (get_many_items / set_many_items)

_item = st.one_of(
    st.integers(-5, 40),
    st.integers(),
    st.text(max_size=20),
    st.booleans(),
    st.floats(allow_nan=False),
    st.tuples(st.integers(0, 3), st.text(max_size=3)),
    st.lists(st.integers(0, 3), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(
    stored=st.lists(st.tuples(_item, st.integers()), max_size=30),
    probes=st.lists(_item, max_size=40),
    max_size=st.one_of(st.none(), st.integers(1, 12)),
)
def test_batch_ops_equal_single_calls(
    stored: list[tuple[Any, int]], probes: list[Any], max_size: int | None
) -> None:
    """set_many_items then get_many_items give the results and counters of set_call/get_call."""
    single, batch = Store(max_size), Store(max_size)
    for item, value in stored:
        single.set_call((item,), None, value)
    batch.set_many_items([item for item, _ in stored], [value for _, value in stored])
    sentinel = object()
    expected: list[Any] = []
    for item in probes:
        try:
            expected.append(single.get_call((item,)))
        except KeyError:
            expected.append(sentinel)
    values, hits = batch.get_many_items(probes, sentinel)
    assert values == expected
    assert hits == sum(1 for v in expected if v is not sentinel)
    assert batch.info() == single.info()
    assert len(batch) == len(single)


def test_set_many_items_survives_lists_shrunk_by_evicted_values() -> None:
    """A __del__ run by an eviction mid-batch that empties the lists stops the batch cleanly."""
    items = list(range(1000, 1600))
    values = list(range(600))

    class Shrinker:
        def __del__(self) -> None:
            items.clear()
            values.clear()

    s = Store(1)
    s.set_many_items(["doomed"], [Shrinker()])
    s.set_many_items(items, values)  # the first eviction frees Shrinker at the 256-entry flush
    assert items == []
    assert values == []
    # Items 1000..1255 were stored one after the other, then the batch stopped.
    assert s.info()[2] == 256
    assert s.get_many_items([1255, 1256]) == ([255, None], 1)


def test_get_many_items_survives_list_shrunk_by_eq() -> None:
    """An __eq__ that empties the item list mid-batch never reads past its end."""
    items: list[Any] = []

    class Opaque:
        def __hash__(self) -> int:
            return 7

        def __eq__(self, other: object) -> bool:
            items.clear()
            return isinstance(other, Opaque)

    s = Store(None)
    s.set_many_items([Opaque()], ["v"])
    items.extend([Opaque(), 1, 2, 3])
    values, hits = s.get_many_items(items, None)
    assert values == ["v"]
    assert hits == 1


def test_batch_results_are_shared_with_single_calls() -> None:
    """Item x of a batch is the call key make_key((x,)): set_call, get_call and Key agree."""
    s = Store(None)
    s.set_many_items([1, "a", [1, 2], None], ["one", "A", "list", "none"])
    assert s.get_call((1,)) == "one"
    assert s.get(make_key(([1, 2],))) == "list"
    assert 1 not in s  # the plain value 1 is another key than the call f(1)
    s.set_call(("b",), None, "B")
    assert s.get_many_items(["b", None, "zz"]) == (["B", "none", None], 2)


def test_get_many_items_takes_any_iterable() -> None:
    """A generator works as items, and misses take the default without raising."""
    s = Store(8)
    s.set_many_items((0, 2), (0, 20))
    missing = object()
    values, hits = s.get_many_items((x for x in range(4)), missing)
    assert values == [0, missing, 20, missing]
    assert hits == 2
    assert s.info()[:2] == (2, 2)


def test_batch_ttl_expiry() -> None:
    """Batch entries expire on time (store TTL and per-batch TTL) and count as misses."""
    clock = ManualClock(100.0)
    s = Store(None, ttl=10.0, clock=clock)
    s.set_many_items([1, 2], ["a", "b"])
    s.set_many_items([3], ["c"], ttl=2.0)
    assert s.get_many_items([1, 2, 3]) == (["a", "b", "c"], 3)
    clock.advance(2.0)
    assert s.get_many_items([1, 2, 3]) == (["a", "b", None], 2)
    clock.advance(8.0)
    assert s.get_many_items([1, 2, 3]) == ([None, None, None], 0)
    hits, misses, _evictions, expirations, size, _ = s.info()
    assert (hits, misses, expirations, size) == (5, 4, 3, 0)


def test_set_many_items_bad_input() -> None:
    """Unequal lengths, a bad ttl and an unkeyable item raise errors naming the problem."""
    s = Store(4)
    with pytest.raises(ValueError, match="differ in length"):
        s.set_many_items([1, 2], [1])
    with pytest.raises(ValueError, match="ttl"):
        s.set_many_items([1], [1], ttl=-1.0)
    with pytest.raises(TypeError):
        s.set_many_items([1, 2], (x for x in "ab"))  # values need a len()

    class NoHash:
        __hash__ = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"NoHash.*cache_key="):
        s.set_many_items([1, NoHash(), 3], ["a", "b", "c"])
    assert s.get_many_items([1, 3]) == (["a", None], 1)  # the items before it are stored
    with pytest.raises(TypeError, match=r"NoHash.*cache_key="):
        s.get_many_items([NoHash()])


def test_ttl_clock_keeps_running_in_a_forked_child() -> None:
    """A child forked after TTL checks began still sees entries expire: its clock is not frozen."""
    outcome = run_scenario(
        """
        import os, time
        from opero._opero_core import Store

        s = Store(8, ttl=0.05)
        s.set("warm", 1)
        s.get("warm")  # starts the clock's upkeep thread in the parent
        pid = os.fork()
        if pid == 0:
            s.set("k", 1)
            assert s.get("k") == 1
            time.sleep(0.3)
            try:
                s.get("k")
            except KeyError:
                print("child: expired", flush=True)
            else:
                print("child: STALE", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        # The fork handler stopped the upkeep thread (CPython 3.12+ would
        # otherwise warn that the process forked while multi-threaded).
        with open("/proc/self/status") as status:
            threads = [l.split()[1] for l in status if l.startswith("Threads:")]
        print("parent threads after fork:", threads[0])
        s.set("p", 1)
        time.sleep(0.3)
        print("parent: expired" if "p" not in s else "parent: STALE")
        """,
        timeout=60,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert sorted(outcome.lines()) == [
        "child: expired",
        "parent threads after fork: 1",
        "parent: expired",
    ]


def test_ttl_clock_thread_does_not_keep_the_process_alive() -> None:
    """A process that used TTLs exits at the end of its script (the upkeep thread is not joined)."""
    outcome = run_scenario(
        """
        from opero import opero

        @opero(cache=True, cache_ttl=60)
        def f(x):
            return x

        assert f(1) == f(1) == 1
        print("done")
        """,
        timeout=30,
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["done"]
