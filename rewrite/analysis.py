"""The analysis: everything expensive (statistics, whitened spectra, importances), computed once
so that ranks can be chosen again without redoing it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flarc.calib.moments import Moments
from flarc.core.diskarray import SpillFolder
from flarc.core.inputs import Feed
from flarc.core.targets import Skipped, Target
from flarc.rewrite.spectrum import Spectrum


@dataclass
class AnalysisOptions:
    shrinkage: str = "ledoit-wolf"  # ledoit-wolf | oas | none
    centered: bool = False
    shrinkage_lambda: float | None = None  # fixed intensity instead of an estimate
    whiten: str = "cholesky"  # cholesky | eig
    precision: str = "float64"  # accumulation type inside the statistics graph
    mask_input: str | None = None
    full_rank: bool = False  # keep every singular direction, not only those below k_equiv
    fisher: str | None = (
        None  # compute Fisher importances with this loss (auto|lm|sampled|projection)
    )
    seed: int = 0


@dataclass
class TargetAnalysis:
    target: Target
    spectrum: Spectrum
    lam: float  # shrinkage intensity used
    whitening: str  # cholesky | eig | eig (fallback)
    rows: int  # unmasked rows the statistic was computed from


@dataclass
class Analysis:
    """Everything expensive, computed once: ranks can be chosen again without redoing it."""

    model_sha256: str
    options: AnalysisOptions
    targets: list[Target]
    skipped: list[Skipped]
    stats: Mapping[str, Moments]  # a dict, or LazyMoments for a large model
    heldout_stats: Mapping[str, Moments]
    entries: dict[str, TargetAnalysis]
    fisher: dict[str, float] | None = None
    fisher_loss: str | None = None
    mask_input: str | None = None
    heldout_feeds: list[Feed] = field(default_factory=list)  # for the comparison and output guard
    probe_feeds: list[Feed] = field(default_factory=list)  # calibration batches for output criteria
    heldout_is_calibration: bool = False  # no batch could be held out
    extra: dict = field(default_factory=dict)
    spill: SpillFolder | None = field(default=None, repr=False)  # where large arrays live

    @property
    def heldout_label(self) -> str:
        return "calibration (no held-out batch)" if self.heldout_is_calibration else "held-out"
