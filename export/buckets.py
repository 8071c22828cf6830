"""Rank buckets for progressive low-rank decoding (docs/design.md section 9): one analysis, ranks per
budget from the one allocator, and a folder in which every bucket is a standalone ONNX model while
all weights are stored once.

Budget. A bucket's budget is the fraction of the targets' dense parameters it keeps, the unit of
every budget in flarc (``--budget``). Below 1, ranks come from the default rule of compress, the
global allocation weighted by K-FAC sensitivities (:func:`flarc.rewrite.allocate.global_ranks`),
which keeps a target dense where its factors would cost more error than they save. Nested: a
target's rank never grows from a bucket to a smaller one (dense counts as the largest rank; a
factorized target is never dense again), so every bucket's factors are row prefixes of the
largest factorized rank. A target dense in a larger bucket and factorized in a smaller one is
stored twice (its weight and its factors); those parameters stay within ``spare`` x the largest
bucket's target parameters (a price on them in the allocation, bisected). With
``allocate="fisher"``, ranks are FLRC's Fisher allocation
(:func:`flarc.rewrite.allocate.fisher_ranks`). Either way each rank is a multiple of ``align``
below ``k_equiv``, so every factorized target is smaller than its dense weight. A budget of 1.0
keeps everything: the bucket is the dense model (its targets keep their original weights).

Storage. For every target factorized in some bucket, the factors of its largest bucket rank
``s`` are written to ``factors.bin`` as ``A^T [s, n]`` then ``C [s, m]`` (row-major, 64-byte
aligned). Factors are ordered by singular value, so bucket rank ``r`` is the row prefix
``A^T[:r]``, ``C[:r]``: a contiguous byte range that the bucket's graph addresses through ONNX
external data ``location/offset/length``. Every other initializer a bucket uses (a dense target's
weight included) goes once to ``dense.bin``. The graphs are written by the one factor-pair
writer in its row-prefix form (:mod:`flarc.rewrite.pairs`). Conv targets stay dense.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flarc.calib.data import CalibrationSet
from flarc.core.errors import FlarcError, ModelError
from flarc.core.external import external_dir, is_external, tensor_array
from flarc.core.files import atomic_folder
from flarc.core.inputs import Feed
from flarc.core.modelio import prepare_for_save
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target
from flarc.core.version import __version__
from flarc.export.hf import CacheLayout, empty_cache, layout_from_onnx
from flarc.export.manifest import FORMAT, FORMAT_VERSION, Manifest, file_entries, write_manifest
from flarc.rewrite.allocate import fisher_ranks, global_ranks
from flarc.rewrite.pairs import factorize
from flarc.rewrite.spectrum import Spectrum

log = logging.getLogger(__name__)

BUDGET_DEFINITION = (
    "budget b: the fraction of the targets' dense parameters a bucket keeps; b < 1: ranks of the "
    "global allocation weighted by K-FAC sensitivities (a target may stay dense), each bucket's "
    "ranks at most the next larger one's, dense counting as the largest (or FLRC's "
    "r_t ~ alpha_t with allocate fisher), multiples of align below k_equiv; "
    "b = 1.0: the dense targets (original weights)"
)
ALIGN_BYTES = 64
DENSE_MIN_BYTES = 1024
FACTORS_FILE = "factors.bin"
DENSE_FILE = "dense.bin"
SPARE = 0.05  # weights stored twice: 0.05 x the largest bucket's target parameters at most


def parse_budgets(text: str) -> list[float]:
    """``"1.0,0.8,0.6"`` -> [1.0, 0.8, 0.6] (distinct, each in (0, 1], largest first)."""
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlarcError(f"--budgets '{text}': expected comma-separated numbers") from None
    if not budgets:
        raise FlarcError("--budgets: no budget given")
    for b in budgets:
        if not 0 < b <= 1:
            raise FlarcError(f"--budgets: {b} is outside (0, 1]")
    if len({round(b, 6) for b in budgets}) != len(budgets):
        raise FlarcError(f"--budgets '{text}': a budget is repeated")
    return sorted(budgets, reverse=True)


@dataclass
class BucketPlan:
    """One bucket: its budget and every target's rank (None: dense)."""

    budget: float
    ranks: dict[str, int | None]

    @property
    def file(self) -> str:
        return f"bucket_{self.budget:g}.onnx"


