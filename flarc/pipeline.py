"""The stages in order (docs/design.md section 1): targets -> statistics -> whitened spectra (the
analysis, kept in the store) -> ranks -> factor pairs in the graph -> a checked, guarded and
compared model (:func:`compress`), or rank buckets for progressive decoding
(:func:`build_buckets`). The CLI is a thin layer over these functions."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from flarc.calib.checkpoint import Checkpoint, statistics_source
from flarc.calib.data import CalibrationSet
from flarc.calib.moments import Moments
from flarc.calib.statistics import collect_moments
from flarc.core.compare import OutputComparison, compare_models
from flarc.core.errors import DataError, ModelError, OptionError
from flarc.core.executor import Compute
from flarc.core.external import FactorFile
from flarc.core.inputs import Feed, find_mask_input
from flarc.core.memory import release_free_memory
from flarc.core.modelio import check_model_any_size, is_large, stored_tensors, tensor_nbytes
from flarc.core.progress import NoProgress, Progress, step
from flarc.core.store import Store
from flarc.core.targets import Skipped, Target, TargetSet, Weights, stored_bytes
from flarc.export.buckets import SPARE, BuildResult, calibration_for_lm, write_buckets
from flarc.export.hf import layout_from_onnx
from flarc.rewrite.analysis import Analysis, AnalysisOptions, derive_spectra
from flarc.rewrite.guard import guard_tolerance, output_guard
from flarc.rewrite.pairs import factor_nbytes, factorize, lazy_factors
from flarc.rewrite.policy import RankOptions, choose_ranks
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.rows import TargetRow, target_rows

__all__ = [
    "Analysis",
    "AnalysisOptions",
    "CompressResult",
    "analyze",
    "build_buckets",
    "compress",
    "rewhiten",
]

if TYPE_CHECKING:
    from flarc.calib.sensitivity import OutputGradients
    from flarc.rewrite.spectrum import Spectrum

log = logging.getLogger(__name__)

# Batches an analysis keeps for comparisons and output criteria (held out, and calibration).
MAX_KEPT_FEEDS = 4


def analyze(
    model: onnx.ModelProto,
    targets: TargetSet,
    data: CalibrationSet,
    options: AnalysisOptions | None = None,
    model_sha256: str = "",
    progress: Progress | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 8,
    compute: Compute | None = None,
    keep_inputs: bool = False,
) -> Analysis:
    """Statistics on calibration (and held-out) data, then the whitened spectrum of every target.

    The arrays go to the store (:meth:`Store.for_model`): ``checkpoint`` (a folder) when given,
    where the calibration sums are saved every ``checkpoint_every`` batches and from which
    ``resume`` continues a run of the same model, options and data. ``compute`` says where
    calibration shards and per-target factorizations run (this process by default) and on
    which device; the result is the same on every executor. ``keep_inputs``: the calibration
    forward pass carries every target's input to disk (where the executor is this process and
    the disk has room) and the analysis keeps them (:attr:`Analysis.carried`), for a compensated
    closed loop on the same batches to read instead of running the original model again
    (``compress(..., compensate=True)``).
    """
    options = options or AnalysisOptions()
    compute = compute or Compute()
    progress = progress or NoProgress()
    if not targets.targets:
        raise ModelError("no targets to analyse")
    if resume and checkpoint is None:
        raise ModelError("resume needs a checkpoint folder (--checkpoint DIR)")
    weights = Weights(model)
    for t in targets.targets:
        # NaN/Inf in a weight would surface much later as "SVD did not converge"; name it now.
        bad = int((~np.isfinite(weights.consumed(t))).sum())
        if bad:
            raise ModelError(
                f"tensor '{t.weight}' (weight of node '{t.name}') has {bad} NaN or Inf values"
            )
    store = Store.for_model(is_large(model), checkpoint)
    identity = {}  # what a saved run must match to be resumed (only a folder the user named)
    if checkpoint is not None:
        identity = {
            "model": model_sha256 or hashlib.sha256(model.SerializeToString()).hexdigest(),
            "precision": options.precision,
            "mask_input": options.mask_input,
        }
    every = checkpoint_every if checkpoint is not None else None
    sums = Checkpoint(store, "statistics", identity, every, resume)
    stats, heldout, mask, carried = collect_moments(
        model,
        targets.targets,
        data,
        sums,
        options.precision,
        options.mask_input,
        progress,
        compute.executor,
        keep_inputs=keep_inputs,
    )
    targets = without_rows(targets, stats.raw())
    fisher = None
    if options.fisher:
        from flarc.calib.fisher import fisher_importance

        fisher = fisher_importance(
            model,
            targets.targets,
            data.calibration,
            loss=options.fisher,
            mask_input=find_mask_input(model, options.mask_input),
            seed=options.seed,
            progress=progress,
        )
    g2 = output_sensitivities(model, targets.targets, data, options, progress)
    if g2 is None and options.two_sided:
        options = dataclasses.replace(options, two_sided=False)  # nothing to weigh outputs by
    if store.on_disk:
        release_free_memory()
    source = statistics_source(store)
    diag = g2.shrunk_diag(options.output_shrinkage) if g2 else None
    entries = derive_spectra(
        targets.targets,
        weights,
        stats,
        options,
        store,
        progress,
        source,
        diag,
        compute.executor,
        compute.device,
    )
    return Analysis(
        model_sha256,
        options,
        targets.targets,
        targets.skipped,
        stats,
        heldout,
        entries,
        fisher=fisher.alpha if fisher else None,
        fisher_loss=fisher.description if fisher else None,
        output_g2=g2.g2 if g2 else None,
        sensitivity_loss=g2.loss if g2 else None,
        output_diag=diag,
        mask_input=mask,
        heldout_feeds=(data.heldout or data.calibration)[:MAX_KEPT_FEEDS],
        probe_feeds=data.calibration[:MAX_KEPT_FEEDS],
        heldout_is_calibration=not data.heldout,
        store=store,
        carried=carried,
    )


def output_sensitivities(
    model: onnx.ModelProto,
    targets: list[Target],
    data: CalibrationSet,
    options: AnalysisOptions,
    progress: Progress | None = None,
) -> OutputGradients | None:
    """K-FAC output gradients on the first ``sensitivity_batches`` calibration batches, or None
    (with a warning) when they are off or the graph cannot be differentiated: the global
    allocation then weighs every target's relative error alike."""
    if not options.sensitivity or options.sensitivity_batches < 1:
        return None
    from flarc.calib.sensitivity import output_gradients  # torch: imported only when used

    try:
        return output_gradients(
            model,
            targets,
            data.calibration[: options.sensitivity_batches],
            find_mask_input(model, options.mask_input),
            options.seed,
            progress=progress,
        )
    except ModelError as exc:
        log.warning("no output sensitivities (%s): targets are weighted alike", exc)
        return None


