"""Cache hits of calls with many keywords (the keyword lists spill past their inline room)."""

from __future__ import annotations

from typing import Any

from opero import opero

NAMES = [f"k{i:02d}" for i in range(12)]  # more than the 8 kept inline


def test_many_keywords_hit_in_any_order_through_both_call_paths() -> None:
    """A call with 12 keywords is one cache entry whatever their order, by vectorcall or tp_call."""
    calls: list[dict[str, Any]] = []

    @opero(cache=True)
    def f(a: int, **kw: int) -> int:
        calls.append(kw)
        return a + sum(kw.values())

    kw = {name: i for i, name in enumerate(NAMES)}
    assert f(1, **kw) == 1 + sum(range(12))
    reversed_kw = dict(reversed(list(kw.items())))
    assert f(1, **reversed_kw) == 1 + sum(range(12))
    assert type(f).__call__(f, 1, **reversed_kw) == 1 + sum(range(12))
    assert len(calls) == 1
    changed = dict(kw, k11=100)
    assert f(1, **changed) == 1 + sum(range(11)) + 100
    assert type(f).__call__(f, 1, **changed) == 1 + sum(range(11)) + 100
    assert len(calls) == 2