def plan_buckets(
    targets: list[Target],
    budgets: list[float],
    align: int = 8,
    spectra: Mapping[str, Spectrum] | None = None,
    weights: Mapping[str, float] | None = None,
    alpha: Mapping[str, float] | None = None,
    spare: float = SPARE,
) -> list[BucketPlan]:
    """The ranks of every bucket (module doc), largest budget first: FLRC's when ``alpha`` is
    given, else the nested global allocation over ``spectra`` weighted by ``weights``, in which
    the parameters of targets stored twice (dense in a larger bucket, factorized in a smaller
    one) stay within ``spare`` x the largest bucket below 1.0's target parameters.

    The global allocation runs from the smallest bucket up, where the budget is tightest: it is
    free there, and each larger bucket may raise a rank or turn a factorized target dense."""
    if alpha is None and spectra is None:
        raise ValueError("plan_buckets needs spectra (global allocation) or alpha (FLRC)")
    if spare < 0:
        raise ValueError(f"spare {spare} < 0")
    ordered = sorted(budgets, reverse=True)
    plans = [BucketPlan(b, dict.fromkeys((t.name for t in targets), None)) for b in ordered]
    below = [p for p in plans if p.budget < 1.0]  # 1.0 keeps the dense targets
    if alpha is not None:
        for plan in below:
            choices = fisher_ranks(targets, alpha, plan.budget, align)
            plan.ranks = {name: c.rank for name, c in choices.items()}
        return plans
    room = spare * below[0].budget * sum(t.params for t in targets) if below else 0.0
    floors: dict[str, int | None] | None = None  # the next smaller bucket's ranks
    for plan in reversed(below):
        plan.ranks, twice = _nested_ranks(
            targets, plan.budget, align, spectra, weights, floors, room
        )
        room -= twice
        floors = plan.ranks
    return plans


def _nested_ranks(
    targets: list[Target],
    budget: float,
    align: int,
    spectra: Mapping[str, Spectrum],
    weights: Mapping[str, float] | None,
    floors: Mapping[str, int | None] | None,
    room: float,
) -> tuple[dict[str, int | None], float]:
    """One bucket's ranks above the next smaller bucket's ``floors`` (an int: at least that rank,
    or dense; None: dense there, so dense here), and the parameters it newly stores twice.

    A target factorized at rank k below and dense here keeps its k-rank factors beside its
    weight. While those exceed ``room`` they are priced: the allocation minimises the weighted
    error plus ``mu`` x the parameters stored twice, with the smallest ``mu`` that fits
    (bisected on a log scale); a large enough ``mu`` always fits, since staying factorized is
    always allowed."""
    if floors is None:
        choices = global_ranks(targets, spectra, budget, align, weights=weights)
        return {name: c.rank for name, c in choices.items()}, 0.0
    below = dict(floors)

    def allowed(t: Target, k: int | None) -> bool:
        low = below[t.name]
        return k is None if low is None else k is None or k >= low

    def plan(mu: float) -> tuple[dict[str, int | None], float]:
        def penalty(t: Target, k: int | None) -> float:
            low = below[t.name]
            return mu * t.rank_params(low) if k is None and low is not None else 0.0

        choices = global_ranks(
            targets, spectra, budget, align, weights=weights, allowed=allowed, penalty=penalty
        )
        ranks = {name: c.rank for name, c in choices.items()}
        twice = sum(
            t.rank_params(low)
            for t in targets
            if ranks[t.name] is None and (low := below[t.name]) is not None
        )
        return ranks, twice

    best = plan(0.0)
    if best[1] <= room:
        return best
    # The price at which storing a target's factors twice weighs as much as their error.
    scale = max(
        (1.0 if weights is None else float(weights[t.name]))
        * spectra[t.name].error(low)
        / t.rank_params(low)
        for t in targets
        if (low := below[t.name]) is not None
    )
    lo, hi = (math.log(max(scale, 1e-300)) + d for d in (-14.0, 14.0))  # e^14 ~ 1e6
    best = plan(math.exp(hi))
    for _ in range(24):
        mid = (lo + hi) / 2
        ranks, twice = plan(math.exp(mid))
        if twice <= room:
            hi, best = mid, (ranks, twice)
        else:
            lo = mid
    if best[1] > room:  # not expected: a factorized target may always stay factorized
        log.warning("bucket %g: %d parameters stored twice, over the spare", budget, best[1])
    return best


