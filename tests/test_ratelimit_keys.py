"""Per-key rate limits: ``rate_limit_key=callable(*args, **kwargs) -> str``, one bucket per key."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import tracemalloc
from typing import Any

import pytest

from opero import ConfigurationError, RateLimitTimeout
from opero import opero as op
from opero._opero_core import ManualClock
from opero._ratelimit.keyed import MAX_KEY_LENGTH, KeyedBuckets, bucket_key


def _keyed(func: Any) -> KeyedBuckets:
    """Return the key -> bucket map of a function decorated with a callable key."""
    found = [
        o
        for o in gc.get_objects()
        if isinstance(o, KeyedBuckets) and o.qualname.endswith(func.__qualname__)
    ]
    assert len(found) == 1, found
    return found[0]


def test_each_key_has_its_own_bucket() -> None:
    """Two users share nothing: each gets its own burst, and waits are per user."""
    clock = ManualClock()
    waits: list[float] = []

    @op(
        rate_limit=1.0,
        rate_burst=2,
        rate_limit_key=lambda user, item: f"user:{user}",
        retries=0,
        _rate_clock=clock,
        _sleep=waits.append,
    )
    def fetch(user: str, item: int) -> tuple[str, int]:
        return user, item

    assert [fetch("ann", i) for i in range(2)] == [("ann", 0), ("ann", 1)]
    assert [fetch("bob", i) for i in range(2)] == [("bob", 0), ("bob", 1)]
    assert waits == []  # two bursts of 2, one per user
    fetch("ann", 2)
    assert waits == [pytest.approx(1.0)]
    fetch("bob", 2)
    fetch("ann", 3)  # ann's second booked token: one interval after her first
    assert waits == [pytest.approx(1.0), pytest.approx(1.0), pytest.approx(2.0)]
    assert len(_keyed(fetch)) == 2


def test_key_function_gets_the_call_arguments_as_given() -> None:
    """The key function is called with the call's own positional and keyword arguments."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def key(*args: Any, **kwargs: Any) -> str:
        seen.append((args, kwargs))
        return "k"

    @op(rate_limit=1e9, rate_limit_key=key, retries=0)
    def f(a: int, b: int = 2, *, c: int = 3) -> int:
        return a + b + c

    def g(*args: Any, **kwargs: Any) -> int:  # not generated: the generic wrapper
        return len(args) + len(kwargs)

    wrapped = op(rate_limit=1e9, rate_limit_key=key, retries=0)(g)
    assert f(1, c=5) == 8
    assert wrapped(1, 2, z=3) == 3
    assert seen == [((1, 2), {"c": 5}), ((1, 2), {"z": 3})]


def test_async_function_books_per_key() -> None:
    """An async function waits (awaited) in the bucket of its key."""
    clock = ManualClock()
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    @op(
        rate_limit=2.0,
        rate_limit_key=lambda host: host,
        retries=0,
        _rate_clock=clock,
        _asleep=asleep,
    )
    async def get(host: str) -> str:
        return host

    async def main() -> list[str]:
        return [await get(h) for h in ("a", "b", "a", "b", "c")]

    assert asyncio.run(main()) == ["a", "b", "a", "b", "c"]
    assert waits == [pytest.approx(0.5), pytest.approx(0.5)]


def test_key_function_error_fails_the_call_at_once() -> None:
    """A raising key function: the call fails with its error, not retried, function not called."""
    calls: list[int] = []

    def key(x: int) -> str:
        raise LookupError("no tenant")

    @op(rate_limit=10, rate_limit_key=key, retries=3, min_delay=0)
    def f(x: int) -> int:
        calls.append(x)
        return x

    with pytest.raises(LookupError, match="no tenant"):
        f(1)
    assert calls == []


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ("a",)])
def test_non_str_key_is_a_type_error_naming_the_option(bad: Any) -> None:
    """A key function returning a non-str raises TypeError naming rate_limit_key."""

    @op(rate_limit=1e9, rate_limit_key=lambda x: bad, retries=2, min_delay=0)
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"rate_limit_key of .*f returned"):
        f(1)


def test_async_non_str_key_is_a_type_error() -> None:
    """The async wrapper refuses a non-str key the same way."""

    @op(rate_limit=1e9, rate_limit_key=lambda x: x, retries=0)
    async def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="rate_limit_key"):
        asyncio.run(f(1))


def test_hostile_str_subclass_is_copied_to_a_plain_str() -> None:
    """A str subclass with a raising __hash__/__eq__ is stored as a plain str copy."""

    class Hostile(str):
        def __hash__(self) -> int:
            raise RuntimeError("hash")

        def __eq__(self, other: object) -> bool:
            raise RuntimeError("eq")

    @op(rate_limit=1e9, rate_limit_key=lambda x: Hostile(f"k{x}"), retries=0)
    def f(x: int) -> int:
        return x

    assert [f(1), f(1), f(2)] == [1, 1, 2]
    assert all(type(k) is str for k in _keyed(f).buckets)
    assert sorted(_keyed(f).buckets) == ["k1", "k2"]


