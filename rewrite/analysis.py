"""The analysis: everything expensive (statistics, whitened spectra, importances), computed once
so that ranks can be chosen again without redoing it; and the one per-target step that turns a
target's statistic into its whitened spectrum (docs/design.md sections 3-4).

Statistics live in the store (:mod:`flarc.calib.checkpoint`); spectra are derived from them per
set of whitening options (:meth:`AnalysisOptions.spectra_key`) and, in a store on disk, kept
there as well, so that a stored analysis can be re-whitened without calibrating again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from flarc.calib.moments import LazyMoments, Moments
from flarc.calib.shrinkage import Shrunk, shrink
from flarc.calib.statistics import PRECISION, CarriedInputs
from flarc.core.errors import OptionError
from flarc.core.executor import Executor, JobHints, LocalExecutor
from flarc.core.inputs import Feed
from flarc.core.progress import NoProgress, Progress
from flarc.core.store import Store
from flarc.core.targets import Skipped, Target, Weights, weight_matrix
from flarc.rewrite.spectrum import (
    Spectrum,
    compensated_svd,
    compensated_wide_svd,
    gram_route_pays,
    projected_spectrum,
    whitened_svd,
)
from flarc.rewrite.whiten import whitener

# The options a spectrum depends on (the statistics fix the rest).
SPECTRUM_OPTIONS = (
    "shrinkage",
    "centered",
    "shrinkage_lambda",
    "whiten",
    "full_rank",
    "two_sided",
    "directions",
)


# Calibration batches of the sensitivity pass. On Qwen2.5-0.5B at a 20% cut (README command,
# two label seeds) 2 gave 14.17 / 27.19 and 14.61 / 25.57 perplexity in / out of domain, 4 gave
# 14.44 / 29.42 and 13.90 / 26.27 in twice the time (48 -> 22 s), 1 gave 14.33 / 37.35.
SENSITIVITY_BATCHES = 2


@dataclass
class AnalysisOptions:
    """How statistics are gathered and whitened, and whether importances are computed."""

    shrinkage: str = "ledoit-wolf"  # ledoit-wolf | oas | none
    centered: bool = False
    shrinkage_lambda: float | None = None  # fixed intensity instead of an estimate
    whiten: str = "cholesky"  # cholesky | eig | diag | none
    precision: str = PRECISION  # the rows' type in the statistics graph (calib.statistics)
    mask_input: str | None = None
    full_rank: bool = False  # keep every singular direction, not only those below k_equiv
    fisher: str | None = None  # compute Fisher importances with this loss (auto|lm|...)
    seed: int = 0
    # K-FAC output sensitivities (calib/sensitivity.py): one backward pass over this many batches
    sensitivity: bool = True
    sensitivity_batches: int = SENSITIVITY_BATCHES
    # Truncate A^{1/2} W D^{1/2} (D: the loss gradient's diagonal second moment per output
    # channel, from the sensitivity pass) instead of A^{1/2} W; off without sensitivities.
    two_sided: bool = True
    # Shrinkage of the sensitivities' D toward its mean before two-sided whitening, (1 - a) D +
    # a mean(D): None = each target's own estimated intensity (calib/shrinkage.py), else a.
    output_shrinkage: float | None = None
    # Keep each spectrum's directions (basis and V^T up to k_equiv); without them only the
    # singular values, for ranks chosen by them alone and factors refitted in closed loop
    # (the CLI's default): no eigenvectors, no basis products, nothing large written.
    directions: bool = True

    def __post_init__(self) -> None:
        a = self.output_shrinkage
        if a is not None and not 0.0 <= a <= 1.0:  # NaN included
            raise OptionError(f"output shrinkage {self.output_shrinkage}: expected [0, 1]")

    def spectra_key(self) -> str:
        """A short name for the spectra these options give from the same statistics."""
        chosen = {k: asdict(self)[k] for k in SPECTRUM_OPTIONS}
        if self.directions:  # the keys of spectra with directions are those of older runs
            del chosen["directions"]
        if self.two_sided:  # the output weights come from these batches of the same data
            chosen["sensitivity"] = [self.sensitivity_batches, self.seed]
            if self.output_shrinkage != 0.0:  # unshrunk spectra keep the keys of older runs
                chosen["output_shrinkage"] = self.output_shrinkage
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TargetAnalysis:
    """One target's whitened spectrum and how it was whitened."""

    target: Target
    spectrum: Spectrum
    lam: float  # shrinkage intensity used
    whitening: str  # cholesky | eig | eig (fallback) | diag | none
    rows: int  # unmasked rows the statistic was computed from


