"""Rank choices per target: the simple policies (``--ratio``, ``--energy``) and the rule they all
end with: ranks are multiples of ``align``, and a rank that would not save parameters
(``k >= k_equiv``) leaves the target dense."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flarc.core.errors import OptionError
from flarc.core.targets import Target
from flarc.rewrite.spectrum import Spectrum


@dataclass(frozen=True)
class RankChoice:
    """A target's rank (None: it stays dense), how it was chosen, and the criterion's value."""

    rank: int | None  # None: the target stays dense
    reason: str  # how the rank was chosen, or why the target stays dense
    criterion: float | None = None  # the value of the rule's criterion at this rank, if any


def align_up(k: float, align: int) -> int:
    """``k`` rounded up to a multiple of ``align``, and at least ``align``."""
    return max(align, math.ceil(k / align - 1e-9) * align)


def settle(target: Target, k: int, reason: str, criterion: float | None = None) -> RankChoice:
    """Keep rank ``k`` only where it saves parameters."""
    if k >= target.k_equiv:
        return RankChoice(
            None,
            f"dense: rank {k} would not save parameters (k_equiv {target.k_equiv:.1f})",
            criterion,
        )
    return RankChoice(k, reason, criterion)


def ratio_rank(target: Target, ratio: float, align: int) -> RankChoice:
    """Keep a fraction ``ratio`` of the weight's parameters: ``k (n + m) ~ ratio n m`` (SVD-LLM)."""
    if not 0 < ratio <= 1:
        raise OptionError(f"--ratio {ratio} must be in (0, 1]")
    k = align_up(ratio * target.params / (target.n + target.m), align)
    return settle(target, k, f"ratio {ratio:g}")


def energy_rank(target: Target, spectrum: Spectrum, energy: float, align: int) -> RankChoice:
    """The smallest aligned rank whose retained whitened energy is at least ``energy``."""
    if not 0 < energy <= 1:
        raise OptionError(f"--energy {energy} must be in (0, 1]")
    retained = spectrum.energy()
    k = int(next((i for i, e in enumerate(retained) if e >= energy - 1e-12), len(retained) - 1))
    k = align_up(max(k, 1), align)
    return settle(target, k, f"energy {energy:g}", float(retained[min(k, len(retained) - 1)]))
