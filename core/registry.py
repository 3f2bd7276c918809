"""Typed, decorator-based registries (methods, backbones) with "did you mean" errors."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, choices, n: int = 3) -> str:
    """`` Did you mean 'x' or 'y'?`` for the choices closest to ``name`` ('' if none is close)."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class UnknownNameError(KeyError):
    """A name that is not registered; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> object mapping filled by the ``register`` decorator."""

    def __init__(self, kind: str, name_attribute: str | None = None):
        """``name_attribute``: set this attribute of each registered object to its name, so
        the name is written once (in the decorator)."""
        self.kind = kind
        self.name_attribute = name_attribute
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are unique)."""

        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered.")
            self._entries[name] = obj
            if self.name_attribute is not None:
                setattr(obj, self.name_attribute, name)
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The object registered under ``name``, or an error naming the close matches."""
        if name not in self._entries:
            hint = did_you_mean(name, self._entries)
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self._entries))}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