def without_rows(targets: TargetSet, stats: Mapping[str, Moments]) -> TargetSet:
    """``targets`` less those no calibration row reached (an If branch that never ran, or
    every row masked), which are listed as skipped; DataError when none is left."""
    empty = [t for t in targets.targets if stats[t.stat_key].count == 0]
    if not empty:
        return targets
    if len(empty) == len(targets.targets):
        raise DataError(f"tensor '{empty[0].input}': no unmasked rows in the calibration data")
    skipped = [
        Skipped(
            t.name,
            t.op_type,
            "no calibration row reached it (the If branch it is in never ran on the calibration "
            "data); left dense"
            if any(u.graph for u in t.all_uses)
            else "every calibration row of its input is masked; left dense",
        )
        for t in empty
    ]
    kept = [t for t in targets.targets if t not in empty]
    return TargetSet(kept, [*targets.skipped, *skipped])


def rewhiten(
    model: onnx.ModelProto,
    analysis: Analysis,
    options: AnalysisOptions,
    progress: Progress | None = None,
) -> Analysis:
    """``analysis`` with spectra for other whitening options, from the same statistics (no
    calibration): read from its store when they are there, else derived and kept there when
    the store can be written (a large model's otherwise go to a temporary store)."""
    if options.two_sided and analysis.output_diag is None:
        options = dataclasses.replace(options, two_sided=False)
    # D was shrunk as the analysis estimated it: its raw form is not kept.
    options = dataclasses.replace(options, output_shrinkage=analysis.options.output_shrinkage)
    if options.spectra_key() == analysis.options.spectra_key():
        return dataclasses.replace(analysis, options=options)
    store = analysis.store
    if store is None or not store.writable:
        store = Store.for_model(is_large(model))
    source = statistics_source(analysis.store) if analysis.store is not None else None
    entries = derive_spectra(
        analysis.targets,
        Weights(model),
        analysis.stats,
        options,
        store,
        progress,
        source,
        analysis.output_diag,
    )
    return dataclasses.replace(analysis, options=options, entries=entries, store=store)


