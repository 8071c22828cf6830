"""The stages in order: targets -> statistics -> whitened spectra (the cacheable analysis) ->
ranks -> factor pairs in the graph -> checked and compared model. The CLI is a thin layer
over these functions."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from flarc.calib.data import CalibrationSet
from flarc.calib.moments import Moments
from flarc.calib.shrinkage import shrink
from flarc.calib.statistics import StatisticsSession
from flarc.compare import OutputComparison, compare_models
from flarc.errors import ModelError
from flarc.progress import NoProgress, Progress
from flarc.rewrite.ranks import RankChoice, energy_rank, ratio_rank
from flarc.rewrite.spectrum import Spectrum, whitened_svd
from flarc.rewrite.surgery import factorize
from flarc.rewrite.whiten import whitener
from flarc.targets import Skipped, Target, TargetSet, constant_tensors, weight_matrix

log = logging.getLogger(__name__)


@dataclass
class AnalysisOptions:
    shrinkage: str = "ledoit-wolf"  # ledoit-wolf | oas | none
    centered: bool = False
    shrinkage_lambda: float | None = None  # fixed intensity instead of an estimate
    whiten: str = "cholesky"  # cholesky | eig
    precision: str = "float64"  # accumulation type inside the statistics graph
    mask_input: str | None = None
    full_rank: bool = False  # keep every singular direction, not only those below k_equiv


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
    stats: dict[str, Moments]
    heldout_stats: dict[str, Moments]
    entries: dict[str, TargetAnalysis]
    fisher: dict[str, float] | None = None
    fisher_loss: str | None = None
    mask_input: str | None = None
    extra: dict = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def analyze_target(
    target: Target, weight: np.ndarray, moments: Moments, options: AnalysisOptions
) -> TargetAnalysis:
    """Shrink the statistic, whiten, and take the SVD of one target's weight."""
    shrunk = shrink(moments, options.shrinkage, options.centered, options.shrinkage_lambda)
    w, fell_back = whitener(shrunk.covariance, options.whiten, target.name)
    b = weight_matrix(target, weight)
    max_rank = None if options.full_rank else math.ceil(target.k_equiv)
    kind = "eig (fallback)" if fell_back else w.kind
    return TargetAnalysis(target, whitened_svd(b, w, max_rank), shrunk.lam, kind, moments.count)


def analyze(
    model: onnx.ModelProto,
    targets: TargetSet,
    data: CalibrationSet,
    options: AnalysisOptions | None = None,
    model_sha256: str = "",
    progress: Progress | None = None,
) -> Analysis:
    """Statistics on calibration (and held-out) data, then the whitened spectrum of every target."""
    options = options or AnalysisOptions()
    progress = progress or NoProgress()
    if not targets.targets:
        raise ModelError("no targets to analyse")
    session = StatisticsSession(
        model, targets.targets, data.calibration[0], options.mask_input, options.precision
    )
    try:
        stats = session.collect(data.calibration, progress, "calibration statistics")
        heldout = (
            session.collect(data.heldout, progress, "held-out statistics") if data.heldout else {}
        )
        mask = session.mask_input if any(p.masked for p in session.plans) else None
    finally:
        session.close()
    consts = constant_tensors(model)
    entries = {}
    for t in progress.track(
        targets.targets, total=len(targets.targets), description="whitened SVD"
    ):
        entries[t.name] = analyze_target(t, consts[t.weight], stats[t.stat_key], options)
    return Analysis(
        model_sha256,
        options,
        targets.targets,
        targets.skipped,
        stats,
        heldout,
        entries,
        mask_input=mask,
    )


RankPolicy = Callable[[Analysis], dict[str, RankChoice]]


