"""What the CLI shows: a console for tables, and progress that a person can follow both on a
terminal (rich bars) and in a redirected log (one line per stage, and one every few percent of a
long stage, with the time spent and an estimate of what remains)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from rich.console import Console

T = TypeVar("T")

# A redirected log gets a line at least every this fraction of a stage, and at most every
# MIN_LINE_SECONDS (except the last line).
LOG_STEP = 0.05
MIN_LINE_SECONDS = 2.0


def console() -> Console:
    """The CLI's console: stdout, wide enough for tables when stdout is not a terminal."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class CliProgress:
    """Progress on stderr: rich bars on a terminal, plain timed lines otherwise (``enabled=False``
    shows nothing)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, stderr=stream is None)
        self.enabled = enabled
        self.start = time.perf_counter()

    def track(
        self, items: Iterable[T], total: int | None = None, description: str = ""
    ) -> Iterator[T]:
        """Yield ``items`` while showing how far along they are."""
        if not self.enabled:
            yield from items
            return
        if self.console.is_terminal:
            from rich.progress import track

            yield from track(
                items, total=total, description=description, console=self.console, transient=True
            )
            return
        yield from self._lines(items, total, description)

    def _lines(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        begin = last = time.perf_counter()
        next_fraction = LOG_STEP
        done = 0
        steps = f" ({total} step{'s' if total != 1 else ''})" if total else ""
        self._line(f"{description}: started{steps}")
        for item in items:
            yield item
            done += 1
            now = time.perf_counter()
            if not total:
                continue
            fraction = done / total
            if done < total and (fraction < next_fraction or now - last < MIN_LINE_SECONDS):
                continue
            next_fraction = fraction + LOG_STEP
            last = now
            spent = now - begin
            left = spent / fraction - spent
            tail = "done" if done == total else f"~{_clock(left)} left"
            self._line(
                f"{description}: {done}/{total} ({fraction:.0%}), {_clock(spent)} spent, {tail}"
            )
        if not total:
            self._line(f"{description}: {done} done in {_clock(time.perf_counter() - begin)}")

    def _line(self, text: str) -> None:
        stamp = _clock(time.perf_counter() - self.start)
        self.stream.write(f"[{stamp}] {text}\n")
        self.stream.flush()