def lm_feeds(feeds: list[Feed], layout: CacheLayout) -> list[Feed]:
    """Add empty past tensors (``past_seq = 0``) to token batches, so prefill is what is seen."""
    out = []
    for feed in feeds:
        batch = next(iter(feed.values())).shape[0]
        extra = {k: v for k, v in empty_cache(layout, batch).items() if k not in feed}
        out.append({**feed, **extra})
    return out


def _align(fh) -> int:
    pos = fh.tell()
    pad = (-pos) % ALIGN_BYTES
    if pad:
        fh.write(b"\0" * pad)
    return pos + pad


def _external(name: str, dims: list[int], data_type: int, location: str, offset: int, length: int):
    tensor = onnx.TensorProto(name=name, dims=dims, data_type=data_type)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


@dataclass
class StoredTarget:
    """Where a target's largest factors are in ``factors.bin``."""

    target: Target
    stored_rank: int
    at_offset: int
    c_offset: int

    @property
    def itemsize(self) -> int:
        return np.dtype(self.target.dtype).itemsize


def _write_factors(
    path: Path,
    targets: list[Target],
    spectra: dict[str, Spectrum],
    largest: dict[str, int],
    progress: Progress,
) -> dict[str, StoredTarget]:
    """Every factorized target's factors at its ``largest`` rank, once: ``A^T [s, n]`` then
    ``C [s, m]``."""
    stored = {}
    with open(path, "wb") as fh:
        for t in progress.track(targets, total=len(targets), description="writing factors"):
            if t.name not in largest:
                continue
            s = largest[t.name]
            a, c = spectra[t.name].factors(s)
            dtype = np.dtype(t.dtype)
            at_offset = _align(fh)
            fh.write(np.ascontiguousarray(a.T, dtype=dtype).tobytes())
            c_offset = _align(fh)
            fh.write(np.ascontiguousarray(c, dtype=dtype).tobytes())
            stored[t.name] = StoredTarget(t, s, at_offset, c_offset)
        fh.flush()
        os.fsync(fh.fileno())
    return stored


def _write_dense(path: Path, model: onnx.ModelProto, skip: set[str]) -> dict[str, onnx.TensorProto]:
    """Initializers of ``model`` (but ``skip``) of 1 KiB or more, once into ``dense.bin``; the
    references the bucket graphs use instead of them."""
    folder = external_dir(model)
    refs: dict[str, onnx.TensorProto] = {}
    with open(path, "wb") as fh:
        for init in model.graph.initializer:
            if init.name in skip:
                continue
            array = tensor_array(init, folder)  # a lazy model's: mapped from its file
            data = np.ascontiguousarray(array).tobytes()
            if len(data) < DENSE_MIN_BYTES:
                small = onnx.TensorProto()
                small.CopyFrom(numpy_helper.from_array(array, init.name))
                refs[init.name] = small
                continue
            offset = _align(fh)
            fh.write(data)
            refs[init.name] = _external(
                init.name, list(array.shape), init.data_type, DENSE_FILE, offset, len(data)
            )
        fh.flush()
        os.fsync(fh.fileno())
    return refs


def _factor_views(stored: dict[str, StoredTarget], path: Path, plan: BucketPlan) -> dict:
    """``name -> (A, C)`` of the bucket's ranks as views of ``factors.bin`` (never read here)."""
    out = {}
    for name, st in stored.items():
        r = plan.ranks[name]
        if r is None:
            continue
        t, dtype = st.target, np.dtype(st.target.dtype)
        at = np.memmap(path, dtype, "r", st.at_offset, (r, t.n))
        c = np.memmap(path, dtype, "r", st.c_offset, (r, t.m))
        out[name] = (at.T, c)
    return out


