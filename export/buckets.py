"""Rank buckets for progressive low-rank decoding (DESIGN.md section 6): one analysis, Fisher-
proportional ranks per budget, and a folder in which every bucket is a standalone ONNX model
while all weights are stored once.

Budget. Let ``r_max(t) = min(n_t, m_t)`` be target t's full rank (its factorization is then
exact). A bucket with budget ``b`` in (0, 1] has the total rank ``R(b) = b * sum_t r_max(t)``,
shared out as ``r_t = alpha_t / sum(alpha) * R(b)`` (FLRC) with each rank clipped to
``[min(align, r_max(t)), r_max(t)]`` and the surplus of clipped targets redistributed
proportionally over the others (water-filling), then rounded to a multiple of ``align`` and
clipped again. So budget 1.0 is every target at full rank (the dense model up to float
rounding) and budget 0.5 keeps half of the total rank, where the Fisher importance says.

Storage. For every target the factors of its largest bucket rank ``s`` are written to
``factors.bin`` as ``A^T [s, n]`` then ``C [s, m]`` (row-major, 64-byte aligned). Factors are
ordered by singular value, so bucket rank ``r`` is the row prefix ``A^T[:r]``, ``C[:r]``: a
contiguous byte range that the bucket's graph addresses through ONNX external data
``location/offset/length``. Non-target initializers of 1 KiB or more go once to ``dense.bin``.
A target ``Y = X B`` becomes::

    X2 = Reshape(X, [-1, n]);  mid = Gemm(X2, A^T_r, transB=1);  Y2 = MatMul(mid, C_r)
    Y  = Reshape(Y2, Concat(Shape(X)[:-1], [m]))

Gemm with ``transB=1`` reads ``A^T`` in place; ``MatMul(X, Transpose(A^T))`` would let
onnxruntime constant-fold the Transpose into a private copy per session. Gemm targets keep
their bias and ``beta`` on the second Gemm; their ``alpha`` is folded into the stored ``C``.
Conv targets are left dense.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flarc.calib.data import CalibrationSet
from flarc.core.errors import FlarcError, ModelError
from flarc.core.external import external_dir, tensor_array
from flarc.core.inputs import Feed
from flarc.core.modelio import prepare_for_save
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target, TargetSet, node_names
from flarc.core.version import __version__
from flarc.export.hf import CacheLayout, empty_cache, layout_from_onnx
from flarc.export.manifest import FORMAT, FORMAT_VERSION, Manifest, file_entries, write_manifest
from flarc.rewrite.spectrum import Spectrum

log = logging.getLogger(__name__)

BUDGET_DEFINITION = (
    "budget b: total rank R(b) = b * sum_t min(n_t, m_t) over all targets, shared by Fisher "
    "importance r_t = alpha_t/sum(alpha)*R(b), clipped to [align, min(n_t, m_t)] with the "
    "surplus redistributed, rounded to multiples of align; b = 1.0 is full rank (exact)"
)
ALIGN_BYTES = 64
DENSE_MIN_BYTES = 1024
FACTORS_FILE = "factors.bin"
DENSE_FILE = "dense.bin"


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


def allocate_ranks(
    alpha: dict[str, float], max_ranks: dict[str, int], budget: float, align: int = 8
) -> dict[str, int]:
    """FLRC ranks for one budget (module docstring): water-filled, aligned, clipped."""
    if align < 1:
        raise FlarcError(f"--align must be at least 1, got {align}")
    names = list(max_ranks)
    total = budget * sum(max_ranks.values())
    lo = {t: min(align, max_ranks[t]) for t in names}
    hi = {t: max_ranks[t] for t in names}
    weight = {t: max(0.0, float(alpha.get(t, 0.0))) for t in names}
    if not any(weight.values()):
        weight = dict.fromkeys(names, 1.0)  # no information: share evenly
    fixed: dict[str, float] = {}
    while len(fixed) < len(names):
        free = [t for t in names if t not in fixed]
        rest = total - sum(fixed.values())
        mass = sum(weight[t] for t in free)
        share = {t: (weight[t] / mass * rest if mass > 0 else rest / len(free)) for t in free}
        over = [t for t in free if share[t] > hi[t]]
        under = [t for t in free if share[t] < lo[t]]
        if over:
            # Capping first frees rank for the others, which may lift some above their floor.
            fixed.update({t: hi[t] for t in over})
        elif under:
            fixed.update({t: lo[t] for t in under})
        else:
            fixed.update(share)
    ranks = {}
    for t in names:
        r = round(fixed[t] / align) * align
        ranks[t] = min(hi[t], max(lo[t], r))
    return ranks


@dataclass
class BucketPlan:
    budget: float
    ranks: dict[str, int]

    @property
    def file(self) -> str:
        return f"bucket_{self.budget:g}.onnx"


def plan_buckets(
    alpha: dict[str, float], max_ranks: dict[str, int], budgets: list[float], align: int = 8
) -> list[BucketPlan]:
    return [BucketPlan(b, allocate_ranks(alpha, max_ranks, b, align)) for b in budgets]


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
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.dims.extend(dims)
    tensor.data_type = data_type
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


@dataclass
class StoredTarget:
    target: Target
    stored_rank: int
    at_offset: int
    c_offset: int
    data_type: int
    itemsize: int


def _write_factors(
    path: Path,
    targets: list[Target],
    spectra: dict[str, Spectrum],
    plans: list[BucketPlan],
    gemm_attrs: dict[str, dict],
    progress: Progress,
) -> list[StoredTarget]:
    """Every target's largest-bucket factors once: ``A^T [s, n]`` then ``C [s, m]``."""
    stored = []
    with open(path, "wb") as fh:
        for t in progress.track(targets, total=len(targets), description="writing factors"):
            s = max(p.ranks[t.name] for p in plans)
            a, c = spectra[t.name].factors(s)
            if t.op_type == "Gemm":
                c = c * float(gemm_attrs[t.name].get("alpha", 1.0))
            dtype = np.dtype(t.dtype)
            at_offset = _align(fh)
            fh.write(np.ascontiguousarray(a.T, dtype=dtype).tobytes())
            c_offset = _align(fh)
            fh.write(np.ascontiguousarray(c, dtype=dtype).tobytes())
            data_type = helper.np_dtype_to_tensor_dtype(dtype)
            stored.append(StoredTarget(t, s, at_offset, c_offset, data_type, dtype.itemsize))
        fh.flush()
        os.fsync(fh.fileno())
    return stored


