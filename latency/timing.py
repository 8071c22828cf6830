"""Repeat a timed call until its median is stable, and summarise the spread.

Backends supply ``run(number) -> seconds`` for ``number`` back-to-back calls (wall clock on the
CPU, CUDA events on a GPU); this module decides how many calls make one sample, how many samples
to take, and when the median has settled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TimingConfig:
    """When a measurement stops: warm-up calls, bounds on the sample count, the precision wanted of
    the median, the shortest sample and a time cap."""

    warmup: int = 5
    min_repeats: int = 15
    max_repeats: int = 200
    # Stop once the 95% confidence interval of the median is within this fraction of it.
    rel_ci: float = 0.02
    # Calls per sample grow until a sample lasts this long (timer resolution, launch jitter).
    min_sample_s: float = 2e-3
    max_number: int = 1000
    # Wall-clock ceiling per measured layer, checked only after min_repeats.
    max_seconds: float = 3.0

    @classmethod
    def quick(cls) -> TimingConfig:
        """Few repeats: tests and smoke runs, not numbers to publish."""
        return cls(warmup=1, min_repeats=3, max_repeats=5, min_sample_s=2e-4, max_seconds=0.2)


@dataclass(frozen=True)
class Stats:
    """Per-call seconds over ``repeats`` samples of ``number`` calls each."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    mean: float
    std: float
    repeats: int
    number: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else math.inf

    @classmethod
    def from_samples(cls, samples: list[float] | np.ndarray, number: int = 1) -> Stats:
        """The summary of per-call seconds ``samples``, each the mean of ``number`` calls;
        ValueError when there are none."""
        x = np.asarray(samples, dtype=np.float64)
        if x.size == 0:
            raise ValueError("no timing samples")
        p25, med, p75 = np.percentile(x, [25, 50, 75])
        return cls(
            median=float(med),
            p25=float(p25),
            p75=float(p75),
            min=float(x.min()),
            max=float(x.max()),
            mean=float(x.mean()),
            std=float(x.std()),
            repeats=int(x.size),
            number=int(number),
        )

    def to_dict(self) -> dict:
        """The statistics as plain JSON values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        """Raise ValueError unless every field is present, finite and ordered."""
        stats = cls(**{f: d[f] for f in cls.__dataclass_fields__})
        floats = (stats.median, stats.p25, stats.p75, stats.min, stats.max, stats.mean, stats.std)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in floats):
            raise ValueError("non-finite timing")
        if not (0 < stats.min <= stats.p25 <= stats.median <= stats.p75 <= stats.max):
            raise ValueError("timings out of order")
        if stats.repeats < 1 or stats.number < 1:
            raise ValueError("bad repeat counts")
        return stats


def median_ci_halfwidth(samples: list[float]) -> float:
    """Half-width of a distribution-free ~95% confidence interval of the median (order statistics)."""
    x = sorted(samples)
    n = len(x)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(math.floor(n / 2 - half), 0)
    hi = min(math.ceil(n / 2 + half), n - 1)
    return (x[hi] - x[lo]) / 2


def measure(run: Callable[[int], float], config: TimingConfig) -> Stats:
    """Warm up, size a sample, then collect samples until the median settles."""
    for _ in range(config.warmup):
        run(1)
    one = max(run(1), 1e-9)
    number = int(min(config.max_number, max(1, math.ceil(config.min_sample_s / one))))
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < config.max_repeats:
        samples.append(run(number) / number)
        if len(samples) < config.min_repeats:
            continue
        med = float(np.median(samples))
        if median_ci_halfwidth(samples) <= config.rel_ci * med:
            break
        if time.perf_counter() - start > config.max_seconds:
            break
    return Stats.from_samples(samples, number)
