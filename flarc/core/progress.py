"""Progress reporting without printing: library code takes a ``Progress`` and the CLI supplies one
that draws bars; the default draws nothing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
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
        yield from items


class RichProgress:
    """Progress bars on stderr through rich (the CLI's display)."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal

    def track(
        self, items: Iterable[T], total: int | None = None, description: str = ""
    ) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        from rich.progress import track

        yield from track(
            items, total=total, description=description, console=self.console, transient=True
        )