def _bucket_model(
    model: onnx.ModelProto,
    targets: list[Target],
    plan: BucketPlan,
    stored: dict[str, StoredTarget],
    dense: dict[str, onnx.TensorProto],
    factors_path: Path,
) -> onnx.ModelProto:
    """The graph of one bucket: factors addressed as row prefixes, the rest in ``dense.bin``."""

    def reference(name: str, value: np.ndarray) -> onnx.TensorProto:
        target, _, kind = name.rpartition("/lowrank_")
        st = stored[target]
        offset = st.at_offset if kind == "At" else st.c_offset
        return _external(
            name,
            list(value.shape),
            helper.np_dtype_to_tensor_dtype(value.dtype),
            FACTORS_FILE,
            offset,
            value.nbytes,
        )

    views = _factor_views(stored, factors_path, plan)
    out = factorize(model, targets, views, reference, prefix_rows=True, restore=False)
    for init in out.graph.initializer:
        if init.name in dense:
            init.CopyFrom(dense[init.name])
        elif not is_external(init) and not init.HasField("raw_data") and init.dims:
            raise ModelError(f"bucket {plan.budget:g}: initializer '{init.name}' has no data")
    out.graph.name = f"{model.graph.name or 'graph'}_bucket_{plan.budget:g}"
    out.producer_name = "flarc"
    out.producer_version = __version__
    out.doc_string = f"flarc rank bucket, budget {plan.budget:g}"
    out.metadata_props.add(key="flarc.bucket_budget", value=f"{plan.budget:g}")
    return prepare_for_save(out)


def _nbytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data) if tensor.HasField("raw_data") else 0


@dataclass
class BuildResult:
    """The written folder's manifest, the plans and the importances they were made from."""

    manifest: Manifest
    plans: list[BucketPlan]
    importance: dict[str, float]  # FLRC alpha or K-FAC sensitivity per target


