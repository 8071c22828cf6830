"""The stages in order: targets -> statistics -> whitened spectra (the cacheable analysis) ->
ranks -> factor pairs in the graph -> checked and compared model. The CLI is a thin layer
over these functions."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from flarc.calib.data import CalibrationSet
from flarc.calib.moments import LazyMoments, Moments, spill_moments
from flarc.calib.shrinkage import shrink
from flarc.calib.statistics import StatisticsSession, StatPlan, plan_statistics
from flarc.core.compare import OutputComparison, compare_models, compare_streamed
from flarc.core.diskarray import SpillFolder
from flarc.core.errors import ModelError
from flarc.core.external import FactorFile, all_tensors, as_array, external_dir
from flarc.core.inputs import Feed, find_mask_input
from flarc.core.memory import release_free_memory
from flarc.core.modelio import EXTERNAL_DATA_THRESHOLD, is_large, save_model, tensor_nbytes
from flarc.core.progress import NoProgress, Progress
from flarc.core.sessions import fed_session
from flarc.core.sums import PairSums
from flarc.core.targets import Target, TargetSet, constant_tensors, weight_matrix, weight_view
from flarc.rewrite.analysis import Analysis, AnalysisOptions, TargetAnalysis
from flarc.rewrite.output_error import OutputErrorProbe
from flarc.rewrite.policy import RankOptions, choose_ranks
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.spectrum import whitened_svd
from flarc.rewrite.surgery import factorize
from flarc.rewrite.whiten import whitener

if TYPE_CHECKING:
    from flarc.calib.checkpoint import Checkpointer

log = logging.getLogger(__name__)

# Batches an analysis keeps for comparisons and output criteria (held out, and calibration).
MAX_KEPT_FEEDS = 4
# Output columns per block of the held-out error of one target.
HELDOUT_BLOCK = 2048
# Smallest Gram budget of one statistics pass when a large model's statistics are grouped.
STAT_GROUP_MIN_BYTES = 64 << 20
# Largest relative difference between the factor pairs and their dense product that is rounding.
GUARD_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


def analyze_target(
    target: Target, weight: np.ndarray, moments: Moments, options: AnalysisOptions
) -> TargetAnalysis:
    """Shrink the statistic, whiten, and take the SVD of one target's weight."""
    shrunk = shrink(moments, options.shrinkage, options.centered, options.shrinkage_lambda)
    w, fell_back = whitener(shrunk.covariance, options.whiten, target.name)
    max_rank = None if options.full_rank else math.ceil(target.k_equiv)
    kind = "eig (fallback)" if fell_back else w.kind
    # B is passed as a temporary so whitened_svd can free it before the SVD.
    spectrum = whitened_svd(weight_matrix(target, weight), w, max_rank)
    return TargetAnalysis(target, spectrum, shrunk.lam, kind, moments.count)


def spill_statistics(model: onnx.ModelProto) -> bool:
    """Whether statistics and spectra of ``model`` are kept on disk between stages."""
    return is_large(model)


def statistic_groups(plans: list[StatPlan], max_bytes: int | None) -> list[list[StatPlan]]:
    """Consecutive plans whose float64 Gram matrices together stay under ``max_bytes`` (one
    calibration pass per group); a single plan larger than that is a group of its own."""
    if max_bytes is None:
        return [plans]
    groups: list[list[StatPlan]] = [[]]
    size = 0
    for p in plans:
        nbytes = 8 * p.n * p.n
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    return groups


