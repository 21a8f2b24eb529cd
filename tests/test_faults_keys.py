"""Keys under hostile input: mutation while keying, order, depth, odd values (d09, d11)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faultkit import run_scenario
from opero import opero, opmap
from opero._opero_core import Key, Store, make_key, stable_digest


def k(*args: Any, **kwargs: Any) -> Key:
    """Build the key of a call written the natural way."""
    return make_key(args, kwargs)


@dataclass(frozen=True)
class Point:
    """Hashable and equal by value."""

    x: int


class Grow:
    """Hashable; hashing it adds an entry to the container that holds it."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __hash__(self) -> int:
        if isinstance(self.owner, dict):
            self.owner[len(self.owner) + 1000] = 0
        elif isinstance(self.owner, list):
            self.owner.append(0)
        else:
            self.owner.add(len(self.owner) + 1000)
        return 1


class Shrink:
    """Hashable; hashing it empties the container that holds it."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __hash__(self) -> int:
        self.owner.clear()
        return 2


def grown_dict() -> dict[Any, Any]:
    d: dict[Any, Any] = {}
    d["k"] = Grow(d)
    return d


def test_dict_growing_while_keyed_is_a_runtime_error() -> None:
    """A dict whose item's __hash__ adds to it gives RuntimeError, not a Rust panic."""
    with pytest.raises(RuntimeError, match=r"args\[0\]: dict changed size"):
        k(grown_dict())


@pytest.mark.parametrize("where", ["key", "value", "nested"])
def test_dict_shrinking_while_keyed_is_a_runtime_error(where: str) -> None:
    """A dict emptied by an item's __hash__ (as key, value or deeper) gives RuntimeError."""
    d: dict[Any, Any] = {"a": 1, "b": 2, "c": 3}
    s = Shrink(d)
    if where == "key":
        d[s] = 0
    elif where == "value":
        d["z"] = s
    else:
        d["z"] = [1, (2, s)]
    with pytest.raises(RuntimeError, match="dict changed size"):
        k(x=d)


def test_list_and_set_mutated_while_keyed_are_runtime_errors() -> None:
    """Lists and sets changed by an item's __hash__ give RuntimeError too."""
    grown: list[Any] = [1]
    grown.append(Grow(grown))
    with pytest.raises(RuntimeError, match="list changed size"):
        k(grown)
    shrunk: list[Any] = [1, 2, 3]
    shrunk.insert(0, Shrink(shrunk))
    with pytest.raises(RuntimeError, match="list changed size"):
        k(shrunk)
    s: set[Any] = {1, 2}
    s.add(Grow(s))
    with pytest.raises(RuntimeError, match="changed size"):
        k(s)


def test_mutation_errors_are_exceptions_in_store_methods() -> None:
    """Store methods that key a value report the same RuntimeError (an Exception)."""
    store = Store(max_size=8)
    for method in (store.get, store.__contains__, store.delete):
        with pytest.raises(RuntimeError):
            method(grown_dict())
    with pytest.raises(RuntimeError):
        store.set(grown_dict(), 1)
    assert len(store) == 0


def test_cached_call_with_mutating_dict_raises_an_exception() -> None:
    """@opero(cache=True) raises RuntimeError (catchable with except Exception) and stays usable."""

    @opero(cache=True, retries=0)
    def size(d: dict[Any, Any]) -> int:
        return len(d)

    with pytest.raises(RuntimeError):
        size(grown_dict())
    assert size({"a": 1}) == 1
    assert size({"a": 1}) == 1
    assert size.cache_info().hits == 1


def test_opmap_keeps_a_mutating_item_in_place() -> None:
    """In a cached thread map, the mutating item fails in its place and the others return."""

    @opmap(mode="thread", workers=2, retries=0, cache=True, progress=False)
    def size_each(d: dict[Any, Any]) -> int:
        return len(d)

    items = [{"a": 1}, {"b": 2}, grown_dict()] + [{"c": i} for i in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = size_each(items)
    assert isinstance(results[2], RuntimeError)
    assert [r for i, r in enumerate(results) if i != 2] == [1] * 7


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"a": Point(1), "b": Point(2)}, {"b": Point(2), "a": Point(1)}),
        ({Point(1): "a", Point(2): "b"}, {Point(2): "b", Point(1): "a"}),
        ({Point(1): "a", Point(2): "a"}, {Point(2): "a", Point(1): "a"}),
        ({"x": {"a": Point(1), "b": [Point(2)]}}, {"x": {"b": [Point(2)], "a": Point(1)}}),
        ({"a": 1, "b": Point(3)}, {"b": Point(3), "a": 1}),
    ],
)
def test_equal_dicts_with_objects_key_equally(first: Any, second: Any) -> None:
    """Equal dicts holding non-builtin keys or values give equal keys in any insertion order."""
    assert first == second
    assert k(first) == k(second)
    assert hash(k(first)) == hash(k(second))