# The least estimated intensity of a compensated fit. Ledoit-Wolf's rule takes rows as
# independent, but the tokens of one sequence or image are not, and the fit reaches outside the
# calibration's span: at 0.05 instead of each target's estimate (mostly 0.0003-0.02), 20% cut,
# Qwen2.5-0.5B 14.61 / 32.80 -> 14.42 / 29.36 perplexity in / out of domain, ViT-S/14 cosine
# 0.9960 -> 0.9981, MiniLM 0.9728 / 0.9261 -> 0.9726 / 0.9290; at 0.2 ViT 0.9977, MiniLM 0.9670 /
# 0.9227. Past a 20% cut a calibration set of few images wants more (--compensation-floor).
COMPENSATION_SHRINKAGE = 0.05


def analyze_target(
    target: Target,
    weight: np.ndarray,
    moments: Moments,
    options: AnalysisOptions,
    compensate: bool = False,
    output_diag: np.ndarray | None = None,
    device: str = "cpu",
    max_rank: int | None = None,
    floor: float | None = None,
) -> TargetAnalysis:
    """Shrink the statistic, whiten, and take the SVD of one target's weight (as stored), its
    directions kept up to ``max_rank`` (default: the options' rule).

    With ``compensate`` (closed loop), ``moments`` hold the compressed model's rows and their
    cross-statistic with the original's; the cross-statistic is shrunk like the Gram (same
    intensity, same target ``mu I``), so identical activations give plain whitening exactly,
    at an estimated intensity of at least ``floor`` (default ``COMPENSATION_SHRINKAGE``).
    A ``device`` other than ``cpu`` (a torch device, ``cuda``) whitens and decomposes there
    (:mod:`flarc.rewrite.device`; not with ``compensate``).
    """
    moments = moments.loaded()  # a stored Gram is read here, in the job, not by its submitter
    floor = (COMPENSATION_SHRINKAGE if floor is None else floor) if compensate else 0.0
    shrunk = shrink(moments, options.shrinkage, options.centered, options.shrinkage_lambda, floor)
    b = raw = weight_matrix(target, weight)
    root = None
    if output_diag is not None:
        # Two-sided: columns weighted by sqrt(D) before the SVD, V^T unweighted after it, so
        # the truncation minimises tr(dW^T A dW D) and s^2 sums to loss (a dead output's D is
        # floored so that its column is still represented).
        root = output_root(output_diag)
        b = b * root
    if max_rank is None and not options.directions:
        max_rank = 0
    elif max_rank is None and not options.full_rank:
        max_rank = math.ceil(target.k_equiv)
    # A tall target with H positive definite (shrunk toward a positive mu I): every whitening
    # of H gives the same SVD, read from B^T H B with no factor of H.
    spectrum = None
    if (
        b.shape[0] > b.shape[1]
        and not compensate
        and device == "cpu"
        and options.whiten in ("cholesky", "eig")
        and shrunk.lam > 0
        and shrunk.mu > 0
    ):
        full = min(b.shape) if max_rank is None else max_rank
        spectrum = projected_spectrum(b, shrunk.covariance, full)
        kind, fell_back = options.whiten, False
    if spectrum is None and device != "cpu" and not compensate:
        from flarc.rewrite.device import whitened_spectrum_torch

        spectrum, kind, fell_back = whitened_spectrum_torch(
            b, shrunk.covariance, options.whiten, target.name, max_rank, device
        )
    elif spectrum is None:
        w, fell_back = whitener(shrunk.covariance, options.whiten, target.name)
        kind = w.kind
        if compensate:
            cross = _shrunk_cross(moments, shrunk, raw.shape[0])
            if cross is None:  # taken with the original's output: C B itself
                cross_b = _shrunk_output_cross(moments, shrunk, raw)
                spectrum = compensated_svd(cross_b if root is None else cross_b * root, w, max_rank)
            elif max_rank is not None and gram_route_pays(*b.shape, max_rank):
                spectrum = compensated_wide_svd(cross, b, w, max_rank)
            else:
                spectrum = compensated_svd(cross @ b, w, max_rank)
        else:
            spectrum = whitened_svd(b, w, max_rank)
    del b, raw
    kind = "eig (fallback)" if fell_back else kind
    if root is not None:
        spectrum.vt = np.asarray(spectrum.vt) / root
    return TargetAnalysis(target, spectrum, shrunk.lam, kind, moments.count)


