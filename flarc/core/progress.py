"""Progress reporting without printing: library code takes a ``Progress`` and the CLI supplies one
that draws bars or log lines (:mod:`flarc.cli.display`); the default shows nothing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    """What library code reports progress through: :class:`NoProgress`, or the CLI's bars and log
    lines."""

    def track(
        self, items: Iterable[T], total: int | None = None, description: str = ""
    ) -> Iterable[T]:
        """Yield ``items`` while showing how far along they are."""
        ...


class NoProgress:
    """Shows nothing: the default for library calls."""

    def track(
        self, items: Iterable[T], total: int | None = None, description: str = ""
    ) -> Iterator[T]:
        """``items`` unchanged."""
        yield from items