def test_hash_hostile_arguments_reach_only_the_key_function() -> None:
    """Unhashable arguments are fine: opero never hashes them, only the key function sees them."""

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __init__(self, name: str) -> None:
            self.name = name

    @op(rate_limit=1e9, rate_limit_key=lambda obj: obj.name, retries=0)
    def f(obj: Unhashable) -> str:
        return obj.name

    assert f(Unhashable("x")) == "x"
    assert list(_keyed(f).buckets) == ["x"]


def test_huge_keys_are_stored_as_digests() -> None:
    """Keys longer than MAX_KEY_LENGTH are stored as a short digest; distinct ones stay distinct."""
    clock = ManualClock()

    @op(
        rate_limit=1.0,
        rate_limit_key=lambda s: s,
        rate_max_wait=0,
        retries=0,
        _rate_clock=clock,
    )
    def f(s: str) -> int:
        return len(s)

    a, b = "a" * 1_000_000, "a" * 999_999 + "b"
    assert f(a) == 1_000_000
    assert f(b) == 1_000_000
    with pytest.raises(RateLimitTimeout):
        f(a)  # the same digest: the same bucket
    keys = list(_keyed(f).buckets)
    assert len(keys) == 2
    assert all(len(k) <= MAX_KEY_LENGTH for k in keys)
    assert bucket_key("x" * MAX_KEY_LENGTH, "f") == "x" * MAX_KEY_LENGTH


def test_full_buckets_are_dropped_first_past_the_bound() -> None:
    """Past the bound, a full bucket goes before an older busy one, kept with its debt."""
    clock = ManualClock()

    @op(
        rate_limit=1.0,
        rate_limit_key=lambda k: k,
        rate_limit_max_keys=3,
        rate_max_wait=1.0,
        retries=0,
        _rate_clock=clock,
        _sleep=lambda s: None,
    )
    def f(k: str) -> str:
        return k

    f("a")
    f("b")
    clock.advance(0.5)
    f("a")  # a owes a token until t = 2
    clock.advance(0.5)  # t = 1: b is full again, a is not
    f("c")
    f("d")  # the map is full: b (full) goes, the older a (busy) stays
    assert sorted(_keyed(f).buckets) == ["a", "c", "d"]
    f("a")  # a kept its debt: this token is 1 s away, the next one 2 s
    with pytest.raises(RateLimitTimeout):
        f("a")


def test_busy_buckets_evicted_only_past_the_bound_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When every bucket is busy, the oldest goes (it restarts full) and one warning says so."""
    clock = ManualClock()

    @op(
        rate_limit=0.001,
        rate_limit_key=lambda k: k,
        rate_limit_max_keys=2,
        retries=0,
        _rate_clock=clock,
    )
    def f(k: str) -> str:
        return k

    with caplog.at_level(logging.WARNING, logger="opero"):
        for k in "abcdef":
            f(k)
    assert len(_keyed(f)) == 2
    warnings = [r for r in caplog.records if "rate_limit_max_keys=2" in r.getMessage()]
    assert len(warnings) == 1


def test_a_million_keys_keep_memory_bounded() -> None:
    """200,000 distinct keys: at most rate_limit_max_keys buckets live, memory stays bounded."""

    @op(rate_limit=1e9, rate_limit_key=lambda i: f"user-{i}", rate_limit_max_keys=1000, retries=0)
    def f(i: int) -> int:
        return i

    for i in range(2000):
        f(i)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(2000, 200_000):
            f(i)
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(_keyed(f)) <= 1000
    assert now - base < 2_000_000, now - base


def test_threads_racing_on_one_key_respect_its_bucket() -> None:
    """8 threads on one key: exactly one burst is free, every other call waits its turn."""
    clock = ManualClock()
    waits: list[float] = []
    lock = threading.Lock()

    def record(seconds: float) -> None:
        with lock:
            waits.append(seconds)

    @op(
        rate_limit=10.0,
        rate_burst=4,
        rate_limit_key=lambda i: "shared",
        retries=0,
        _rate_clock=clock,
        _sleep=record,
    )
    def f(i: int) -> int:
        return i

    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        for i in range(50):
            f(i)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(_keyed(f)) == 1
    assert len(waits) == 400 - 4
    assert sorted(waits) == pytest.approx([0.1 * (i + 1) for i in range(396)])


def test_fallback_candidates_each_take_their_own_key() -> None:
    """With arg_fallback, the key is computed from each candidate's arguments (values[i:])."""
    keys: list[str] = []

    def key(hosts: list[str]) -> str:
        keys.append(hosts[0])
        return hosts[0]

    @op(rate_limit=1e9, rate_limit_key=key, arg_fallback="hosts", retries=0)
    def get(hosts: list[str]) -> str:
        if hosts[0] != "c":
            raise ConnectionError(hosts[0])
        return hosts[0]

    assert get(["a", "b", "c"]) == "c"
    assert keys == ["a", "b", "c"]


