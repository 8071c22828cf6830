"""Closed-loop factorization: each target's statistics come from the model as it will run.

Ranks are chosen first (on the open-loop analysis); then targets are refactorized level by
level (:func:`flarc.calib.segments.target_levels`), each level's statistics taken from the
compressed model in which every upstream target already carries its rank-k product, so later
layers correct for earlier errors instead of inheriting them. The model runs a segment at a
time (:class:`flarc.calib.segments.SegmentedModel`): one forward pass in all, not one per
level. With ``compensate`` each target reproduces the *original* layer's output from the
compressed activations (:func:`flarc.rewrite.spectrum.compensated_svd`), the original model
running beside the compressed one (or, where the statistics carried the original's inputs to
disk, read from there); the cross-statistic is shrunk like the Gram (same
intensity, same target ``mu I``), so identical activations give plain whitening exactly; an
estimated intensity is at least :data:`flarc.rewrite.analysis.COMPENSATION_SHRINKAGE` (or
``floor``, ``--compensation-floor``).
With ``validate`` (``--validate-fits``) and held-out batches, the segments run on them too, and
each target keeps its compensated fit or its plain one (the compressed model's Gram alone, its
own shrinkage, as ``--closed-loop`` fits it) by the lower compensation error on those batches
(:func:`heldout_errors`): a compensated fit can learn the calibration's own content (ViT-S/14
calibrated on crops of 8 images, 30% cut: cosine 0.9854 compensated, 0.9898 chosen per target on
crops of other images, 0.9911 plain).
A model with quantized activations (QDQ) runs as the output guard's float view
(:func:`flarc.rewrite.guard.without_activation_qdq`): on its grid the compressed model's
activations flip grid points on rounding-level differences, which a compensated fit would chase
(the zoo's QDQ MiniLM, 128 calibration sentences: cosine 0.8862 on the quantized graph, 0.9033
on the float view).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterator

import numpy as np
import onnx

from flarc.calib.carry import inputs_model
from flarc.calib.moments import Moments, mirror_upper
from flarc.calib.segments import SegmentedModel, target_levels
from flarc.calib.statistics import (
    CarriedInputs,
    StatisticsSession,
    mark_masks,
    plan_statistics,
    shard_ends,
)
from flarc.core.errors import OptionError
from flarc.core.external import split_large_initializers
from flarc.core.graphs import scopes
from flarc.core.inputs import Feed, find_mask_input
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target, Weights, stored_weight, weight_matrix
from flarc.rewrite.analysis import Analysis, TargetAnalysis, analyze_target, output_root
from flarc.rewrite.guard import without_activation_qdq
from flarc.rewrite.ranks import RankChoice

log = logging.getLogger(__name__)

# Below this intensity an underdetermined compensated fit is not regularised. Measured on
# Qwen2.5-0.5B at a 20% cut (4096 rows, 4864 down_proj inputs): intensity 1e-6, perplexity
# 17.3 (open loop) -> 29.1; Ledoit-Wolf's estimate (about 0.02 there), 19.1 -> 14.7.
WEAK_SHRINKAGE = 1e-3

# The statistics graph's name for a compressed-model tensor (its original keeps the plain name).
COMPRESSED = "flarc_cl/"


def closed_loop_entries(
    model: onnx.ModelProto,
    analysis: Analysis,
    ranks: dict[str, RankChoice],
    feeds: list[Feed],
    compensate: bool = False,
    progress: Progress | None = None,
    validate: bool = False,
    floor: float | None = None,
) -> dict[str, TargetAnalysis]:
    """Closed-loop spectra of every factorized target (others keep their open-loop entry), each
    kept up to its chosen rank. With ``compensate`` and ``validate``, the analysis' held-out
    batches (where it has some) choose each target's compensated or plain fit; ``floor``: the
    compensated fits' least shrinkage intensity (default
    :data:`flarc.rewrite.analysis.COMPENSATION_SHRINKAGE`)."""
    progress = progress or NoProgress()
    owner = next((s for s in scopes(model)[1:]), None)
    if owner is not None:
        # A segment runs main-graph nodes only: a branch would read the original's tensors.
        raise OptionError(
            f"--closed-loop does not support models with If/Loop/Scan subgraphs yet (subgraph "
            f"'{'/'.join(owner.path)}'); compress without it"
        )
    chosen = [t for t in analysis.targets if ranks[t.name].rank is not None]
    entries = dict(analysis.entries)
    if not chosen:
        return entries
    stored = Weights(model)
    # The original's inputs, carried to disk by the statistics' forward pass: read, not re-run.
    carried = analysis.carried if compensate else None
    held = _validation_feeds(analysis, feeds) if compensate and validate else []
    if carried is not None and not (carried.serves(feeds) and carried.serves_heldout(held)):
        carried = None
    light, originals = split_large_initializers(model)
    view = without_activation_qdq(light)  # a copy of the light graph, not of large weights
    if view is not light:
        light, carried = view, None  # carried inputs are the quantized graph's
    levels = target_levels(model, chosen)
    wanted = [list(dict.fromkeys(u.input for t in level for u in t.all_uses)) for level in levels]
    fed = {u.consumed: (t.elem_type, list(t.weight_shape)) for t in chosen for u in t.all_uses}
    run = SegmentedModel(light, wanted, fed, [*feeds, *held], originals)
    mask = find_mask_input(light, analysis.options.mask_input)
    store = analysis.store if analysis.store is not None and analysis.store.writable else None
    index = {t.name: i for i, t in enumerate(analysis.targets)}
    options = analysis.options
    # The fed weights each segment's nodes read: targets of earlier levels, factorized by then.
    reads = [set(names) & set(fed) for names in run.reads]
    last = {x: i for i, names in enumerate(reads) for x in names}
    compressed: dict[str, np.ndarray] = {}  # rank-k products, kept until their last reader
    underdetermined: list[TargetAnalysis] = []
    plain = 0  # targets whose plain fit beat the compensated one on the held-out batches
    for i, level in enumerate(progress.track(levels, total=len(levels), description="closed loop")):
        states = {"compressed": {x: compressed[x] for x in reads[i]}}
        if compensate and carried is None:
            original = {u.consumed: t for t in chosen for u in t.all_uses if u.consumed in reads[i]}
            states["original"] = {x: stored.consumed(t) for x, t in original.items()}
        batches = run.run(i, states)
        if carried is not None:
            batches = _with_carried(batches, carried, wanted[i])
        outputs = _output_partners(level, stored) if compensate else {}
        stats, held_rows = level_statistics(
            light,
            level,
            batches,
            mask,
            options.precision,
            compensate,
            [*feeds, *held],
            outputs,
            heldout=len(held),
        )
        del outputs
        del states
        for x in [x for x in compressed if last[x] <= i]:
            del compressed[x]
        for t in level:
            diag = (analysis.output_diag or {}).get(t.name) if options.two_sided else None
            rank = ranks[t.name].rank
            weight = stored.consumed(t)
            # With held-out rows, also the plain fit as --closed-loop makes it (the compressed
            # model's Gram alone), and the one with the lower held-out error is kept.
            fits = [
                analyze_target(
                    t, weight, stats[t.stat_key], options, c, diag, max_rank=rank, floor=floor
                )
                for c in ((True, False) if held_rows else (compensate,))
            ]
            entry = fits[0]
            if held_rows:
                entry = fits[int(np.argmin(heldout_errors(held_rows, t, weight, fits, rank, diag)))]
                plain += entry is fits[1]
            del weight, fits
            if compensate and entry.rows < t.n and entry.lam < WEAK_SHRINKAGE:
                underdetermined.append(entry)
            a, c = entry.spectrum.factors(rank)
            for u in t.all_uses:
                if u.consumed in last:  # a later segment runs this target
                    compressed[u.consumed] = stored_weight(t, a @ c)
            if store is not None:
                # Named by index, as the open-loop spectra: a node name is no safe file name.
                entry.spectrum = entry.spectrum.stored(store, f"closed/t{index[t.name]}")
            entries[t.name] = entry
        del stats, held_rows
    if held:
        log.info(
            "closed loop: %d of %d targets kept the compensated fit, %d the plain one (the "
            "lower error on %d held-out batches)",
            len(chosen) - plain,
            len(chosen),
            plain,
            len(held),
        )
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


def _validation_feeds(analysis: Analysis, feeds: list[Feed]) -> list[Feed]:
    """The held-out batches that judge each compensated fit (none where nothing was held out)."""
    if analysis.heldout_is_calibration:
        return []
    return [f for f in analysis.heldout_feeds if not any(f is g for g in feeds)]


def heldout_errors(
    held_rows: list[dict[str, dict[str, np.ndarray]]],
    target: Target,
    weight: np.ndarray,
    fits: list[TargetAnalysis],
    rank: int,
    output_diag: np.ndarray | None = None,
) -> list[float]:
    """``sum ||(X_c A C - X_o B) diag(r)||^2`` over the held-out batches' rows of ``target``'s
    statistic for each of ``fits``: ``A C`` its rank-``rank`` factors, ``B`` the stored
    ``weight``'s matrix, ``X_c`` the compressed model's rows and ``X_o`` the original's, ``r``
    two-sided whitening's column weights (:func:`flarc.rewrite.analysis.output_root`; 1 without
    ``output_diag``): the error a compensated fit minimises on its own rows, measured where no
    fit was made."""
    # Every batch's rows come from one statistics graph: one type, converted to once.
    dtype = np.result_type(held_rows[0][target.stat_key]["rows"].dtype, np.float32)
    factors = [[x.astype(dtype) for x in f.spectrum.factors(rank)] for f in fits]
    b = weight_matrix(target, weight).astype(dtype)
    root = None if output_diag is None else output_root(output_diag).astype(dtype)
    totals = [0.0] * len(fits)
    for values in held_rows:
        rows, partner = values[target.stat_key]["rows"], values[target.stat_key]["partner_rows"]
        wanted = partner @ b  # the original's output, shared by the fits
        for i, (a, c) in enumerate(factors):
            residual = (rows @ a) @ c - wanted
            if root is not None:
                residual *= root
            totals[i] += float(np.einsum("ij,ij->", residual, residual, dtype=np.float64))
    return totals


def _output_partners(level: list[Target], stored: Weights) -> dict[str, np.ndarray]:
    """``stat_key -> B`` (float64) for the level's tall MatMul/Gemm targets (``2 m <= n``) that
    have their statistic to themselves: their cross-statistic is taken with the original's
    output ``X_o B`` (``2 N n m`` operations, an ``[n, m]`` result) instead of its input
    (``N n^2``, ``[n, n]``), the same ``C B``. On Qwen2.5-0.5B's down projections (4864 x 896)
    that is 2.7x fewer."""
    sharing = collections.Counter(t.stat_key for t in level)
    return {
        t.stat_key: weight_matrix(t, stored.consumed(t))
        for t in level
        if sharing[t.stat_key] == 1 and t.conv is None and 2 * t.m <= t.n
    }


def _with_carried(
    batches: Iterator[tuple[int, dict[str, dict[str, np.ndarray]]]],
    carried: CarriedInputs,
    names: list[str],
) -> Iterator[tuple[int, dict[str, dict[str, np.ndarray]]]]:
    """``batches`` with each one's ``original`` state read from the carried inputs."""
    for b, values in batches:
        values["original"] = carried.calibration_values(b, names)
        yield b, values


