"""Resident memory: giving freed heap back to the system between the stages of a large model."""

from __future__ import annotations

import contextlib
import ctypes


def release_free_memory() -> None:
    """Give memory freed by large arrays back to the system (glibc keeps freed heap pages for
    reuse, which shows as resident memory between the stages of a large model's run)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
