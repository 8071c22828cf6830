"""What the CLI wrote to stderr, without its progress lines (``[h:mm:ss] stage: ...``)."""

from __future__ import annotations

import re

PROGRESS = re.compile(r"^\[\d+:\d\d:\d\d\] ")


def message_lines(err: str) -> list[str]:
    """Non-empty stderr lines that are not progress lines (errors, warnings)."""
    return [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
