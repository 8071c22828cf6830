"""From rank options to a rank per target: one function that knows every rule.

Rules: ``ratio`` / ``energy`` (each target alone), ``bisect`` with a criterion (FLAR-SVD),
``fisher`` and ``global`` allocation under a budget (FLRC, flarc). With a latency model, a rank
whose predicted ``lat_recov`` exceeds ``max_lat_recov`` is never kept: the search only looks at
ranks that pass, and a rank another rule chose that does not pass leaves its target dense, so a
target that cannot be both accurate and faster stays dense. Under ``latency_budget`` the cost
the global allocation spends is the predicted time itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from flarc.core.errors import OptionError
from flarc.core.inputs import Feed
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target, Weights
from flarc.rewrite.allocate import fisher_ranks, global_ranks, parameter_cost
from flarc.rewrite.analysis import Analysis
from flarc.rewrite.output_error import OutputErrorProbe
from flarc.rewrite.ranks import RankChoice, align_up, energy_rank, ratio_rank
from flarc.rewrite.search import (
    Criterion,
    cosine_criterion,
    rank_grid,
    searched_choice,
    whitened_criterion,
)

log = logging.getLogger(__name__)


@dataclass
class RankOptions:
    """How ranks are chosen: one rule and its settings, applied by :func:`choose_ranks`
    (``allocate``, else ``search``, else ``energy``, else ``ratio``; with none of them, the
    default: ``global`` allocation under ``budget`` (0.8 when unset) weighted by the analysis's
    K-FAC sensitivities), plus an
    optional latency model (``latency``) with its per-pair limit ``max_lat_recov``
    (``lat_recov``) and its time budget ``latency_budget``."""

    ratio: float | None = None
    energy: float | None = None
    align: int = 8
    search: str | None = None  # "bisect"
    criterion: str = "whitened"  # whitened | cosine | output
    threshold: float | str | None = None  # a number, or "auto" (output criterion)
    allocate: str | None = None  # fisher | global
    budget: float | None = None  # fraction of the targets' parameters kept
    fisher_weighted: bool = False  # global: weight each target's error by its Fisher alpha
    output_weighted: bool = (
        False  # global: weight each target's error by its measured output sensitivity
    )
    # global: weight each target's error by its K-FAC loss sensitivity (when the analysis has them
    # and no other weighting is asked for)
    kfac_weighted: bool = True
    latency: Any = None  # a flarc.latency.model.LatencyModel
    max_lat_recov: float = 1.0
    latency_budget: float | None = None  # global: fraction of the targets' dense time
    output_batches: int = 2  # calibration batches the output criterion runs on
    output_metric: str = "mse"  # mse (normalised squared error) | kl (softmax of *logits*)

    @property
    def reads_factors(self) -> bool:
        """Whether choosing ranks by these options reads the spectra's factors (measured output
        or weight errors of rank-k products), not only their singular values."""
        if self.allocate is None and self.search == "bisect":
            return self.criterion != "whitened" or self.threshold == "auto"
        rule = self.allocate or self.search or self.energy is not None or self.ratio is not None
        return (self.allocate == "global" or not rule) and self.output_weighted


def _fast_enough(opts: RankOptions, target: Target, k: int) -> bool:
    return opts.latency is None or opts.latency.lat_recov(target, k) <= opts.max_lat_recov


def allowed_grid(target: Target, opts: RankOptions) -> list[int]:
    """Aligned ranks below k_equiv whose predicted latency is not above the dense layer's."""
    return [k for k in rank_grid(target, opts.align) if _fast_enough(opts, target, k)]


def _latency_checked(target: Target, choice: RankChoice, opts: RankOptions) -> RankChoice:
    if choice.rank is None or _fast_enough(opts, target, choice.rank):
        return choice
    lat = opts.latency.lat_recov(target, choice.rank)
    return RankChoice(
        None, f"dense: rank {choice.rank} is not faster (lat_recov {lat:.2f})", choice.criterion
    )


def _output_probe(
    model, analysis: Analysis, feeds: list[Feed], opts: RankOptions
) -> OutputErrorProbe:
    return OutputErrorProbe(
        model,
        analysis.targets,
        feeds[: max(1, opts.output_batches)],
        opts.output_metric,
        analysis.mask_input,
    )


