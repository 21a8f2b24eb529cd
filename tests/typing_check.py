"""Type-checking fixture for @opero (checked by mypy in test_opero_typing.py, never run).

Every ``reveal_type``-free line here must type-check; the one misuse carries an
expected ``# type: ignore[arg-type]`` that mypy (with ``warn_unused_ignores``)
would flag as unused if the decorated function lost its parameters, and the
undecorated override an expected ``# type: ignore[override]``.
"""

from __future__ import annotations

from typing import assert_type

from opero import CacheInfo, CircuitBreaker, CircuitOpenError, OperoFunction, opero


@opero(retries=3, cache=True)
def fetch(user_id: int, *, verbose: bool = False) -> str:
    """Return a user's name."""
    return str(user_id)


@opero
def bare(x: float) -> float:
    """Bare decorator use."""
    return x


@opero(retries=2)
async def afetch(url: str) -> bytes:
    """Async function."""
    return url.encode()


name: str = fetch(1, verbose=True)
assert_type(fetch(2), str)
assert_type(bare(1.0), float)
info: CacheInfo = fetch.cache_info()
fetch.cache_clear()
deleted: bool = fetch.cache_delete(1)
decorated: OperoFunction[[int], str] = opero(retries=1)(lambda x: str(x))


class Repo:
    """Methods keep their parameters after self."""

    @opero(cache=True)
    def get(self, key: int) -> str:
        """Return the key as text."""
        return str(key)


from_instance: str = Repo().get(1)
from_class: str = Repo.get(Repo(), 2)
repo_info: CacheInfo = Repo.get.cache_info()


async def use_async() -> bytes:
    """Awaiting the decorated coroutine function gives its result type."""
    return await afetch("u")


fetch("not an int")  # type: ignore[arg-type]

breaker = CircuitBreaker(failures=3, reset_after=10.0, failure_on=(ConnectionError,))


@opero(retries=2, circuit_breaker=breaker, on_circuit_open=lambda details: None)
def guarded(x: int) -> int:
    """Return x (behind a circuit breaker, the types survive)."""
    return x


assert_type(guarded(1), int)
breaker_state: str = breaker.state
breaker_failures: int = breaker.failures
open_wait: float = CircuitOpenError("open", name="x", retry_after=1.0).retry_after


class CachedRepo(Repo):
    """mypy: a decorated override of a decorated method is compatible."""

    @opero(cache=True, retries=1)
    def get(self, key: int) -> str:
        """Return the key as text, retried once."""
        return str(key)


class PlainRepo(Repo):
    """mypy: an undecorated override lacks cache_info(), as with functools.lru_cache."""

    def get(self, key: int) -> str:  # type: ignore[override]
        """Return the key as text, without opero."""
        return str(key)


bound_info: CacheInfo = Repo().get.cache_info()