def collect_grouped(
    model: onnx.ModelProto,
    targets: TargetSet,
    data: CalibrationSet,
    options: AnalysisOptions,
    progress: Progress,
    checkpointer: Checkpointer | None,
    spill: SpillFolder | None,
) -> tuple[Mapping[str, Moments], Mapping[str, Moments], str | None]:
    """Calibration and held-out moments of every statistic, and the mask input if one was used.

    With ``spill``, statistics are gathered a group at a time (their Gram matrices within a
    fraction of the model's size) and kept on disk: memory holds one group, not all.
    """
    # A group's Grams are held about three times over (onnxruntime's outputs, their copies,
    # the sums): an eighth of the model each keeps statistics well under the model's size.
    budget = max(STAT_GROUP_MIN_BYTES, tensor_nbytes(model) // 8) if spill is not None else None
    groups = statistic_groups(plan_statistics(targets.targets), budget)
    stats: dict[str, Moments] = {}
    heldout: dict[str, Moments] = {}
    mask = None
    for g, plans in enumerate(groups):
        label = f" ({g + 1}/{len(groups)})" if len(groups) > 1 else ""
        session = StatisticsSession(
            model,
            targets.targets,
            data.calibration[0],
            options.mask_input,
            options.precision,
            plans=plans,
        )
        part = checkpointer
        if checkpointer is not None and len(groups) > 1:
            part = checkpointer.for_part(f"group-{g}")
        try:
            group = session.collect(
                data.calibration,
                progress,
                "calibration statistics" + label,
                checkpoint=part,
            )
            if spill is not None:  # to disk before the held-out pass: one group's Grams at a time
                group = spill_moments(group, spill)
                release_free_memory()
            held = (
                session.collect(data.heldout, progress, "held-out statistics" + label)
                if data.heldout
                else {}
            )
            if any(p.masked for p in session.plans):
                mask = session.mask_input
        finally:
            session.close()
        if spill is not None:
            held = spill_moments(held, spill)
        stats.update(group)
        heldout.update(held)
        del group, held
        if spill is not None:
            release_free_memory()
    if spill is not None:
        return LazyMoments(stats), LazyMoments(heldout), mask
    return stats, heldout, mask


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
) -> Analysis:
    """Statistics on calibration (and held-out) data, then the whitened spectrum of every target.

    With ``checkpoint`` (a folder), the calibration sums are saved every ``checkpoint_every``
    batches; ``resume`` continues from a saved checkpoint of the same model, options and data.
    """
    options = options or AnalysisOptions()
    progress = progress or NoProgress()
    if not targets.targets:
        raise ModelError("no targets to analyse")
    weights = constant_tensors(model)
    folder = external_dir(model)
    for t in targets.targets:
        # NaN/Inf in a weight would surface much later as "SVD did not converge"; name it now.
        bad = int((~np.isfinite(as_array(weights[t.weight], folder))).sum())
        if bad:
            raise ModelError(
                f"tensor '{t.weight}' (weight of node '{t.name}') has {bad} NaN or Inf values"
            )
    del weights
    checkpointer = None
    if checkpoint is not None:
        from flarc.calib.checkpoint import Checkpointer

        model_id = model_sha256 or hashlib.sha256(model.SerializeToString()).hexdigest()
        identity = {
            "model": model_id,
            "precision": options.precision,
            "mask_input": options.mask_input,
        }
        checkpointer = Checkpointer(Path(checkpoint), identity, checkpoint_every, resume)
    elif resume:
        raise ModelError("resume needs a checkpoint folder (--checkpoint DIR)")
    spill = SpillFolder() if spill_statistics(model) else None
    stats, heldout, mask = collect_grouped(
        model, targets, data, options, progress, checkpointer, spill
    )
    fisher = None
    if options.fisher:
        from flarc.calib.fisher import fisher_importance

        fisher = fisher_importance(
            model,
            targets.targets,
            data.calibration,
            options.fisher,
            find_mask_input(model, options.mask_input),
            options.seed,
            progress,
        )
    consts = constant_tensors(model)
    if spill is not None:
        release_free_memory()
    entries = {}
    for t in progress.track(
        targets.targets, total=len(targets.targets), description="whitened SVD"
    ):
        entry = analyze_target(t, as_array(consts[t.weight], folder), stats[t.stat_key], options)
        if spill is not None:
            entry.spectrum = entry.spectrum.spilled(spill)
        entries[t.name] = entry
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
        mask_input=mask,
        heldout_feeds=(data.heldout or data.calibration)[:MAX_KEPT_FEEDS],
        probe_feeds=data.calibration[:MAX_KEPT_FEEDS],
        heldout_is_calibration=not data.heldout,
        spill=spill,
    )


