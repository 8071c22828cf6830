"""What flarc uses of polygraphy, in one place: its comparator's element-wise rule across
versions, and its logger kept quiet while flarc draws its own tables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence polygraphy's logger (below errors) for the duration."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.module_severity = old


def simple_compare_func(**kwargs: Any):
    """polygraphy's simple element-wise comparison (``SimpleCompareFunc`` from 0.53,
    ``CompareFunc.simple`` before)."""
    from polygraphy import comparator

    if hasattr(comparator, "SimpleCompareFunc"):
        return comparator.SimpleCompareFunc(**kwargs)
    return comparator.CompareFunc.simple(**kwargs)


def accuracy_results(accuracy) -> list:
    """``Comparator.compare_accuracy``'s result as a list of AccuracyResult (polygraphy 0.53
    returns one per compare function; older versions return one)."""
    return [accuracy] if hasattr(accuracy, "values") else list(accuracy)
