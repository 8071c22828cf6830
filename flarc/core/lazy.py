"""A mapping whose values are made when looked up and never kept: a large model's factors one
target at a time, not all of them at once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any


class LazyMapping(Mapping):
    """``key -> make(key)`` over fixed keys, each value made on lookup and not cached."""

    def __init__(self, keys: Iterable[str], make: Callable[[str], Any]) -> None:
        self._keys = list(keys)
        self._known = set(self._keys)
        self._make = make

    def __getitem__(self, key: str) -> Any:
        if key not in self._known:
            raise KeyError(key)
        return self._make(key)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