def test_equal_sets_with_objects_key_equally() -> None:
    """Equal sets of non-builtin objects give equal keys whatever their iteration order."""
    items = [Point(i) for i in range(50)]
    a = set(items)
    b = set(reversed(items))
    assert k(a) == k(b)
    assert k(frozenset(a)) == k(frozenset(b))
    assert k(a) != k(frozenset(a))


class Collide:
    """Equal by value; every instance has the same hash."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Collide) and other.v == self.v


def test_order_insensitive_even_when_hashes_collide() -> None:
    """Items whose hashes all collide still match in any order, and different ones never do."""
    a = {Collide(1): 0, Collide(2): 0, Collide(3): 0}
    b = {Collide(3): 0, Collide(1): 0, Collide(2): 0}
    c = {Collide(3): 0, Collide(1): 0, Collide(4): 0}
    assert k(a) == k(b)
    assert k(a) != k(c)


def test_unordered_keys_stay_exact_and_typed() -> None:
    """Dicts with objects differ when a value differs, or only by 1 vs 1.0 vs True."""
    assert k({"a": Point(1), "b": 1}) != k({"a": Point(1), "b": 1.0})
    assert k({"a": Point(1), "b": 1}) != k({"a": Point(1), "b": True})
    assert k({"a": Point(1)}) != k({"a": Point(2)})
    assert k({"a": Point(1)}) != k({"b": Point(1)})
    assert k({Point(1)}) != k({Point(1), Point(2)})
    assert k({"a": Point(1)}) != k([("a", Point(1))])


def test_cache_hits_for_reordered_dicts_with_objects() -> None:
    """A memory-cached function hits for an equal dict of objects in another order."""
    calls = []

    @opero(cache=True, retries=0)
    def area(shape: dict[str, Point]) -> int:
        calls.append(shape)
        return len(shape)

    area({"a": Point(1), "b": Point(2)})
    area({"b": Point(2), "a": Point(1)})
    assert len(calls) == 1
    assert area.cache_info().hits == 1


def test_stable_digest_of_dicts_ignores_order_and_refuses_objects() -> None:
    """The stable digest of builtin dicts ignores order; objects inside are refused."""
    assert stable_digest({"a": 1, "b": [2, 3]}) == stable_digest({"b": [2, 3], "a": 1})
    with pytest.raises(TypeError, match="no stable digest"):
        stable_digest({"a": Point(1)})


def test_deep_nesting_is_a_recursion_error() -> None:
    """A value nested far deeper than the limit is a RecursionError, not a stack overflow."""
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError, match="nested deeper"):
        k(deep)
    deep_dict: Any = 1
    for _ in range(100_000):
        deep_dict = {"a": deep_dict}
    with pytest.raises(RecursionError):
        k(deep_dict)
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(RecursionError):
        k(cyclic)


def test_odd_values_key_without_error() -> None:
    """Huge ints, NaN, -0.0, lone surrogates and str subclasses key cleanly and exactly."""
    big = 10**5000
    assert k(big) == k(10**5000)
    assert k(big) != k(big + 1)
    assert k(-big) != k(big)
    assert k(float("nan")) == k(float("nan"))
    assert k(-0.0) == k(0.0)

    class S(str):
        pass

    assert k(S("a")) != k("a")
    assert k("\ud800") == k("\ud800")
    assert k("\ud800") != k("\ud801")
    assert k({"\ud800": S("x")}) == k({"\ud800": S("x")})


class BadEq:
    """Hashable; comparing it raises."""

    def __hash__(self) -> int:
        return 3

    def __eq__(self, other: object) -> bool:
        raise ValueError("no comparing")


def test_raising_eq_and_hash_inside_dicts_propagate() -> None:
    """A __hash__ or __eq__ that raises inside a dict gives that ordinary exception."""

    class BadHash:
        def __hash__(self) -> int:
            raise ValueError("no hashing")

    with pytest.raises(TypeError, match="cannot be used as a cache key"):
        k({"a": BadHash()})
    a, b = BadEq(), BadEq()
    with pytest.raises(ValueError, match="no comparing"):
        _ = k({"a": a}) == k({"a": b})


def test_dicts_of_objects_keep_the_callers_objects_unless_hashes_tie() -> None:
    """Keys hold the caller's objects, sorted; only colliding items become one frozenset."""
    assert repr(k({"b": Point(2), "a": Point(1)})).endswith("opaque=2>")
    assert repr(k({Collide(1): 0, Collide(2): 0})).endswith("opaque=1>")
    assert k({"a": Point(1), "b": Point(2)}) != k({"a": Point(2), "b": Point(1)})


