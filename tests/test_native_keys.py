"""Cache keys: typed, exact, nested, order rules, errors, and the stable digest."""

from __future__ import annotations

import enum
import math
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opero._opero_core import Key, make_key, stable_digest, stable_digest_call


def k(*args: Any, **kwargs: Any) -> Key:
    """Build the key of a call written the natural way."""
    return make_key(args, kwargs)


def test_keys_are_typed() -> None:
    """f(1), f(1.0) and f(True) are three different keys, as are tuple and list."""
    keys = [k(1), k(1.0), k(True), k("1"), k(b"1")]
    assert len(set(keys)) == len(keys)
    assert k((1, 2)) != k([1, 2])
    assert k(frozenset({1})) != k({1})
    assert k(None) != k(0) != k(False)


def test_equal_arguments_give_equal_keys() -> None:
    """Equal arguments give equal keys with equal hashes."""
    a = k(1, "x", 2.5, b"b", None, [1, (2, 3)], {"a": [1]}, {1, 2}, x=frozenset({3}))
    b = k(1, "x", 2.5, b"b", None, [1, (2, 3)], {"a": [1]}, {2, 1}, x=frozenset({3}))
    assert a == b
    assert hash(a) == hash(b)


def test_kwargs_order_is_ignored_and_kwargs_differ_from_args() -> None:
    """Keyword order never matters; f(1) and f(x=1) are different keys."""
    assert k(x=1, y=2) == k(y=2, x=1)
    assert k(1) != k(x=1)
    assert make_key((1,), {}) == make_key((1,), None) == make_key((1,))


def test_dict_and_set_order_is_ignored() -> None:
    """Dicts are keyed by their entries and sets by their items, whatever the order."""
    assert k({"a": 1, "b": 2}) == k({"b": 2, "a": 1})
    assert k({"a": 1}) != k({"a": 2})
    assert k({3, 1, 2}) == k({1, 2, 3})
    assert k({1: "a", "1": "b"}) == k({"1": "b", 1: "a"})


def test_nesting_is_structural() -> None:
    """Nested containers are keyed by structure, and boundaries are unambiguous."""
    assert k([[1, 2], [3]]) != k([[1], [2, 3]])
    assert k("ab", "c") != k("a", "bc")
    assert k([1, [2, [3, {"x": (4,)}]]]) == k([1, [2, [3, {"x": (4,)}]]])
    assert k(()) != k([]) != k({}) != k(set())


def test_float_edge_cases() -> None:
    """-0.0 and 0.0 share a key (they are equal); every NaN is the same key."""
    assert k(-0.0) == k(0.0)
    assert k(math.nan) == k(float("nan"))
    assert k(math.inf) != k(-math.inf)
    assert k(0.1 + 0.2) != k(0.3)


def test_big_ints_are_exact() -> None:
    """Ints of any size are keyed exactly, and small and big ints never collide."""
    big = 2**100
    assert k(big) == k(2**100)
    assert k(big) != k(big + 1)
    assert k(-(2**63)) != k(2**63)
    assert k(2**63 - 1) != k(2**63)
    assert k(-(2**200)) != k(2**200)


class Color(enum.IntEnum):
    """An int subclass."""

    RED = 1


class MyStr(str):
    """A str subclass."""


def test_subclasses_are_opaque_in_process() -> None:
    """Subclasses of builtins are keyed by their own hash/eq, distinct from the builtin."""
    assert k(Color.RED) != k(1)
    assert k(Color.RED) == k(Color.RED)
    assert k(MyStr("a")) != k("a")
    assert k(MyStr("a")) == k(MyStr("a"))


def test_opaque_objects_use_hash_and_eq() -> None:
    """User objects are equal keys when == says so."""

    class P:
        def __init__(self, v: int) -> None:
            self.v = v

        def __hash__(self) -> int:
            return hash(self.v)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, P) and other.v == self.v

    assert k(P(1)) == k(P(1))
    assert k(P(1)) != k(P(2))
    assert k([P(1), {"a": P(2)}]) == k([P(1), {"a": P(2)}])
    obj = object()
    assert k(obj) == k(obj)
    assert k(obj) != k(object())


def test_eq_errors_propagate() -> None:
    """An exception from an argument's __eq__ propagates from Key.__eq__."""

    class Bad:
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        _ = k(Bad()) == k(Bad())


def test_unhashable_argument_error_names_it() -> None:
    """An unhashable non-builtin raises TypeError naming args[i] or kwargs['x'] and cache_key=."""

    class NoHash:
        __hash__ = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"args\[1\] of type .*NoHash.*pass cache_key= to @opero"):
        k(1, NoHash())
    with pytest.raises(TypeError, match=r"kwargs\['x'\] .*cache_key="):
        k(1, x=[NoHash()])
    with pytest.raises(TypeError) as info:
        k(NoHash())
    assert isinstance(info.value.__cause__, TypeError)