def write_buckets(
    model: onnx.ModelProto,
    targets: list[Target],
    spectra: dict[str, Spectrum],
    budgets: list[float],
    output: str | os.PathLike,
    align: int = 8,
    provenance: dict | None = None,
    progress: Progress | None = None,
    weights: Mapping[str, float] | None = None,
    alpha: Mapping[str, float] | None = None,
    refit: Callable[[dict[str, int]], Mapping[str, Spectrum]] | None = None,
    spare: float = SPARE,
) -> BuildResult:
    """Write the bucket folder ``output`` (atomically: a temp folder, then one rename); ranks
    from :func:`plan_buckets` (``weights``: K-FAC sensitivities; ``alpha``: FLRC instead;
    ``spare``: parameters stored twice) on ``spectra``. ``refit``, given each factorized
    target's largest factorized rank, returns the spectra the factors are cut from instead (each
    kept at least to that rank): the closed loop, fitted once at those ranks, every bucket's
    factors a row prefix of it."""
    progress = progress or NoProgress()
    out = Path(output)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise FlarcError(f"{out}: exists and is not a bucket folder; refusing to overwrite it")
    if not out.parent.is_dir():
        raise FlarcError(f"{out}: output folder '{out.parent}' does not exist")
    layout = layout_from_onnx(model)
    usable = [t for t in targets if t.op_type in ("MatMul", "Gemm")]
    for t in targets:
        if t not in usable:
            log.warning("%s: %s targets stay dense in buckets", t.name, t.op_type)
    if not usable:
        raise ModelError("no MatMul/Gemm targets to put in buckets")
    budgets = sorted(budgets, reverse=True)
    plans = plan_buckets(usable, budgets, align, spectra, weights, alpha, spare)
    # What ranked the targets: FLRC's alpha, or the K-FAC sensitivity (empty: weighted alike).
    importance = dict(alpha if alpha is not None else weights or {})
    largest = {  # each factorized target's largest rank: its stored factors
        t.name: max(r for p in plans if (r := p.ranks[t.name]) is not None)
        for t in usable
        if any(p.ranks[t.name] is not None for p in plans)
    }
    if refit is not None:
        spectra = {**spectra, **refit(largest)}
    with atomic_folder(out) as tmp:
        stored = _write_factors(tmp / FACTORS_FILE, usable, spectra, largest, progress)
        factorized_everywhere = {
            st.target.weight
            for st in stored.values()
            if all(p.ranks[st.target.name] is not None for p in plans)
        }
        dense = _write_dense(tmp / DENSE_FILE, model, factorized_everywhere)
        bucket_rows = []
        for plan in progress.track(plans, total=len(plans), description="writing buckets"):
            bucket = _bucket_model(model, usable, plan, stored, dense, tmp / FACTORS_FILE)
            path = tmp / plan.file
            path.write_bytes(bucket.SerializeToString())
            try:
                onnx.checker.check_model(str(path))
            except Exception as exc:
                raise ModelError(f"{plan.file}: bucket graph fails onnx.checker: {exc}") from None
            inits = bucket.graph.initializer
            bucket_rows.append(
                {
                    "budget": plan.budget,
                    "file": plan.file,
                    "total_rank": int(sum(r for r in plan.ranks.values() if r is not None)),
                    "ranks": plan.ranks,
                    "params": int(sum(math.prod(t.dims) for t in inits if _is_float(t))),
                    "weight_bytes": int(sum(_nbytes(t) for t in inits)),
                }
            )
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "flarc_version": __version__,
            "source": dict((provenance or {}).get("source", {})),
            "options": {
                **(provenance or {}).get("options", {}),
                "budgets": budgets,
                "align": align,
                "spare": spare,
            },
            "budget_definition": BUDGET_DEFINITION,
            "cache": {
                **asdict(layout),
                "past": layout.past_names(),
                "present": layout.present_names(),
            },
            "weights": {"factors": FACTORS_FILE, "dense": DENSE_FILE},
            "targets": [
                {
                    "name": st.target.name,
                    "op_type": st.target.op_type,
                    "n": st.target.n,
                    "m": st.target.m,
                    "dtype": st.target.dtype,
                    "stored_rank": st.stored_rank,
                    "importance": float(importance.get(st.target.name, 0.0)),
                    "at_offset": st.at_offset,
                    "c_offset": st.c_offset,
                }
                for st in stored.values()
            ],
            "buckets": bucket_rows,
            "schedule_defaults": default_schedules(budgets),
            "files": file_entries(tmp, [FACTORS_FILE, DENSE_FILE, *(p.file for p in plans)]),
        }
        write_manifest(tmp, data)
    from flarc.export.manifest import load_manifest

    return BuildResult(load_manifest(out, verify=False), plans, importance)


def _is_float(tensor: onnx.TensorProto) -> bool:
    return np.issubdtype(helper.tensor_dtype_to_np_dtype(tensor.data_type), np.floating)


def default_schedules(budgets: list[float]) -> dict[str, str]:
    """Schedule strings offered by default: the largest bucket, a staircase, an entropy rule."""
    ordered = sorted(budgets, reverse=True)
    steps = ",".join(f"{b:g}@{0 if i == 0 else 16 * 2 ** (i - 1)}" for i, b in enumerate(ordered))
    return {
        "static": f"static:{ordered[0]:g}",
        "steps": f"steps:{steps}",
        "entropy": "entropy:1.0:4.0",
    }


def calibration_for_lm(data: CalibrationSet, layout: CacheLayout) -> CalibrationSet:
    """Token batches with empty past tensors added (prefill statistics)."""
    return CalibrationSet(
        lm_feeds(data.calibration, layout), lm_feeds(data.heldout, layout), data.source
    )


def read_factor_rows(manifest: Manifest, target: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A^T[:rank], C[:rank])`` of ``target`` read from ``factors.bin`` (for checks and tests)."""
    entry = next((t for t in manifest.data["targets"] if t["name"] == target), None)
    if entry is None:
        raise KeyError(target)
    dtype = np.dtype(entry["dtype"])
    path = manifest.path(manifest.data["weights"]["factors"])
    at = np.fromfile(path, dtype, count=rank * entry["n"], offset=entry["at_offset"])
    c = np.fromfile(path, dtype, count=rank * entry["m"], offset=entry["c_offset"])
    return at.reshape(rank, entry["n"]), c.reshape(rank, entry["m"])