class _Rewriter:
    """Builds a bucket graph (node structure shared by all buckets, dims per bucket)."""

    def __init__(self, model: onnx.ModelProto, targets: list[Target]) -> None:
        self.model = model
        self.targets = {t.name: t for t in targets if t.op_type in ("MatMul", "Gemm")}
        self.names = node_names(model)
        self.gemm: dict[str, dict] = {}
        for node, name in zip(model.graph.node, self.names, strict=True):
            if name in self.targets and node.op_type == "Gemm":
                self.gemm[name] = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    @staticmethod
    def at_name(t: Target) -> str:
        return f"{t.name}/lowrank_At"

    @staticmethod
    def c_name(t: Target) -> str:
        return f"{t.name}/lowrank_C"

    def nodes(self) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The rewritten node list and the small constants it adds (shape vectors)."""
        out: list[onnx.NodeProto] = []
        consts: list[onnx.TensorProto] = []
        shapes: dict[str, str] = {}  # activation -> its leading dims (shared by q, k and v)
        for node, name in zip(self.model.graph.node, self.names, strict=True):
            t = self.targets.get(name)
            if t is None:
                out.append(node)
                continue
            x, y = node.input[0], node.output[0]
            if t.op_type == "Gemm":
                attrs = self.gemm[name]
                bias = list(node.input[2:3])
                out.append(
                    helper.make_node(
                        "Gemm",
                        [x, self.at_name(t)],
                        [f"{t.name}/lowrank_mid"],
                        name=f"{t.name}/lowrank_A",
                        transA=int(attrs.get("transA", 0)),
                        transB=1,
                    )
                )
                out.append(
                    helper.make_node(
                        "Gemm",
                        [f"{t.name}/lowrank_mid", self.c_name(t), *bias],
                        [y],
                        name=f"{t.name}/lowrank_C",
                        beta=float(attrs.get("beta", 1.0)),
                    )
                )
                continue
            flat_shape = f"{t.name}/lowrank_flat_shape"
            consts.append(numpy_helper.from_array(np.array([-1, t.n], np.int64), flat_shape))
            if x not in shapes:
                lead = f"{x}/lowrank_lead"
                shapes[x] = lead
                consts.append(numpy_helper.from_array(np.array([0], np.int64), f"{lead}_start"))
                consts.append(numpy_helper.from_array(np.array([-1], np.int64), f"{lead}_end"))
                out.append(helper.make_node("Shape", [x], [f"{lead}_full"], name=f"{lead}/Shape"))
                out.append(
                    helper.make_node(
                        "Slice",
                        [f"{lead}_full", f"{lead}_start", f"{lead}_end"],
                        [lead],
                        name=f"{lead}/Slice",
                    )
                )
            out_m = f"{t.name}/lowrank_m"
            consts.append(numpy_helper.from_array(np.array([t.m], np.int64), out_m))
            pre = t.name
            out.extend(
                [
                    helper.make_node(
                        "Reshape",
                        [x, flat_shape],
                        [f"{pre}/lowrank_x2"],
                        name=f"{pre}/lowrank_flat",
                    ),
                    helper.make_node(
                        "Gemm",
                        [f"{pre}/lowrank_x2", self.at_name(t)],
                        [f"{pre}/lowrank_mid"],
                        name=f"{pre}/lowrank_A",
                        transB=1,
                    ),
                    helper.make_node(
                        "MatMul",
                        [f"{pre}/lowrank_mid", self.c_name(t)],
                        [f"{pre}/lowrank_y2"],
                        name=f"{pre}/lowrank_C",
                    ),
                    helper.make_node(
                        "Concat",
                        [shapes[x], out_m],
                        [f"{pre}/lowrank_yshape"],
                        name=f"{pre}/lowrank_yshape",
                        axis=0,
                    ),
                    helper.make_node(
                        "Reshape",
                        [f"{pre}/lowrank_y2", f"{pre}/lowrank_yshape"],
                        [y],
                        name=f"{pre}/lowrank_unflat",
                    ),
                ]
            )
        return _prune(out, {o.name for o in self.model.graph.output}), consts


def _prune(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes none of whose outputs is used (the Transposes that fed replaced weights)."""
    while True:
        used = {i for n in nodes for i in n.input} | graph_outputs
        kept = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


