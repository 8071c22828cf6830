"""Progress reporting without printing: library code takes a ``Progress`` and the CLI supplies one
that draws bars or log lines (:mod:`flarc.cli.display`); the default shows nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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


def step(progress: Progress | None, description: str, work: Callable[[], T]) -> T:
    """``work()`` shown as one step of its own (a start line, then its time) on ``progress``."""
    result = None
    for _ in (progress or NoProgress()).track(range(1), total=1, description=description):
        result = work()
    return result  # type: ignore[return-value]
