"""A small typed registry: names -> objects, strict about duplicates and helpful about typos."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to objects (classes, factories, adapters).

    Args:
        kind: what is registered, used in error messages (``"adapter"``, ``"method"``, ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under ``name``.

        Raises:
            ValueError: if ``name`` is not lower-case or is already taken.
        """
        if name != name.lower():
            raise ValueError(f"{self.kind} names are lower-case, got {name!r}")

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            ValueError: for an unknown name, listing the known ones.
        """
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