def simple_policy(
    ratio: float | None = None, energy: float | None = None, align: int = 8
) -> RankPolicy:
    """``--ratio`` or ``--energy`` applied to every target on its own."""
    if ratio is not None and energy is not None:
        raise ValueError("give --ratio or --energy, not both")

    def choose(analysis: Analysis) -> dict[str, RankChoice]:
        out = {}
        for t in analysis.targets:
            if energy is not None:
                out[t.name] = energy_rank(t, analysis.entries[t.name].spectrum, energy, align)
            else:
                out[t.name] = ratio_rank(t, 0.8 if ratio is None else ratio, align)
        return out

    return choose


def chosen_factors(
    analysis: Analysis, ranks: dict[str, RankChoice]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        name: analysis.entries[name].spectrum.factors(choice.rank)
        for name, choice in ranks.items()
        if choice.rank is not None
    }


def heldout_error(
    analysis: Analysis, target: Target, a: np.ndarray, c: np.ndarray, weight
) -> float | None:
    """Measured ``||X (B - A C)||^2 / ||X B||^2`` on held-out rows, exact from their Gram."""
    moments = analysis.heldout_stats.get(target.stat_key)
    if moments is None:
        return None
    b = weight_matrix(target, weight)
    d = b - a @ c
    num = float(np.einsum("ij,ij->", d, moments.gram @ d))
    den = float(np.einsum("ij,ij->", b, moments.gram @ b))
    return num / den if den > 0 else None


@dataclass
class TargetRow:
    name: str
    op_type: str
    n: int
    m: int
    k_equiv: float
    rank: int | None
    params: int
    kept_params: int
    predicted_error: float | None
    heldout_error: float | None
    shrinkage: float
    whitening: str
    rows: int
    reason: str
    criterion: float | None = None
    alpha: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressResult:
    model: onnx.ModelProto
    ranks: dict[str, RankChoice]
    rows: list[TargetRow]
    comparison: list[OutputComparison]
    params_before: int  # parameters of the target weights
    params_after: int
    model_params_before: int
    model_params_after: int


def count_params(model: onnx.ModelProto) -> int:
    return int(sum(math.prod(t.dims) for t in model.graph.initializer))


def target_rows(
    analysis: Analysis, ranks: dict[str, RankChoice], model: onnx.ModelProto
) -> list[TargetRow]:
    consts = constant_tensors(model)
    rows = []
    for t in analysis.targets:
        e = analysis.entries[t.name]
        choice = ranks[t.name]
        k = choice.rank
        measured = None
        if k is not None:
            a, c = e.spectrum.factors(k)
            measured = heldout_error(analysis, t, a, c, consts[t.weight])
        rows.append(
            TargetRow(
                name=t.name,
                op_type=t.op_type,
                n=t.n,
                m=t.m,
                k_equiv=t.k_equiv,
                rank=k,
                params=t.params,
                kept_params=t.rank_params(k) if k is not None else t.params,
                predicted_error=e.spectrum.error(k) if k is not None else 0.0,
                heldout_error=measured,
                shrinkage=e.lam,
                whitening=e.whitening,
                rows=e.rows,
                reason=choice.reason,
                criterion=choice.criterion,
                alpha=(analysis.fisher or {}).get(t.name),
            )
        )
    return rows


def compress(
    model: onnx.ModelProto,
    analysis: Analysis,
    policy: RankPolicy,
    heldout: list | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Choose ranks, rewrite the graph, check it, and compare it with the original."""
    ranks = policy(analysis)
    new_model = factorize(model, analysis.targets, chosen_factors(analysis, ranks))
    try:
        onnx.checker.check_model(new_model)
    except Exception as exc:  # a rewrite bug, not bad input: say which check failed
        raise ModelError(f"compressed model fails onnx.checker: {exc}") from None
    comparison = compare_models(model, new_model, heldout) if heldout else []
    rows = target_rows(analysis, ranks, model)
    return CompressResult(
        model=new_model,
        ranks=ranks,
        rows=rows,
        comparison=comparison,
        params_before=sum(r.params for r in rows),
        params_after=sum(r.kept_params for r in rows),
        model_params_before=count_params(model),
        model_params_after=count_params(new_model),
    )