@dataclass
class CompressResult:
    """The compressed model and what was done to get it."""

    model: onnx.ModelProto
    targets: list[Target]
    ranks: dict[str, RankChoice]
    rows: list[TargetRow]
    comparison: list[OutputComparison]
    params_before: int  # parameters of the target weights
    params_after: int
    model_params_before: int
    model_params_after: int
    bytes_before: int = 0  # stored bytes of the target weights (fp16 / int8 forms as stored)
    bytes_after: int = 0
    model_bytes_before: int = 0  # stored bytes of every initializer
    model_bytes_after: int = 0
    guard: float = 0.0  # relative difference to the dense equivalent (rounding)
    # A large model's factor data, which ``model`` refers to: save the model while this lives.
    spill: Store | None = None

    def predicted_speedup(self, latency, timing: dict) -> float:
        """End-to-end speedup the latency model expects: the targets' predicted times, plus the
        rest of the measured original time (what no target accounts for) on both sides."""
        by_name = {t.name: t for t in self.targets}
        dense = sum(latency.t_dense(t) for t in self.targets)
        new = sum(
            latency.t_dense(by_name[name])
            if c.rank is None
            else latency.t_pair(by_name[name], c.rank)
            for name, c in self.ranks.items()
        )
        rest = max(timing["original"]["median"] - dense, 0.0)
        return (rest + dense) / max(rest + new, 1e-12)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the model's initializers (subgraphs' included)."""
    return int(sum(math.prod(t.dims) for t in stored_tensors(model)))


def compress(
    model: onnx.ModelProto,
    analysis: Analysis,
    options: RankOptions,
    force: bool = False,
    closed_loop: list[Feed] | None = None,
    compensate: bool = False,
    progress: Progress | None = None,
    validate_fits: bool = False,
    compensation_floor: float | None = None,
) -> CompressResult:
    """Choose ranks, rewrite the graph, check it, guard it, and compare it with the original.

    With ``closed_loop`` calibration feeds, the chosen targets are refactorized in closed loop
    (:mod:`flarc.rewrite.closed_loop`), with error compensation when ``compensate`` (its fits'
    least shrinkage intensity ``compensation_floor``, default
    :data:`flarc.rewrite.analysis.COMPENSATION_SHRINKAGE`); with ``validate_fits`` too, the
    analysis' held-out batches choose each target's compensated or plain fit.
    """
    weights = Weights(model)
    if not analysis.options.directions and (not closed_loop or options.reads_factors):
        raise OptionError(
            "the analysis kept singular values only (AnalysisOptions(directions=False)): its "
            "factors come from the closed loop alone, with ranks chosen by singular values"
        )
    ranks = choose_ranks(analysis, options, model, analysis.probe_feeds, progress)
    if closed_loop:
        from flarc.rewrite.closed_loop import closed_loop_entries

        entries = closed_loop_entries(
            model,
            analysis,
            ranks,
            closed_loop,
            compensate,
            progress,
            validate_fits,
            compensation_floor,
        )
        analysis = dataclasses.replace(analysis, entries=entries)
    factors = lazy_factors(analysis, ranks)
    spill = None
    if weights.lazy:
        # A large model's factors go to disk as they are made; the new model refers to them.
        spill = Store.temporary(prefix="flarc-factors-")
        factor_file = FactorFile(spill.root, weights.folder)
        try:
            new_model = factorize(model, analysis.targets, factors, factor_file.put)
        finally:
            factor_file.close()
        release_free_memory()
    else:
        new_model = factorize(model, analysis.targets, dict(factors.items()))
    try:
        check_model_any_size(new_model)
    except Exception as exc:  # a rewrite bug, not bad input: say which check failed
        raise ModelError(f"compressed model fails onnx.checker: {exc}") from None
    guard = step(
        progress,
        "output guard",
        lambda: output_guard(
            model, new_model, analysis.targets, factors, analysis.heldout_feeds, weights.lazy
        ),
    )
    tolerance = guard_tolerance(analysis.targets)
    if not guard <= tolerance:  # NaN included
        message = (
            f"output guard: the rewritten model differs from its own dense equivalent by {guard:.2e} "
            f"(tolerance {tolerance:.0e}), a sign of a rewrite bug, not of compression"
        )
        if not force:
            raise ModelError(message + "; not written (use --force to write it anyway)")
        log.warning("%s; written because of --force", message)
    if weights.lazy:
        release_free_memory()
    comparison = compare_models(model, new_model, analysis.heldout_feeds, progress=progress)
    before = stored_bytes(model, analysis.targets)
    after = factor_nbytes(new_model, [name for name, c in ranks.items() if c.rank is not None])
    rows = [
        dataclasses.replace(
            r, stored_bytes=before[r.name], kept_bytes=after.get(r.name, before[r.name])
        )
        for r in target_rows(analysis, ranks, weights, progress)
    ]
    return CompressResult(
        model=new_model,
        targets=analysis.targets,
        ranks=ranks,
        rows=rows,
        comparison=comparison,
        params_before=sum(r.params for r in rows),
        params_after=sum(r.kept_params for r in rows),
        model_params_before=count_params(model),
        model_params_after=count_params(new_model),
        bytes_before=sum(r.stored_bytes for r in rows),
        bytes_after=sum(r.kept_bytes for r in rows),
        model_bytes_before=tensor_nbytes(model),
        model_bytes_after=tensor_nbytes(new_model),
        guard=guard,
        spill=spill,
    )


def build_buckets(
    model: onnx.ModelProto,
    targets: TargetSet,
    data: CalibrationSet,
    budgets: list[float],
    output: str | os.PathLike,
    align: int = 8,
    alpha: dict[str, float] | None = None,
    analysis_options=None,
    fisher_loss: str = "lm",
    provenance: dict | None = None,
    progress: Progress | None = None,
    allocate: str = "global",
    compute: Compute | None = None,
    closed_loop: bool = False,
    compensate: bool = False,
    spare: float = SPARE,
) -> BuildResult:
    """Analyse once, write the buckets. Ranks (``allocate``): "global", the default rule of
    compress (K-FAC sensitivities, nested buckets, at most ``spare`` x the largest bucket's
    target parameters stored twice), or "fisher", FLRC on ``alpha`` (computed with
    ``fisher_loss`` unless given). ``closed_loop``: the factors are refitted closed loop (with
    error compensation when ``compensate``) at each target's largest factorized rank, as
    compress does at its chosen ranks; every bucket's factors are row prefixes of them. ``data``
    holds token batches; empty past tensors are added here."""
    if allocate not in ("global", "fisher"):
        raise ModelError(f"bucket allocation '{allocate}': expected global or fisher")
    progress = progress or NoProgress()
    layout = layout_from_onnx(model)
    data = calibration_for_lm(data, layout)
    convs = [t for t in targets.targets if t.op_type == "Conv"]
    usable = TargetSet(
        [t for t in targets.targets if t.op_type != "Conv"],
        [
            *targets.skipped,
            *(Skipped(t.name, t.op_type, "Conv stays dense in buckets") for t in convs),
        ],
    )
    fisher = allocate == "fisher"
    options = dataclasses.replace(
        analysis_options or AnalysisOptions(),
        fisher=fisher_loss if fisher and alpha is None else None,
        sensitivity=not fisher,
    )
    analysis = analyze(
        model, usable, data, options, progress=progress, compute=compute, keep_inputs=compensate
    )
    provenance = dict(provenance or {})
    opts = dict(provenance.get("options", {}))
    opts["analysis"] = asdict(options)
    opts["allocate"] = allocate
    if fisher:
        opts["fisher"] = analysis.fisher_loss or "alpha given by the caller"
    else:
        opts["sensitivity"] = analysis.sensitivity_loss or "none (targets weighted alike)"
    opts["calibration_batches"] = len(data.calibration)
    if closed_loop or compensate:
        opts["closed_loop"] = "compensated" if compensate else "plain"
    provenance["options"] = opts
    spectra = {name: e.spectrum for name, e in analysis.entries.items()}
    refit = None
    if closed_loop or compensate:
        from flarc.rewrite.closed_loop import closed_loop_entries

        def refit(largest: dict[str, int]) -> dict[str, Spectrum]:
            ranks = {
                t.name: RankChoice(largest.get(t.name), "largest bucket") for t in usable.targets
            }
            entries = closed_loop_entries(
                model, analysis, ranks, data.calibration, compensate, progress
            )
            return {name: entries[name].spectrum for name in largest}

    return write_buckets(
        model,
        usable.targets,
        spectra,
        budgets,
        output,
        align,
        provenance,
        progress,
        weights=None if fisher else analysis.sensitivities(),
        alpha=(alpha if alpha is not None else analysis.fisher) if fisher else None,
        refit=refit,
        spare=spare,
    )
