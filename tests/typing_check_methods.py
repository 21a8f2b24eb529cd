"""Type-checking fixture for @opero on methods (mypy --strict and basedpyright, never run).

Plain methods, ``@classmethod`` and ``@staticmethod`` over ``@opero`` and an
``async def`` method, reached through the class and through an instance, keep
their parameters and result. Every misuse line carries the expected ignores
(mypy ``arg-type``, pyright ``reportArgumentType``): mypy with
``warn_unused_ignores`` flags an ignore that is no longer needed, and
test_opero_typing.py strips them to see each checker report every misuse line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, assert_type

from opero import BoundOperoFunction, CacheInfo, OperoFunction, opero


class Repo:
    """One method of each kind."""

    @opero(cache=True)
    def get(self, key: int) -> str:
        """Return the key as text (a plain method: an instance binds ``self``)."""
        return str(key)

    @classmethod
    @opero(retries=2)
    def make(cls, n: int) -> Repo:
        """Build a repo (a classmethod: the class or an instance binds ``cls``)."""
        return cls()

    @staticmethod
    @opero(retries=2)
    def parse(s: str) -> int:
        """Parse a number (a staticmethod: nothing is bound)."""
        return int(s)

    @opero(retries=2)
    async def fetch(self, key: int) -> bytes:
        """Return the key as bytes (an async method)."""
        return str(key).encode()

    @opero
    def ping(self) -> bool:
        """Answer True (bare decorator, no parameter after self)."""
        return True

    def use(self) -> None:
        """Inside the class, ``self`` (typed ``Self``) binds like an instance."""
        assert_type(self.get(1), str)
        assert_type(self.make(1), Repo)
        assert_type(self.parse("1"), int)
        assert_type(type(self).make(1), Repo)
        assert_type(self.get.cache_info(), CacheInfo)

    @classmethod
    def build(cls) -> None:
        """Inside a classmethod, ``cls`` binds like the class."""
        assert_type(cls.make(1), Repo)
        assert_type(cls.parse("1"), int)
        assert_type(cls.get(cls(), 1), str)

    async def ause(self) -> bytes:
        """Awaiting ``self.fetch`` gives its result type."""
        return await self.fetch(1)


class SubRepo(Repo):
    """Inherited methods bind the subclass."""

    def use(self) -> None:
        """Through ``super()``, each kind binds as through an instance."""
        assert_type(super().get(1), str)
        assert_type(super().make(1), Repo)
        assert_type(super().parse("1"), int)


T = TypeVar("T")


class Tools:
    """Static methods whose first parameter takes any object stay unbound."""

    @staticmethod
    @opero(retries=0)
    def dump(value: object, indent: int = 0) -> str:
        """Return the value as text (first parameter ``object``)."""
        return " " * indent + str(value)

    @staticmethod
    @opero(retries=0)
    def first(*values: Any) -> Any:
        """Return the first value (only ``*args``)."""
        return values[0]

    @staticmethod
    @opero(retries=0)
    def same(value: T) -> T:
        """Return the value (a generic static method)."""
        return value


class Box(Generic[T]):
    """Methods of a generic class."""

    def __init__(self, value: T) -> None:
        """Hold one value."""
        self.value = value

    @opero(retries=0)
    def get(self) -> T:
        """Return the value (the class's type argument survives)."""
        return self.value

    @classmethod
    @opero(retries=0)
    def of(cls, value: T) -> Box[T]:
        """Build a box (called on the specialized class: ``Box[int].of``)."""
        return cls(value)


repo = Repo()
assert_type(repo.get(1), str)
assert_type(Repo.get(repo, 2), str)
unbound_get: OperoFunction[[Repo, int], str] = Repo.get
bound_get: BoundOperoFunction[[int], str] = repo.get
assert_type(Repo.get.cache_info(), CacheInfo)
assert_type(repo.get.cache_info(), CacheInfo)
repo.get.cache_clear()
cached: object = Repo.get.cache_get(repo, 1)
assert_type(Repo.make(3), Repo)
assert_type(repo.make(3), Repo)
bound_make: BoundOperoFunction[[int], Repo] = Repo.make
assert_type(Repo.make.cache_info(), CacheInfo)
assert_type(Repo.parse("1"), int)
assert_type(repo.parse("1"), int)
static_parse: OperoFunction[[str], int] = Repo.parse
static_parse_from_instance: OperoFunction[[str], int] = repo.parse
assert_type(repo.ping(), bool)
assert_type(SubRepo().get(1), str)
assert_type(SubRepo.make(1), Repo)
assert_type(SubRepo().parse("2"), int)
assert_type(Tools.dump(1, indent=2), str)
assert_type(Tools().dump(1), str)
assert_type(Tools.first(1, 2), Any)
assert_type(Tools().first(1, 2), Any)
assert_type(Tools.same(1), int)
assert_type(Tools().same("a"), str)
assert_type(Box(1).get(), int)
assert_type(Box[int].of(1), Box[int])
as_callable: Callable[[int], str] = repo.get
unbound_callable: Callable[[Repo, int], str] = Repo.get


async def use_async() -> None:
    """Awaiting the bound async method gives its result type."""
    assert_type(await repo.fetch(1), bytes)
    assert_type(await SubRepo().fetch(2), bytes)
    await repo.fetch("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


repo.get("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
Repo.get(repo, "x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
Repo.make("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
repo.make("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
Repo.parse(1)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
repo.parse(1)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
Tools().dump(1, indent="2")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
Box[int].of("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
