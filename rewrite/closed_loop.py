"""Closed-loop factorization: each target's statistics come from the model as it will run.

Ranks are chosen first (on the open-loop analysis); then targets are refactorized level by
level (:func:`flarc.calib.twin.target_levels`), each level's statistics taken from the twin
graph in which every upstream target already carries its rank-k product, so later layers
correct for earlier errors instead of inheriting them. With ``compensate`` each target
reproduces the *original* layer's output from the compressed activations
(:func:`flarc.rewrite.spectrum.compensated_svd`); the cross-statistic is shrunk like the Gram
(same intensity, same target ``mu I``), so identical activations give plain whitening exactly.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from flarc.calib.moments import Moments
from flarc.calib.shrinkage import shrink
from flarc.calib.statistics import FIELDS, StatisticsSession, StatPlan
from flarc.calib.twin import target_levels, twin_model, twin_name, weight_input
from flarc.core.external import as_array, external_dir, split_large_initializers
from flarc.core.inputs import Feed
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target, constant_tensors, stored_weight, weight_matrix
from flarc.rewrite.analysis import Analysis, AnalysisOptions, TargetAnalysis
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.spectrum import compensated_svd, whitened_svd
from flarc.rewrite.whiten import whitener

log = logging.getLogger(__name__)

# Below this intensity an underdetermined compensated fit is not regularised. Measured on
# Qwen2.5-0.5B at a 20% cut (4096 rows, 4864 down_proj inputs): intensity 1e-6, perplexity
# 17.3 (open loop) -> 29.1; Ledoit-Wolf's estimate (about 0.02 there), 19.1 -> 14.7.
WEAK_SHRINKAGE = 1e-3


def refactor_target(
    target: Target,
    weight,
    moments: Moments,
    options: AnalysisOptions,
    compensate: bool,
) -> TargetAnalysis:
    """Shrink, whiten and take the (compensated) SVD of one target from closed-loop moments."""
    shrunk = shrink(moments, options.shrinkage, options.centered, options.shrinkage_lambda)
    w, fell_back = whitener(shrunk.covariance, options.whiten, target.name)
    b = weight_matrix(target, weight)
    max_rank = None if options.full_rank else math.ceil(target.k_equiv)
    if compensate:
        lam, n_rows = shrunk.lam, moments.count
        cross = (1.0 - lam) * moments.cross / n_rows
        cross[np.diag_indices_from(cross)] += lam * shrunk.mu
        spectrum = compensated_svd(b, w, cross, max_rank)
    else:
        spectrum = whitened_svd(b, w, max_rank)
    kind = "eig (fallback)" if fell_back else w.kind
    return TargetAnalysis(target, spectrum, shrunk.lam, kind, moments.count)


def level_plans(model: onnx.ModelProto, level: list[Target], compensate: bool) -> list[StatPlan]:
    plans: dict[str, StatPlan] = {}
    for t in level:
        if t.stat_key in plans:
            continue
        plans[t.stat_key] = StatPlan(
            key=t.stat_key,
            input=twin_name(model, t.input),
            n=t.n,
            conv=t.conv,
            channels=t.weight_shape[1] if t.conv is not None else 0,
            partner=t.input if compensate else None,
        )
    for i, plan in enumerate(plans.values()):
        plan.outputs = {f: f"flarc_stats/cl{i}/{f}" for f in (*FIELDS, "cross")}
    return list(plans.values())


def closed_loop_entries(
    model: onnx.ModelProto,
    analysis: Analysis,
    ranks: dict[str, RankChoice],
    feeds: list[Feed],
    compensate: bool = False,
    progress: Progress | None = None,
) -> dict[str, TargetAnalysis]:
    """Closed-loop spectra of every factorized target (others keep their open-loop entry)."""
    progress = progress or NoProgress()
    chosen = [t for t in analysis.targets if ranks[t.name].rank is not None]
    entries = dict(analysis.entries)
    if not chosen:
        return entries
    consts = constant_tensors(model)
    # The twin graph is built on a copy whose large weights are stubs (never copied as protos).
    light, originals = split_large_initializers(model)
    twin = twin_model(light, chosen)
    del light
    folder = external_dir(model)
    weights = {weight_input(t.weight): as_array(consts[t.weight], folder) for t in chosen}
    options = analysis.options
    levels = target_levels(model, chosen)
    underdetermined: list[TargetAnalysis] = []
    for i, level in enumerate(progress.track(levels, total=len(levels), description="closed loop")):
        plans = level_plans(model, level, compensate)
        session = StatisticsSession(
            twin,
            [],
            {**feeds[0], **weights},
            options.mask_input,
            options.precision,
            plans=plans,
            originals=originals,
        )
        try:
            stats = session.collect(({**f, **weights} for f in feeds), description=f"level {i}")
        finally:
            session.close()
        for t in level:
            entry = refactor_target(
                t, as_array(consts[t.weight], folder), stats[t.stat_key], options, compensate
            )
            entries[t.name] = entry
            if compensate and entry.rows < t.n and entry.lam < WEAK_SHRINKAGE:
                underdetermined.append(entry)
            a, c = entry.spectrum.factors(ranks[t.name].rank)
            weights[weight_input(t.weight)] = stored_weight(t, a @ c)
    if underdetermined:
        worst = min(underdetermined, key=lambda e: e.lam)
        log.warning(
            "compensation fitted %d targets from fewer calibration rows than inputs with almost "
            "no shrinkage (e.g. %s: %d rows, %d inputs, shrinkage %.2g): the fit extrapolates "
            "outside the calibration span; use more calibration data or Ledoit-Wolf shrinkage",
            len(underdetermined),
            worst.target.name,
            worst.rows,
            worst.target.n,
            worst.lam,
        )
    return entries