ATOMS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from(["a", "b", "c"]),
    st.builds(Point, st.integers(0, 3)),
    st.builds(Collide, st.integers(0, 3)),
)
VALUES = st.recursive(ATOMS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.tuples(ATOMS, VALUES), max_size=6),
    other=st.lists(st.tuples(ATOMS, VALUES), max_size=6),
    seed=st.randoms(use_true_random=False),
)
def test_dict_keys_match_python_equality_in_any_order(
    items: list[tuple[Any, Any]], other: list[tuple[Any, Any]], seed: Any
) -> None:
    """Dicts of ints, strs and objects key equally exactly when they are equal, in any order."""
    a = dict(items)
    shuffled = list(a.items())
    seed.shuffle(shuffled)
    b = dict(shuffled)
    assert k(a) == k(b)
    assert hash(k(a)) == hash(k(b))
    c = dict(other)
    assert (k(a) == k(c)) == (a == c)
    assert (k(set(a)) == k(set(c))) == (set(a) == set(c))


def test_hash_that_keys_itself_is_a_recursion_error_not_a_crash() -> None:
    """A __hash__ that keys its own container again ends in RecursionError, never a crash."""
    out = run_scenario(
        """
        import sys, threading
        from opero import opero
        from opero._opero_core import make_key

        sys.setrecursionlimit(100_000)  # Python's own limit no longer protects the stack

        class Again:
            def __init__(self):
                self.d = {"x": self}
            def __hash__(self):
                make_key((self.d,))
                return 1

        @opero(cache=True, retries=0)
        def cached(d):
            return 1

        class ViaCachedCall:
            def __hash__(self):
                return cached({"y": self})

        def run(label, value):
            try:
                make_key((value,))
                print(label, "returned")
            except RecursionError as exc:
                print(label, "RecursionError", len(str(exc)) < 500)

        run("main", {"a": Again()})
        run("cached", {"a": ViaCachedCall()})
        t = threading.Thread(target=run, args=("thread", {"a": Again()}))
        t.start()
        t.join()
        """,
        timeout=60,
    )
    assert out.returncode == 0, out
    assert out.lines() == [
        "main RecursionError True",
        "cached RecursionError True",
        "thread RecursionError True",
    ], out


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_base_exceptions_from_hash_are_not_wrapped(exc: type[BaseException]) -> None:
    """A KeyboardInterrupt (or SystemExit...) raised in __hash__ reaches the caller unchanged."""

    class Interrupting:
        def __hash__(self) -> int:
            raise exc

    with pytest.raises(exc):
        k(Interrupting())
    with pytest.raises(exc):
        k({"a": [Interrupting()]})


def test_containers_mutated_by_another_thread_never_crash_keying() -> None:
    """Keying containers another thread mutates gives results or RuntimeError, never a crash."""
    out = run_scenario(
        """
        import sys, threading, time
        from opero import opero

        sys.setswitchinterval(1e-6)

        class Slow:
            def __init__(self, v):
                self.v = v
            def __hash__(self):
                time.sleep(0)  # let the mutating thread run mid-key
                return hash(self.v)
            def __eq__(self, other):
                return isinstance(other, Slow) and other.v == self.v

        @opero(cache=True, retries=0)
        def f(d, s=None, l=None):
            return len(d)

        shared = {i: Slow(i) for i in range(20)}
        sset = {Slow(i) for i in range(20)}
        slist = [Slow(i) for i in range(20)]
        stop = threading.Event()

        def mutate():
            i = 0
            while not stop.is_set():
                shared[100 + i % 5] = Slow(i)
                shared.pop(100 + (i + 2) % 5, None)
                sset.add(Slow(100 + i % 5))
                sset.discard(Slow(100 + (i + 2) % 5))
                slist.append(Slow(i))
                slist.pop(0)
                i += 1

        other = []
        def call():
            for _ in range(500):
                try:
                    f(shared, s=sset, l=slist)
                except RuntimeError:
                    pass
                except BaseException as exc:
                    other.append(repr(exc))

        threads = [threading.Thread(target=call) for _ in range(3)]
        mutator = threading.Thread(target=mutate)
        mutator.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        mutator.join()
        print("other errors:", other[:3])
        """,
        timeout=120,
    )
    assert out.returncode == 0, out
    assert out.lines()[-1] == "other errors: []", out