def _criterion(
    name: str, target: Target, analysis: Analysis, b, threshold: float, probe
) -> Criterion:
    spectrum = analysis.entries[target.name].spectrum
    if name == "whitened":
        return whitened_criterion(spectrum, threshold)
    if name == "cosine":
        return cosine_criterion(b, spectrum, threshold)
    if name == "output":

        def value(k: int) -> float:
            a, c = spectrum.factors(k)
            return probe.error({target.name: a @ c})

        return Criterion("output", value, lambda v: v <= threshold)
    raise OptionError(f"unknown criterion '{name}' (whitened, cosine or output)")


def auto_threshold(analysis: Analysis, probe: OutputErrorProbe, budget: float, align: int) -> float:
    """FLAR-SVD: output error of the uniformly compressed model at the budget, per target."""
    replaced = {}
    for t in analysis.targets:
        choice = ratio_rank(t, budget, align)
        if choice.rank is not None:
            a, c = analysis.entries[t.name].spectrum.factors(choice.rank)
            replaced[t.name] = a @ c
    return probe.error(replaced) / max(1, len(analysis.targets))


def rescale_to_budget(
    targets: list[Target], ranks: dict[str, RankChoice], budget: float, opts: RankOptions
) -> dict[str, RankChoice]:
    """Scale all searched ranks by one factor so the parameter count lands on the budget."""
    limit = budget * sum(t.params for t in targets)
    grids = {t.name: allowed_grid(t, opts) for t in targets}

    def ranks_at(s: float) -> dict[str, int | None]:
        out = {}
        for t in targets:
            k0, grid = ranks[t.name].rank, grids[t.name]
            base = k0 if k0 is not None else (grid[-1] if grid else None)
            if base is None or not grid:
                out[t.name] = None
                continue
            k = align_up(s * base, opts.align)
            out[t.name] = None if k > grid[-1] else max(k, grid[0])
        return out

    def params(r: dict[str, int | None]) -> int:
        return sum(t.params if r[t.name] is None else t.rank_params(r[t.name]) for t in targets)

    lo, hi = 0.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(ranks_at(mid)) <= limit else (lo, mid)
    final = ranks_at(lo)
    return {
        t.name: RankChoice(
            final[t.name],
            f"{ranks[t.name].reason}, rescaled x{lo:.2f} to budget {budget:g}",
            ranks[t.name].criterion,
        )
        if final[t.name] is not None
        else RankChoice(None, "dense after rescaling to the budget", ranks[t.name].criterion)
        for t in targets
    }


def output_sensitivity(
    analysis: Analysis,
    model,
    feeds: list[Feed],
    budget: float,
    opts: RankOptions,
    progress: Progress | None = None,
) -> dict[str, float]:
    """How much end-output error one unit of a target's whitened error causes: the output error
    with only that target at the uniform rank of ``budget``, over its whitened error there
    (one probe evaluation per target, all in one onnxruntime session)."""
    probe = _output_probe(model, analysis, feeds, opts)
    try:
        out = {}
        targets = analysis.targets
        for t in (progress or NoProgress()).track(targets, len(targets), "output sensitivity"):
            grid = rank_grid(t, opts.align)
            if not grid:
                out[t.name] = 1.0
                continue
            k = ratio_rank(t, budget, opts.align).rank or grid[-1]
            spectrum = analysis.entries[t.name].spectrum
            a, c = spectrum.factors(k)
            out[t.name] = probe.error({t.name: a @ c}) / max(spectrum.error(k), 1e-30)
        return out
    finally:
        probe.close()


