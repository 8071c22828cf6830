"""Per-layer rank search (FLAR-SVD): the smallest aligned rank whose criterion passes, by bisection.

The grid is ``align, 2 align, ...`` below ``k_equiv``. A criterion maps a rank to a value and a
pass/fail; the criteria are (nearly) monotone in the rank, which is what makes bisection
valid: it returns what an exhaustive scan returns, in at most
``ceil(log2(len(grid))) + 1`` evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flarc.core.targets import Target
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.spectrum import Spectrum

CRITERIA = ("whitened", "cosine", "output")


def rank_grid(target: Target, align: int, max_rank: int | None = None) -> list[int]:
    """Aligned ranks that save parameters (``k < k_equiv``), optionally capped."""
    top = target.k_equiv if max_rank is None else min(target.k_equiv, max_rank + 1)
    return [k for k in range(align, math.ceil(top), align) if k < target.k_equiv]


@dataclass(frozen=True)
class Criterion:
    """``value(k)`` and whether it passes; ``passes`` must be monotone (False ... False True ... True)."""

    name: str
    value: Callable[[int], float]
    passes: Callable[[float], bool]


def whitened_criterion(spectrum: Spectrum, threshold: float) -> Criterion:
    """Closed-form relative output error ``sum_{i>k} s_i^2 / sum s_i^2 <= threshold``."""
    return Criterion("whitened", spectrum.error, lambda v: v <= threshold)


def weight_cosine(b: np.ndarray, spectrum: Spectrum, k: int) -> float:
    """Cosine similarity of the weight ``b`` ``[n, m]`` and the rank-``k`` product ``A C`` of
    ``spectrum``; 0.0 when either is zero."""
    a, c = spectrum.factors(k)
    bk = a @ c
    denom = np.linalg.norm(b) * np.linalg.norm(bk)
    return float(np.sum(b * bk) / denom) if denom > 0 else 0.0


def cosine_criterion(b: np.ndarray, spectrum: Spectrum, threshold: float) -> Criterion:
    """Cosine similarity of the weight and its rank-k approximation ``>= threshold``."""
    return Criterion("cosine", lambda k: weight_cosine(b, spectrum, k), lambda v: v >= threshold)


def bisect_rank(grid: list[int], criterion: Criterion) -> tuple[int | None, float | None, int]:
    """Smallest rank in ``grid`` that passes: (rank or None, its value, evaluations made)."""
    if not grid:
        return None, None, 0
    cache: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in cache:
            cache[i] = criterion.value(grid[i])
        return cache[i]

    hi = len(grid) - 1
    if not criterion.passes(value(hi)):
        return None, value(hi), len(cache)
    lo = -1  # invariant: grid[lo] fails (or lo = -1), grid[hi] passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if criterion.passes(value(mid)):
            hi = mid
        else:
            lo = mid
    return grid[hi], value(hi), len(cache)


def scan_rank(grid: list[int], criterion: Criterion) -> tuple[int | None, float | None]:
    """Exhaustive reference: the first rank in ``grid`` that passes."""
    for k in grid:
        v = criterion.value(k)
        if criterion.passes(v):
            return k, v
    return None, (criterion.value(grid[-1]) if grid else None)


def searched_choice(
    target: Target, grid: list[int], criterion: Criterion, threshold: float
) -> RankChoice:
    """The bisected rank of ``target`` on ``grid`` (:func:`bisect_rank`), or dense when no rank of
    it meets ``criterion``."""
    k, value, evals = bisect_rank(grid, criterion)
    if k is None:
        return RankChoice(
            None, f"dense: no rank below k_equiv meets {criterion.name} {threshold:g}", value
        )
    return RankChoice(k, f"bisect {criterion.name} {threshold:g} ({evals} evals)", value)