class LazyMapping(Mapping):
    """``key -> make(key)`` over fixed keys, each value made when looked up and never kept (a
    large model's factors one target at a time, not all of them at once)."""

    def __init__(self, keys: Iterable[str], make: Callable[[str], Any]) -> None:
        self._keys = list(keys)
        self._known = set(self._keys)
        self._make = make

    def __getitem__(self, key: str) -> Any:
        if key not in self._known:
            raise KeyError(key)
        return self._make(key)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def lazy_factors(analysis: Analysis, ranks: dict[str, RankChoice]) -> LazyMapping:
    """The factor pair of every target with a rank, in the model's dtype, made when looked up."""
    chosen = {name: c.rank for name, c in ranks.items() if c.rank is not None}
    dtype = {t.name: np.dtype(t.dtype) for t in analysis.targets}

    def pair(name: str) -> tuple[np.ndarray, np.ndarray]:
        a, c = analysis.entries[name].spectrum.factors(chosen[name])
        if not (np.isfinite(a).all() and np.isfinite(c).all()):
            raise ModelError(f"node '{name}': factors are not finite (degenerate statistics)")
        return a.astype(dtype[name]), c.astype(dtype[name])

    return LazyMapping(chosen, pair)


def dense_products(factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> LazyMapping:
    """``name -> A C`` for factor pairs, each made when looked up."""

    def product(name: str) -> np.ndarray:
        a, c = factors[name]
        return a @ c

    return LazyMapping(factors, product)


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
    num = den = 0.0
    view = weight_view(target, weight)
    # In blocks of output columns: a large target's float64 B and residual are never whole.
    for j in range(0, target.m, HELDOUT_BLOCK):
        b = np.asarray(view[:, j : j + HELDOUT_BLOCK], dtype=np.float64)
        d = b - a @ c[:, j : j + HELDOUT_BLOCK]
        num += float(np.einsum("ij,ij->", d, moments.gram @ d))
        den += float(np.einsum("ij,ij->", b, moments.gram @ b))
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
    targets: list[Target]
    ranks: dict[str, RankChoice]
    rows: list[TargetRow]
    comparison: list[OutputComparison]
    params_before: int  # parameters of the target weights
    params_after: int
    model_params_before: int
    model_params_after: int
    guard: float = 0.0  # relative difference to the dense equivalent (rounding)
    # A large model's factor data, which ``model`` refers to: save the model while this lives.
    spill: SpillFolder | None = None

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
    return int(sum(math.prod(t.dims) for t in model.graph.initializer))


def target_rows(
    analysis: Analysis, ranks: dict[str, RankChoice], model: onnx.ModelProto
) -> list[TargetRow]:
    consts = constant_tensors(model)
    folder = external_dir(model)
    rows = []
    for t in analysis.targets:
        e = analysis.entries[t.name]
        choice = ranks[t.name]
        k = choice.rank
        measured = None
        if k is not None:
            a, c = e.spectrum.factors(k)
            measured = heldout_error(analysis, t, a, c, as_array(consts[t.weight], folder))
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


def output_guard(
    model: onnx.ModelProto, new_model: onnx.ModelProto, analysis: Analysis, factors
) -> float:
    """Relative difference between the rewritten model and the original with each chosen weight
    replaced by its dense product ``A C``: rounding only, unless the rewrite is wrong."""
    if not factors:
        return 0.0
    # A large model's outputs (a language model's logits) are large: one batch checks a rewrite.
    feeds = analysis.heldout_feeds[: 1 if external_dir(model) is not None else 2]
    probe = OutputErrorProbe(model, analysis.targets, feeds)
    try:
        expected = probe.outputs(dense_products(factors))
    finally:
        probe.close()
    if external_dir(model) is not None:
        release_free_memory()  # the dense products, before the rewritten model's session
    sums = PairSums()
    # Large weights are fed, not serialised: no copy of the model, and no protobuf 2 GB limit.
    sess = fed_session(new_model)
    for feed, ys in zip(feeds, expected, strict=True):
        for y, y_ref in zip(sess.run(probe.outputs_names, feed), ys, strict=True):
            sums.add(y_ref, y)
    del sess
    return sums.relative_l2()


def check_graph_of_lazy_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on a model whose data stay in files, without reading them: every
    external reference is pointed at one empty file (the checker wants a file, not its bytes)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="flarc-check-") as tmp:
        (Path(tmp) / "data").touch()
        for tensor in all_tensors(light):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "data"
        path = Path(tmp) / "model.onnx"
        path.write_bytes(light.SerializeToString())
        onnx.checker.check_model(str(path))