def output_root(output_diag: np.ndarray) -> np.ndarray:
    """Two-sided whitening's column weights ``sqrt(D)``, a dead output's ``D`` floored at 1e-6 of
    the mean so that its column is still represented."""
    d = np.asarray(output_diag, dtype=np.float64)
    return np.sqrt(np.maximum(d, max(float(d.mean()), 1e-300) * 1e-6))


def _shrunk_cross(moments: Moments, shrunk: Shrunk, n: int) -> np.ndarray | None:
    """The cross-statistic ``X_c^T X_o`` ([n, n]) shrunk like the Gram (same intensity, same
    target ``mu I``) for the compensated SVD; None where the closed loop took it with the
    original's output instead (:func:`_shrunk_output_cross`)."""
    if moments.cross.shape[1] != n:
        return None
    cross = ((1.0 - shrunk.lam) / moments.count) * moments.cross
    cross[np.diag_indices_from(cross)] += shrunk.lam * shrunk.mu
    return cross


def _shrunk_output_cross(moments: Moments, shrunk: Shrunk, raw: np.ndarray) -> np.ndarray:
    """``C B`` from ``X_c^T (X_o B)`` ([n, m]: the closed loop multiplied the original's rows by
    the raw weight first), shrunk as :func:`_shrunk_cross`; two-sided whitening then weights its
    columns."""
    return ((1.0 - shrunk.lam) / moments.count) * moments.cross + (shrunk.lam * shrunk.mu) * raw


def derive_spectra(
    targets: list[Target],
    weights: Weights,
    stats: Mapping[str, Moments],
    options: AnalysisOptions,
    store: Store,
    progress: Progress | None = None,
    source: str | None = None,
    output_diag: Mapping[str, np.ndarray] | None = None,
    executor: Executor | None = None,
    device: str = "cpu",
) -> dict[str, TargetAnalysis]:
    """The whitened spectrum of every target under ``options``.

    Each target is one job of ``executor`` (this process by default), the largest first, its
    math on ``device``; the results come back here, the one writer of the store. In a store on
    disk they are written under ``spectra/<key>/`` as they arrive (only those in flight are in
    memory), with ``source`` (a fingerprint of the statistics); spectra already there from the
    same source are read instead of computed again.
    """
    key = f"spectra/{options.spectra_key()}"
    meta = store.get_json(f"{key}/meta.json") if store.on_disk else None
    if meta is not None and source is not None and meta.get("source") == source:
        found = read_spectra(store, key, targets)
        if found is not None:
            return found
    progress = progress or NoProgress()
    executor = executor or LocalExecutor()
    if device != "cpu" and isinstance(executor, LocalExecutor):
        executor = LocalExecutor(1, executor.job_threads)  # one GPU: one job at a time
    diags = output_diag if output_diag and options.two_sided else {}
    # Local jobs read a stored Gram themselves; another executor's get it read here.
    local = isinstance(executor, LocalExecutor)
    jobs = TargetJobs(targets, weights, stats, options, diags, device, handles=local)
    done: dict[int, TargetAnalysis] = {}
    results = executor.map(
        analyze_target, jobs, jobs.hints(), gpus=1.0 if device == "cuda" else 0.0
    )
    for i, entry in progress.track(results, total=len(targets), description="whitened SVD"):
        if store.writable:
            entry.spectrum = entry.spectrum.stored(store, f"{key}/t{i}")
        done[i] = entry
    entries = {t.name: done[i] for i, t in enumerate(targets)}
    if store.on_disk and store.writable:
        store.put_json(f"{key}/meta.json", spectra_meta(entries, options, source))
    return entries