def choose_ranks(
    analysis: Analysis,
    opts: RankOptions,
    model=None,
    feeds: list[Feed] | None = None,
    progress: Progress | None = None,
) -> dict[str, RankChoice]:
    """The rank (or dense) of every target under ``opts``."""
    targets = analysis.targets
    if opts.allocate is None and not (
        opts.search or opts.energy is not None or opts.ratio is not None
    ):
        opts = dataclasses.replace(opts, allocate="global")  # the default rule
    if opts.allocate == "fisher":
        if not analysis.fisher:
            raise OptionError("--allocate fisher needs Fisher importances (run with gradients)")
        budget = opts.budget if opts.budget is not None else (opts.ratio or 0.8)
        choices = fisher_ranks(targets, analysis.fisher, budget, opts.align)
        return {t.name: _latency_checked(t, choices[t.name], opts) for t in targets}
    if opts.allocate == "global":
        weights = None
        if opts.fisher_weighted:
            if not analysis.fisher:
                raise OptionError("--fisher-weighted needs Fisher importances")
            total = sum(analysis.fisher.values()) or 1.0
            weights = {k: v / total for k, v in analysis.fisher.items()}
        if opts.output_weighted:
            if model is None or not feeds:
                raise OptionError("--output-weighted needs the model and calibration batches")
            budget = opts.budget if opts.budget is not None else (opts.ratio or 0.8)
            sensitivity = output_sensitivity(analysis, model, feeds, budget, opts, progress)
            weights = {k: sensitivity[k] * (weights or {}).get(k, 1.0) for k in sensitivity}
        elif weights is None and opts.kfac_weighted:
            weights = analysis.sensitivities()
            if weights is None:
                log.info("global allocation without sensitivities: targets weighted alike")
        spectra = {t.name: analysis.entries[t.name].spectrum for t in targets}
        if opts.latency_budget is not None:
            lat = opts.latency

            def cost(t: Target, k: int | None) -> float:
                return lat.t_dense(t) if k is None else lat.t_pair(t, k)

            return global_ranks(
                targets, spectra, opts.latency_budget, opts.align, cost, weights, "latency"
            )
        budget = opts.budget if opts.budget is not None else (opts.ratio or 0.8)
        choices = global_ranks(targets, spectra, budget, opts.align, parameter_cost, weights)
        return {t.name: _latency_checked(t, choices[t.name], opts) for t in targets}
    if opts.search == "bisect":
        return bisect_all(analysis, opts, model, feeds, progress)
    out = {}
    for t in targets:
        if opts.energy is not None:
            choice = energy_rank(t, analysis.entries[t.name].spectrum, opts.energy, opts.align)
        else:
            choice = ratio_rank(t, 0.8 if opts.ratio is None else opts.ratio, opts.align)
        out[t.name] = _latency_checked(t, choice, opts)
    return out


def bisect_all(
    analysis: Analysis,
    opts: RankOptions,
    model,
    feeds: list[Feed] | None,
    progress: Progress | None = None,
) -> dict[str, RankChoice]:
    """FLAR-SVD: for each target, the smallest allowed rank whose criterion meets the threshold
    (default 0.05 whitened, 0.95 cosine, 1e-3 output), or dense.

    With ``threshold`` "auto" (output criterion only) the threshold is the output error of the
    uniform compression at the budget (``budget``, else ``ratio``) per target, and the ranks
    found are rescaled to land on that budget. Raises OptionError when the output criterion or
    "auto" has no model or batches, or "auto" lacks the output criterion or a budget.
    """
    targets = analysis.targets
    probe = None
    if opts.criterion == "output" or opts.threshold == "auto":
        if model is None or not feeds:
            raise OptionError("the output criterion needs the model and calibration batches")
        probe = _output_probe(model, analysis, feeds, opts)
    try:
        threshold = opts.threshold
        budget = opts.budget if opts.budget is not None else opts.ratio
        if threshold == "auto":
            if opts.criterion != "output":
                raise OptionError("--threshold auto goes with --criterion output")
            if budget is None:
                raise OptionError("--threshold auto needs a parameter budget (--budget or --ratio)")
            threshold = auto_threshold(analysis, probe, budget, opts.align)
            log.info("auto threshold: %.3e per target", threshold)
        if threshold is None:
            threshold = {"whitened": 0.05, "cosine": 0.95, "output": 1e-3}[opts.criterion]
        threshold = float(threshold)
        weights = Weights(model) if model is not None and opts.criterion == "cosine" else None
        out = {}
        for t in (progress or NoProgress()).track(targets, len(targets), "rank search"):
            b = weights.matrix(t) if weights is not None else None
            crit = _criterion(opts.criterion, t, analysis, b, threshold, probe)
            out[t.name] = searched_choice(t, allowed_grid(t, opts), crit, threshold)
        if opts.threshold == "auto":
            out = rescale_to_budget(targets, out, budget, opts)
        return out
    finally:
        if probe is not None:
            probe.close()


def evaluations_bound(target: Target, align: int) -> int:
    """The most criterion evaluations a bisection makes: ``ceil(log2(k_equiv / align)) + 1``."""
    return math.ceil(math.log2(max(target.k_equiv / align, 1))) + 1