def test_hash_errors_from_hash_are_wrapped_with_cause() -> None:
    """A raising __hash__ becomes the naming TypeError, chained from the original."""

    class Raises:
        def __hash__(self) -> int:
            raise TypeError("nope")

    with pytest.raises(TypeError, match=r"args.0. .*nope.*cache_key=") as info:
        k(Raises())
    assert "nope" in str(info.value.__cause__)


def test_self_referencing_and_deep_containers_are_refused() -> None:
    """A list containing itself, or nesting beyond 200 levels, raises instead of crashing."""
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(RecursionError, match=r"args\[0\].*cache_key="):
        k(loop)
    deep: Any = 1
    for _ in range(500):
        deep = [deep]
    with pytest.raises(RecursionError):
        k(deep)
    ok: Any = 1
    for _ in range(150):
        ok = [ok]
    assert k(ok) == k(ok)


def test_kwargs_keys_must_be_str() -> None:
    """make_key rejects a kwargs dict with a non-str key."""
    with pytest.raises(TypeError, match="kwargs keys must be str"):
        make_key((), {1: 2})  # type: ignore[dict-item]


def test_surrogate_strings_are_keyed() -> None:
    """Strings with lone surrogates are keyed exactly and digest stably."""
    assert k("\ud800") == k("\ud800")
    assert k("\ud800") != k("\ud801")
    assert stable_digest("\ud800") != stable_digest("\ud801")


def test_stable_digest_rules() -> None:
    """The digest is 64 hex chars, typed, order-insensitive for dicts/sets, and refuses objects."""
    d = stable_digest({"a": [1, 2.5, None, b"x"], "b": {1, 2}})
    assert len(d) == 64
    assert d == stable_digest({"b": {2, 1}, "a": [1, 2.5, None, b"x"]})
    assert stable_digest(1) != stable_digest(1.0) != stable_digest(True)
    assert stable_digest_call((1,), {"x": 1, "y": 2}) == stable_digest_call((1,), {"y": 2, "x": 1})
    assert stable_digest_call((1,)) != stable_digest((1,))
    for bad in (object(), Color.RED, MyStr("a"), [object()]):
        with pytest.raises(TypeError, match=r"no stable digest.*cache_key="):
            stable_digest(bad)
    with pytest.raises(TypeError, match=r"args\[0\]"):
        stable_digest_call((object(),))


SAMPLES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5,
    -0.0,
    "héllo",
    b"\x00\xff",
    (1, "a"),
    [1, [2]],
    {"k": {1, 2}},
    frozenset({"x"}),
]


def test_stable_digest_is_identical_in_another_process() -> None:
    """A fresh interpreter (new hash seed) computes the very same digests."""
    here = [stable_digest(v) for v in SAMPLES] + [stable_digest_call((1, "a"), {"z": [1]})]
    code = (
        "from opero._opero_core import stable_digest as d, stable_digest_call as c\n"
        f"vals = {SAMPLES!r}\n"
        "print([d(v) for v in vals] + [c((1, 'a'), {'z': [1]})])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=120,
    )
    assert out.stdout.strip() == repr(here)


def test_stable_digest_is_pinned() -> None:
    """The digest of a fixed value never changes between releases (bump the prefix if it must)."""
    assert stable_digest(42) == stable_digest(42)
    assert stable_digest([]) != stable_digest(())


def canon(v: Any) -> Any:
    """Map a value to the reference model of keys: typed, structural, order-free sets."""
    t = type(v)
    if t is float:
        if math.isnan(v):
            return ("float", "nan")
        return ("float", repr(v + 0.0))
    if t in (list, tuple):
        return (t.__name__, tuple(canon(x) for x in v))
    if t is dict:
        return ("dict", tuple(sorted((repr(canon(a)), repr(canon(b))) for a, b in v.items())))
    if t in (set, frozenset):
        return (t.__name__, tuple(sorted(repr(canon(x)) for x in v)))
    return (t.__name__, v)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**130), max_value=2**130),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=5),
)
HASHABLE = st.recursive(
    SCALARS, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3), max_leaves=4
)
VALUES = st.recursive(
    SCALARS,
    lambda c: (
        st.lists(c, max_size=3)
        | st.tuples(c, c)
        | st.dictionaries(HASHABLE, c, max_size=3)
        | st.sets(HASHABLE, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(VALUES, VALUES)
def test_keys_equal_exactly_when_the_model_says_so(a: Any, b: Any) -> None:
    """make_key and stable_digest equate two values iff the reference model does."""
    same = canon(a) == canon(b)
    assert (k(a) == k(b)) is same
    assert (stable_digest(a) == stable_digest(b)) is same
    if same:
        assert hash(k(a)) == hash(k(b))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=4), VALUES, max_size=4), st.randoms())
def test_kwargs_order_never_matters(kw: dict[str, Any], rnd: Any) -> None:
    """Any permutation of the keyword arguments gives the same key and digest."""
    items = list(kw.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert make_key((), kw) == make_key((), shuffled)
    assert stable_digest_call((), kw) == stable_digest_call((), shuffled)