class TargetJobs(Sequence[tuple]):
    """The arguments of :func:`analyze_target` for each target, made when a job is submitted
    (a weight and its Gram, so only jobs in flight hold theirs). With ``handles`` a stored Gram
    is passed as its file's handle and read by the job (in this process: the read overlaps the
    other jobs' arithmetic instead of holding up the next submission)."""

    def __init__(
        self,
        targets: list[Target],
        weights: Weights,
        stats: Mapping[str, Moments],
        options: AnalysisOptions,
        diags: Mapping[str, np.ndarray],
        device: str,
        handles: bool = False,
    ) -> None:
        self.targets, self.weights = targets, weights
        self.stats = stats.raw() if handles and isinstance(stats, LazyMoments) else stats
        self.options, self.diags, self.device = options, diags, device

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):  # type: ignore[override]
        t = self.targets[i]
        weight = self.weights.consumed(t)
        diag = self.diags.get(t.name)
        return (t, weight, self.stats[t.stat_key], self.options, False, diag, self.device)

    def hints(self) -> list[JobHints]:
        """Cost ~ the flops of the Cholesky, ``L^T B``, the Gram and its eigendecomposition;
        memory ~ the Gram, its factor, the weight, the whitened weight and the small Gram."""
        out = []
        for t in self.targets:
            n, m, s = t.n, t.m, min(t.n, t.m)
            cost = n**3 / 3 + n * n * m + s * s * (n + m) + 4 * s**3
            out.append(JobHints(float(cost), 8 * (2 * n * n + 2 * n * m + 2 * s * s)))
        return out


def read_spectra(store: Store, key: str, targets: list[Target]) -> dict[str, TargetAnalysis] | None:
    """The spectra stored under ``key`` for exactly these targets (arrays read when used), or
    None when there are none."""
    meta = store.get_json(f"{key}/meta.json") if store.on_disk else None
    if meta is None or list(meta["entries"]) != [t.name for t in targets]:
        return None
    entries = {}
    for i, t in enumerate(targets):
        e = meta["entries"][t.name]
        spectrum = Spectrum(
            np.asarray(store.get(f"{key}/t{i}/sigma").load()),
            store.get(f"{key}/t{i}/basis"),
            store.get(f"{key}/t{i}/vt"),
        )
        entries[t.name] = TargetAnalysis(t, spectrum, e["lam"], e["whitening"], e["rows"])
    return entries


def spectra_meta(
    entries: Mapping[str, TargetAnalysis], options: AnalysisOptions, source: str | None = None
) -> dict:
    """What a stored set of spectra records besides its arrays."""
    return {
        "source": source,
        "options": {k: asdict(options)[k] for k in SPECTRUM_OPTIONS},
        "entries": {
            name: {"lam": e.lam, "whitening": e.whitening, "rows": e.rows}
            for name, e in entries.items()
        },
    }


@dataclass
class Analysis:
    """Everything expensive, computed once: ranks can be chosen again without redoing it."""

    model_sha256: str
    options: AnalysisOptions
    targets: list[Target]
    skipped: list[Skipped]
    stats: Mapping[str, Moments]  # Grams read from the store when looked up
    heldout_stats: Mapping[str, Moments]
    entries: dict[str, TargetAnalysis]
    fisher: dict[str, float] | None = None
    fisher_loss: str | None = None
    output_g2: dict[str, float] | None = None  # K-FAC: mean squared loss gradient per output
    sensitivity_loss: str | None = None
    output_diag: dict[str, np.ndarray] | None = None  # K-FAC: per output channel (two-sided)
    mask_input: str | None = None
    heldout_feeds: list[Feed] = field(default_factory=list)  # for the comparison and output guard
    probe_feeds: list[Feed] = field(default_factory=list)  # calibration batches for output criteria
    heldout_is_calibration: bool = False  # no batch could be held out
    extra: dict = field(default_factory=dict)
    store: Store | None = field(default=None, repr=False)  # where the large arrays live
    # The original's target inputs on each calibration batch, on disk (large models only).
    carried: CarriedInputs | None = field(default=None, repr=False)

    def sensitivities(self) -> dict[str, float] | None:
        """Loss per unit of each target's relative whitened error (:mod:`flarc.calib.
        sensitivity`): ``rows * sum s^2`` of two-sided spectra (already in loss units), else
        ``g2 * rows * sum s^2``; None when the analysis has no ``output_g2``."""
        if self.output_g2 is None:
            return None
        two_sided = self.options.two_sided and self.output_diag is not None
        return {
            t.name: (1.0 if two_sided else self.output_g2[t.name])
            * self.entries[t.name].rows
            * float(np.square(self.entries[t.name].spectrum.sigma).sum())
            for t in self.targets
        }

    def close(self) -> None:
        """Remove this run's temporary files: carried inputs and a temporary store (a saved
        analysis' folder stays). Nothing of the analysis is read afterwards."""
        if self.carried is not None:
            self.carried.close()
        if self.store is not None:
            self.store.close()

    @property
    def heldout_label(self) -> str:
        return "calibration (no held-out batch)" if self.heldout_is_calibration else "held-out"
