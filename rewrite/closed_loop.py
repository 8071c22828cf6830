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

import onnx

from flarc.calib.statistics import StatisticsSession, plan_statistics
from flarc.calib.twin import target_levels, twin_model, twin_name, weight_input
from flarc.core.errors import OptionError
from flarc.core.external import split_large_initializers
from flarc.core.graphs import scopes
from flarc.core.inputs import Feed
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Weights, stored_weight
from flarc.rewrite.analysis import Analysis, TargetAnalysis, analyze_target
from flarc.rewrite.ranks import RankChoice

log = logging.getLogger(__name__)

# Below this intensity an underdetermined compensated fit is not regularised. Measured on
# Qwen2.5-0.5B at a 20% cut (4096 rows, 4864 down_proj inputs): intensity 1e-6, perplexity
# 17.3 (open loop) -> 29.1; Ledoit-Wolf's estimate (about 0.02 there), 19.1 -> 14.7.
WEAK_SHRINKAGE = 1e-3


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
    owner = next((s for s in scopes(model)[1:]), None)
    if owner is not None:
        # The twin copies main-graph nodes only: a branch would read the original's tensors.
        raise OptionError(
            f"--closed-loop does not support models with If/Loop/Scan subgraphs yet (subgraph "
            f"'{'/'.join(owner.path)}'); compress without it"
        )
    chosen = [t for t in analysis.targets if ranks[t.name].rank is not None]
    entries = dict(analysis.entries)
    if not chosen:
        return entries
    stored = Weights(model)
    # The twin graph is built on a copy whose large weights are stubs (never copied as protos).
    light, originals = split_large_initializers(model)
    twin = twin_model(light, chosen)
    del light
    weights = {weight_input(u.consumed): stored.consumed(t) for t in chosen for u in t.all_uses}
    options = analysis.options
    levels = target_levels(model, chosen)
    underdetermined: list[TargetAnalysis] = []
    for i, level in enumerate(progress.track(levels, total=len(levels), description="closed loop")):
        plans = plan_statistics(
            level, lambda name: twin_name(model, name), partner=compensate, prefix="cl"
        )
        session = StatisticsSession(
            twin,
            [],
            {**feeds[0], **weights},
            options.mask_input,
            options.precision,
            plans=plans,
            originals=originals,
        )
        stats = session.collect(({**f, **weights} for f in feeds), description=f"level {i}")
        del session
        for t in level:
            diag = (analysis.output_diag or {}).get(t.name) if options.two_sided else None
            entry = analyze_target(
                t, stored.consumed(t), stats[t.stat_key], options, compensate, diag
            )
            entries[t.name] = entry
            if compensate and entry.rows < t.n and entry.lam < WEAK_SHRINKAGE:
                underdetermined.append(entry)
            a, c = entry.spectrum.factors(ranks[t.name].rank)
            for u in t.all_uses:
                weights[weight_input(u.consumed)] = stored_weight(t, a @ c)
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
