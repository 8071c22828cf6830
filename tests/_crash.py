"""A job wrapper that kills its worker process the first time it runs (tests/test_executor.py)."""

from __future__ import annotations

import os


def crash_once(marker: str, fn, *args):
    """``fn(*args)``, except on the first call anywhere (no ``marker`` file yet): then the
    process dies at once, as a worker killed mid-run."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return fn(*args)
    os.close(fd)
    os._exit(1)