@dataclass
class BuildResult:
    manifest: Manifest
    plans: list[BucketPlan]
    alpha: dict[str, float]


def write_buckets(
    model: onnx.ModelProto,
    targets: list[Target],
    spectra: dict[str, Spectrum],
    alpha: dict[str, float],
    budgets: list[float],
    output: str | os.PathLike,
    align: int = 8,
    provenance: dict | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Write the bucket folder ``output`` (atomically: a temp folder, then one rename)."""
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
    max_ranks = {t.name: spectra[t.name].max_rank for t in usable}
    for t in usable:
        if max_ranks[t.name] < min(t.n, t.m):
            raise ModelError(
                f"{t.name}: spectrum holds {max_ranks[t.name]} of {min(t.n, t.m)} directions; "
                "analyse with full_rank=True"
            )
    budgets = sorted(budgets, reverse=True)
    plans = plan_buckets(alpha, max_ranks, budgets, align)
    rewriter = _Rewriter(model, usable)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        stored = _write_factors(tmp / FACTORS_FILE, usable, spectra, plans, rewriter.gemm, progress)
        nodes, consts = rewriter.nodes()
        dense, dense_params = _write_dense(tmp / DENSE_FILE, model, nodes, consts)
        bucket_rows = []
        for plan in progress.track(plans, total=len(plans), description="writing buckets"):
            graph_inits = [*dense, *consts]
            params = dense_params
            weight_bytes = sum(_nbytes(t) for t in dense)
            for st in stored:
                t, r = st.target, plan.ranks[st.target.name]
                graph_inits.append(
                    _external(
                        rewriter.at_name(t),
                        [r, t.n],
                        st.data_type,
                        FACTORS_FILE,
                        st.at_offset,
                        r * t.n * st.itemsize,
                    )
                )
                graph_inits.append(
                    _external(
                        rewriter.c_name(t),
                        [r, t.m],
                        st.data_type,
                        FACTORS_FILE,
                        st.c_offset,
                        r * t.m * st.itemsize,
                    )
                )
                params += r * (t.n + t.m)
                weight_bytes += r * (t.n + t.m) * st.itemsize
            bucket = _bucket_model(model, nodes, graph_inits, plan.budget)
            path = tmp / plan.file
            path.write_bytes(bucket.SerializeToString())
            try:
                onnx.checker.check_model(str(path))
            except Exception as exc:
                raise ModelError(f"{plan.file}: bucket graph fails onnx.checker: {exc}") from None
            bucket_rows.append(
                {
                    "budget": plan.budget,
                    "file": plan.file,
                    "total_rank": int(sum(plan.ranks.values())),
                    "ranks": plan.ranks,
                    "params": int(params),
                    "weight_bytes": int(weight_bytes),
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
                    "max_rank": max_ranks[st.target.name],
                    "stored_rank": st.stored_rank,
                    "alpha": float(alpha.get(st.target.name, 0.0)),
                    "at_offset": st.at_offset,
                    "c_offset": st.c_offset,
                }
                for st in stored
            ],
            "buckets": bucket_rows,
            "schedule_defaults": default_schedules(budgets),
            "files": file_entries(tmp, [FACTORS_FILE, DENSE_FILE, *(p.file for p in plans)]),
        }
        write_manifest(tmp, data)
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    from flarc.export.manifest import load_manifest

    return BuildResult(load_manifest(out, verify=False), plans, alpha)


def _nbytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data) if tensor.HasField("raw_data") else 0


def _write_dense(
    path: Path, model: onnx.ModelProto, nodes: list[onnx.NodeProto], consts: list
) -> tuple[list[onnx.TensorProto], int]:
    """Initializers the bucket graphs still use: large ones once into ``dense.bin``."""
    used = {i for n in nodes for i in n.input}
    for node in nodes:  # subgraph inputs (If/Loop bodies) count as uses too
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= {i for n in attr.g.node for i in n.input}
    own = {c.name for c in consts}
    folder = external_dir(model)
    tensors: list[onnx.TensorProto] = []
    params = 0
    with open(path, "wb") as fh:
        for init in model.graph.initializer:
            if init.name not in used or init.name in own:
                continue
            array = tensor_array(init, folder)  # a lazy model's: mapped from its file
            params += int(array.size) if np.issubdtype(array.dtype, np.floating) else 0
            data = np.ascontiguousarray(array).tobytes()
            if len(data) < DENSE_MIN_BYTES:
                small = onnx.TensorProto()
                small.CopyFrom(numpy_helper.from_array(array, init.name))
                tensors.append(small)
                continue
            offset = _align(fh)
            fh.write(data)
            tensors.append(
                _external(
                    init.name, list(array.shape), init.data_type, DENSE_FILE, offset, len(data)
                )
            )
        fh.flush()
        os.fsync(fh.fileno())
    return tensors, params


def _bucket_model(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: list, budget: float
) -> onnx.ModelProto:
    g = model.graph
    graph = helper.make_graph(
        nodes,
        f"{g.name or 'graph'}_bucket_{budget:g}",
        list(g.input),
        list(g.output),
        initializer=inits,
        value_info=list(g.value_info),
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.producer_name = "flarc"
    out.producer_version = __version__
    out.doc_string = f"flarc rank bucket, budget {budget:g}"
    out.metadata_props.extend(model.metadata_props)
    entry = out.metadata_props.add()
    entry.key, entry.value = "flarc.bucket_budget", f"{budget:g}"
    if model.functions:
        out.functions.extend(model.functions)
    return prepare_for_save(out)


def default_schedules(budgets: list[float]) -> dict[str, str]:
    """Schedule strings offered by default: the largest bucket, a staircase, an entropy rule."""
    ordered = sorted(budgets, reverse=True)
    steps = ",".join(f"{b:g}@{0 if i == 0 else 16 * 2 ** (i - 1)}" for i, b in enumerate(ordered))
    return {
        "static": f"static:{ordered[0]:g}",
        "steps": f"steps:{steps}",
        "entropy": "entropy:1.0:4.0",
    }


def _replace_folder(new: Path, out: Path) -> None:
    """Rename the finished temp folder onto ``out``; an old bucket folder is swapped out first."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


def calibration_for_lm(data: CalibrationSet, layout: CacheLayout) -> CalibrationSet:
    """Token batches with empty past tensors added (prefill statistics)."""
    return CalibrationSet(
        lm_feeds(data.calibration, layout), lm_feeds(data.heldout, layout), data.source
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
) -> BuildResult:
    """Analyse once (full-rank spectra), score targets by Fisher importance, write the buckets.

    ``data`` holds token batches (``input_ids``, ``attention_mask``, ``position_ids``); empty
    past tensors are added here. ``alpha`` given explicitly skips the Fisher pass.
    """
    from flarc.pipeline import AnalysisOptions, analyze

    progress = progress or NoProgress()
    layout = layout_from_onnx(model)
    data = calibration_for_lm(data, layout)
    options = analysis_options or AnalysisOptions()
    options.full_rank = True
    usable = TargetSet([t for t in targets.targets if t.op_type != "Conv"], targets.skipped)
    analysis = analyze(model, usable, data, options, progress=progress)
    provenance = dict(provenance or {})
    opts = dict(provenance.get("options", {}))
    opts["analysis"] = asdict(options)
    if alpha is None:
        from flarc.calib.fisher import fisher_importance

        fisher = fisher_importance(
            model,
            usable.targets,
            data.calibration,
            fisher_loss,
            analysis.mask_input,
            progress=progress,
        )
        alpha = fisher.alpha
        opts["fisher"] = fisher.description
    else:
        opts["fisher"] = "alpha given by the caller"
    opts["calibration_batches"] = len(data.calibration)
    provenance["options"] = opts
    spectra = {name: e.spectrum for name, e in analysis.entries.items()}
    return write_buckets(
        model, usable.targets, spectra, alpha, budgets, output, align, provenance, progress
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