def test_retries_book_in_the_same_key() -> None:
    """Each retry takes a token in its call's bucket."""
    clock = ManualClock()
    waits: list[float] = []
    attempts: list[int] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)

    @op(
        rate_limit=1.0,
        rate_limit_key=lambda x: "k",
        retries=2,
        min_delay=0,
        max_delay=0,
        jitter=False,
        _rate_clock=clock,
        _sleep=sleep,
    )
    def f(x: int) -> int:
        attempts.append(x)
        if len(attempts) < 3:
            raise ConnectionError
        return x

    assert f(5) == 5
    assert [w for w in waits if w > 0] == [pytest.approx(1.0), pytest.approx(2.0)]


def test_callable_rate_applies_to_every_key() -> None:
    """A callable rate_limit is read per call and sets the rate of the key's bucket."""
    clock = ManualClock()
    waits: list[float] = []
    rate = {"now": 1.0}

    @op(
        rate_limit=lambda: rate["now"],
        rate_limit_key=lambda k: k,
        retries=0,
        _rate_clock=clock,
        _sleep=waits.append,
    )
    def f(k: str) -> str:
        return k

    f("a")
    f("a")
    rate["now"] = 4.0
    f("b")
    f("b")
    assert waits == [pytest.approx(1.0), pytest.approx(0.25)]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"rate_limit": 1, "rate_limit_max_keys": 10}, "only used with a callable rate_limit_key"),
        (
            {"rate_limit": 1, "rate_limit_key": "name", "rate_limit_max_keys": 10},
            "only used with a callable rate_limit_key",
        ),
        ({"rate_limit": 1, "rate_limit_key": lambda k: k, "rate_limit_max_keys": 0}, "max_keys"),
        ({"rate_limit": 1, "rate_limit_key": lambda: "k"}, "takes none"),
        ({"rate_limit": 1, "rate_limit_key": ""}, "rate_limit_key"),
        ({"rate_limit": 1, "rate_limit_key": 5}, "rate_limit_key"),
        ({"rate_limit_key": lambda k: k}, "without rate_limit"),
    ],
)
def test_bad_key_configuration(options: dict[str, Any], fragment: str) -> None:
    """Key options that make no sense fail at decoration with ConfigurationError."""
    with pytest.raises(ConfigurationError, match=fragment):
        op(**options)


def test_a_method_key_function_gets_self_first() -> None:
    """On a method, the key function receives self, then the call's arguments."""
    clock = ManualClock()

    class Client:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @op(
            rate_limit=1.0,
            rate_limit_key=lambda self, path: self.tenant,
            rate_max_wait=0,
            retries=0,
            _rate_clock=clock,
        )
        def get(self, path: str) -> str:
            return f"{self.tenant}{path}"

    a, b = Client("a"), Client("b")
    assert (a.get("/x"), b.get("/x")) == ("a/x", "b/x")
    with pytest.raises(RateLimitTimeout):
        a.get("/y")


def test_async_generic_wrapper_books_per_key() -> None:
    """An async function with *args (not generated) books in its key's bucket too."""
    clock = ManualClock()

    @op(
        rate_limit=1.0,
        rate_limit_key=lambda *args: str(args[0]),
        rate_max_wait=0,
        retries=0,
        _rate_clock=clock,
    )
    async def f(*args: int) -> int:
        return sum(args)

    async def main() -> list[int]:
        return [await f(1, 2), await f(2, 2)]

    assert asyncio.run(main()) == [3, 4]
    with pytest.raises(RateLimitTimeout):
        asyncio.run(f(1, 5))


def test_a_flood_of_busy_keys_stays_bounded_and_linear(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """50,000 new keys, all busy: the map keeps its bound and checks O(1) buckets per new key."""
    from opero._ratelimit.windows import Windows

    checks = 0
    is_full = Windows.is_full

    def counting(self: Windows) -> bool:
        nonlocal checks
        checks += 1
        return is_full(self)

    monkeypatch.setattr(Windows, "is_full", counting)

    @op(
        rate_limit=[(1, 3600.0)],
        rate_limit_key=lambda i: f"k{i}",
        rate_limit_max_keys=1000,
        retries=0,
    )
    def f(i: int) -> int:
        return i

    with caplog.at_level(logging.ERROR, logger="opero"):
        for i in range(50_000):
            f(i)
    assert len(_keyed(f)) == 1000
    # One sweep of 1,000 per 125 new keys at most: ~8 checks per key, not 1,000.
    assert checks < 20 * 50_000, checks