def check_model_any_size(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on ``model``; one over protobuf's 2 GB limit cannot be serialised for
    the in-memory check, so it is checked from a file with external data."""
    if external_dir(model) is not None:
        check_graph_of_lazy_model(model)
        return
    if tensor_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="flarc-check-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True)
        onnx.checker.check_model(str(path))


def compress(
    model: onnx.ModelProto,
    analysis: Analysis,
    options: RankOptions,
    force: bool = False,
    closed_loop: list[Feed] | None = None,
    compensate: bool = False,
    progress: Progress | None = None,
) -> CompressResult:
    """Choose ranks, rewrite the graph, check it, guard it, and compare it with the original.

    With ``closed_loop`` calibration feeds, the chosen targets are refactorized in closed loop
    (:mod:`flarc.rewrite.closed_loop`), with error compensation when ``compensate``.
    """
    ranks = choose_ranks(analysis, options, model, analysis.probe_feeds)
    if closed_loop:
        from flarc.rewrite.closed_loop import closed_loop_entries

        entries = closed_loop_entries(model, analysis, ranks, closed_loop, compensate, progress)
        analysis = dataclasses.replace(analysis, entries=entries)
    factors = lazy_factors(analysis, ranks)
    spill = None
    if external_dir(model) is not None:
        # A large model's factors go to disk as they are made; the new model refers to them.
        spill = SpillFolder(prefix="flarc-factors-")
        factor_file = FactorFile(spill.path, external_dir(model))
        try:
            new_model = factorize(model, analysis.targets, factors, factor_file.put)
        finally:
            factor_file.close()
    else:
        new_model = factorize(model, analysis.targets, dict(factors.items()))
    try:
        check_model_any_size(new_model)
    except Exception as exc:  # a rewrite bug, not bad input: say which check failed
        raise ModelError(f"compressed model fails onnx.checker: {exc}") from None
    if spill is not None:
        release_free_memory()
    guard = output_guard(model, new_model, analysis, factors)
    if spill is not None:
        release_free_memory()
    dtypes = {t.dtype for t in analysis.targets}
    tolerance = max(GUARD_TOLERANCE.get(d, 1e-3) for d in dtypes)
    if not guard <= tolerance:  # NaN included
        message = (
            f"output guard: the rewritten model differs from its own dense equivalent by {guard:.2e} "
            f"(tolerance {tolerance:.0e}), a sign of a rewrite bug, not of compression"
        )
        if not force:
            raise ModelError(message + "; not written (use --force to write it anyway)")
        log.warning("%s; written because of --force", message)
    if external_dir(model) is not None:
        release_free_memory()
        comparison = compare_streamed(model, new_model, analysis.heldout_feeds)
    else:
        comparison = compare_models(model, new_model, analysis.heldout_feeds)
    rows = target_rows(analysis, ranks, model)
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
        guard=guard,
        spill=spill,
    )
