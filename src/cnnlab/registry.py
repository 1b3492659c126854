"""`Registry`: things by name (architectures, datasets, recipes), with one error for an unknown name."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import CnnlabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in registration order; `get` of an unknown name is one CnnlabError listing the choices."""

    def __init__(self, kind: str, *, also: str = "", sort: bool = False):
        self.kind = kind  # "model": how the error names an entry
        self.also = also  # what else is accepted besides the names, e.g. "tv:NAME"
        self.sort = sort  # list the names sorted rather than as registered
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries) if self.sort else list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries[name] for name in self.names())

    def get(self, name: str) -> T:
        if name not in self._entries:
            also = f" or {self.also}" if self.also else ""
            raise CnnlabError(f"Unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}{also}.")
        return self._entries[name]