def level_statistics(
    model: onnx.ModelProto,
    level: list[Target],
    batches: Iterator[tuple[int, dict[str, dict[str, np.ndarray]]]],
    mask: str | None,
    precision: str,
    compensate: bool,
    feeds: list[Feed],
    outputs: dict[str, np.ndarray] | None = None,
    heldout: int = 0,
) -> tuple[dict[str, Moments], list[dict[str, dict[str, np.ndarray]]]]:
    """The moments of one level's inputs in the compressed model (with their cross-statistic
    with the original's when ``compensate``: with its input, or for a key in ``outputs``, with
    its output, the input times that weight), from the segment's values by a graph of the
    statistics nodes alone: the products over the rows of each shard of consecutive batches
    stacked, as the calibration's (:func:`flarc.calib.statistics.shard_ends`), the shards added
    in batch order. The last ``heldout`` of ``feeds`` add nothing: their rows come back per batch
    (:meth:`StatisticsSession.outputs`), not multiplied."""
    plans = plan_statistics(level, lambda x: COMPRESSED + x, partner=compensate, prefix="cl")
    _, values = next(batches)  # batch 0 (segments run in batch order)

    def feed_of(b: int, values: dict[str, dict[str, np.ndarray]]) -> Feed:
        got = {COMPRESSED + x: v for x, v in values["compressed"].items()}
        got.update(values.get("original", {}))
        if mask is not None and mask in feeds[b]:
            got[mask] = feeds[b][mask]
        return got

    sample = feed_of(0, values)
    if mask is not None and mask in sample:
        mark_masks(plans, {x: tuple(v.shape) for x, v in sample.items()}, sample[mask].shape)
    declared = {i.name for i in model.graph.input}
    graph_inputs = [x for x in sample if x in declared]
    dtypes = {x: v.dtype for x, v in sample.items() if x not in declared}
    base = inputs_model(model, dtypes, graph_inputs)
    session = StatisticsSession(
        base, level, {}, mask, precision, plans=plans, masks_decided=True, arena=True
    )

    # The calibration's shards (calib.statistics.shard_ends): stacked rows for each product.
    fitted = feeds[: len(feeds) - heldout]
    ends = set(shard_ends(plans, fitted, mask))
    totals: dict[str, Moments] = {}
    chunk: list[dict[str, dict[str, np.ndarray]]] = []
    held: list[dict[str, dict[str, np.ndarray]]] = []
    for b, vals in itertools.chain([(0, values)], batches):
        if b >= len(fitted):
            held.append(session.outputs(feed_of(b, vals)))
            continue
        chunk.append(session.outputs(feed_of(b, vals)))
        if b + 1 in ends:
            for key, moments in session.moments(chunk, outputs).items():
                if key in totals:
                    totals[key].add(moments)
                else:  # the first shard's sums start the totals (float64, owned)
                    totals[key] = moments
            chunk.clear()
    for moments in totals.values():
        mirror_upper(moments.gram)  # each batch added only the upper triangle
    return totals, held
