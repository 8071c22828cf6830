"""Per-target input statistics computed from the ONNX graph's own tensors.

For every distinct target input (q, k and v share one) the model is extended with nodes that
form the input rows ``X: [tokens, n]`` (float32 by default, ``PRECISION``) and reduce them to
the first-order sums of :class:`Moments`; onnxruntime returns those and the rows, whose Gram's
upper triangle is made in BLAS panel by panel (:func:`panel_product`: half a general product's
arithmetic, which onnxruntime's MatMul does not exploit, and the same bits on any thread count),
and shards are added in float64 (upper triangles, mirrored once).
Conv inputs pass through a patch extractor, a Conv with a one-hot kernel of the target's
geometry, so rows are im2col patches in the weight's (c, kh, kw) order. Rows at masked (padding) positions are dropped with ``Compress`` first
(before opset 9, which has no Compress, they are zeroed: a zero row adds nothing to any sum).
The graph is built in the model's own opset, from 7 up.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flarc.calib.carry import ActivationSpill, CarriedFeed, inputs_model, spill_activations
from flarc.calib.checkpoint import Checkpoint, feeds_digest
from flarc.calib.data import CalibrationSet
from flarc.calib.moments import LazyMoments, Moments, mirror_upper, panel_product
from flarc.core.executor import BlasThreads, Executor, LocalExecutor
from flarc.core.external import external_dir, split_large_initializers
from flarc.core.graphs import lift, prune_to_outputs, scope_of
from flarc.core.inputs import Feed, find_mask_input
from flarc.core.memory import release_free_memory
from flarc.core.modelio import is_large, model_opset, tensor_nbytes
from flarc.core.progress import NoProgress, Progress
from flarc.core.sessions import fed_session, session_options
from flarc.core.store import Store
from flarc.core.targets import ConvGeometry, Target

log = logging.getLogger(__name__)

FIELDS = ("gram", "count", "sum4", "sum1", "sum2x")
# The rows' type in the statistics graph: float32 rows give float32 products over a shard (twice
# float64's rate), added shard to shard in float64. On Qwen2.5-0.5B's README
# command the statistics took 46 s instead of 64 s with the same perplexities to two decimals.
PRECISION = "float32"
# A shard is the consecutive batches one product stacks (:meth:`StatisticsSession.moments`):
# as many as keep the rows of every statistic within SHARD_BYTES (estimated from the feeds),
# at most MAX_SHARD_BATCHES (:func:`shard_ends`). The partition depends on the data and plans
# alone, so every executor adds the same products in the same order.
SHARD_BYTES = 256 << 20
MAX_SHARD_BATCHES = 8


@dataclass
class StatPlan:
    """One statistic: which tensor, how rows are formed, and the graph outputs that hold it."""

    key: str
    input: str
    n: int
    conv: ConvGeometry | None = None
    channels: int = 0
    masked: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    partner: str | None = None  # a second tensor: adds the cross-statistic ``X^T P``
    # A weight read by several nodes: their other inputs (rows of all of them are summed),
    # whether each is masked, and their partners.
    extra: tuple[str, ...] = ()
    extra_masked: tuple[bool, ...] = ()
    extra_partners: tuple[str, ...] = ()
    transposed: bool = False  # the input is [n, tokens] (Gemm transA=1)
    graphs: tuple[tuple[str, ...], ...] = ()  # the If branch of each input (() is the main graph)

    @property
    def scopes(self) -> tuple[tuple[str, ...], ...]:
        """The graph of each input, in use order."""
        return self.graphs or ((),) * len(self.inputs)

    @property
    def fields(self) -> tuple[str, ...]:
        """The graph's outputs for this plan: the rows (their Gram is taken in BLAS, by the
        symmetric update), or the Gram itself where rows come from inside an If branch (summed
        there), then the other sums."""
        first, cross = ("gram", "cross") if self.graphs else ("rows", "partner_rows")
        return (first, *FIELDS[1:], *((cross,) if self.partner is not None else ()))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every tensor the rows come from, in use order."""
        return (self.input, *self.extra)

    @property
    def masks(self) -> tuple[bool, ...]:
        """Whether each input's rows are masked (padding left out)."""
        return (self.masked, *(self.extra_masked or (False,) * len(self.extra)))


def plan_statistics(
    targets: list[Target],
    input_of: Callable[[str], str] | None = None,
    partner: bool = False,
    prefix: str = "",
) -> list[StatPlan]:
    """One statistic per distinct :attr:`Target.stat_key` (q, k and v share their input), in
    target order. ``input_of`` renames the tensor the rows come from (the closed loop's twin);
    ``partner`` adds the cross-statistic with each target's own input."""
    plans: dict[str, StatPlan] = {}
    rename = input_of or (lambda name: name)
    for t in targets:
        if t.stat_key not in plans:
            channels = t.weight_shape[1] if t.conv is not None else 0
            first, *rest = [u.input for u in t.all_uses]
            plans[t.stat_key] = StatPlan(
                t.stat_key,
                rename(first),
                t.n,
                t.conv,
                channels,
                partner=first if partner else None,
                extra=tuple(rename(x) for x in rest),
                extra_partners=tuple(rest) if partner else (),
                transposed=t.transposed_input,
                graphs=tuple(u.graph for u in t.all_uses)
                if any(u.graph for u in t.all_uses)
                else (),
            )
    for i, plan in enumerate(plans.values()):
        names = (*FIELDS, "rows", "cross", "partner_rows")
        plan.outputs = {f: f"flarc_stats/{prefix}{i}/{f}" for f in names}
    return list(plans.values())


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


def intermediate_shapes(
    model: onnx.ModelProto,
    names: list[str],
    feed: Feed,
    workdir: Path | None = None,
    originals: dict[str, onnx.TensorProto] | None = None,
    graphs: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes of intermediate tensors on one feed (one extra forward pass, for the mask decision).

    ``model`` may hold stubs of large initializers (:func:`split_large_initializers`), their
    tensors in ``originals``; ``workdir`` is no longer needed. A tensor inside an If branch
    (``graphs`` names its branch) has its shape lifted out: ``()`` when the branch did not run.
    """
    graphs = graphs or {}
    graph_inputs = {i.name for i in model.graph.input}
    shapes = {n: tuple(feed[n].shape) for n in names if n in graph_inputs and n in feed}
    wanted = [n for n in names if n not in shapes]
    if not wanted:
        return shapes
    probe, more = split_large_initializers(model)
    del probe.graph.output[:]
    outputs = {}
    counter = [0]
    for n in wanted:
        if graphs.get(n):
            inner = _Builder(scope_of(probe, graphs[n]).graph, model_opset(probe), counter)
            shape = inner.node("Shape", [n], "shape_of")
            empty = np.zeros(0, np.int64)
            (outputs[n],) = lift(probe, graphs[n], [(shape, TensorProto.INT64, None, empty)])
        else:
            outputs[n] = n
    probe.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs.values())
    prune_to_outputs(probe.graph)
    sess = fed_session(probe, originals={**more, **(originals or {})})
    values = sess.run(list(outputs.values()), feed)
    for name, value in zip(outputs, values, strict=True):
        shapes[name] = tuple(int(d) for d in value) if graphs.get(name) else tuple(value.shape)
    return shapes


class _Builder:
    """Appends nodes to a graph, in the forms the model's opset accepts; builders made with
    :meth:`inside` for subgraphs share one name counter."""

    def __init__(
        self, graph: onnx.GraphProto, opset: int, counter: list[int] | None = None
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.counter = counter if counter is not None else [0]
        self.rows_shape: dict[int, str] = {}

    def inside(self, graph: onnx.GraphProto) -> _Builder:
        """A builder for a subgraph (its constants become the subgraph's initializers)."""
        return _Builder(graph, self.opset, self.counter)

    def name(self, hint: str) -> str:
        self.counter[0] += 1
        return f"flarc_stats/{hint}_{self.counter[0]}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(
        self, op: str, inputs: list[str], hint: str, output: str | None = None, **attrs
    ) -> str:
        out = output or self.name(hint)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def reduce(
        self, op: str, x: str, axes: list[int] | None, keepdims: int, output: str | None = None
    ) -> str:
        # ReduceSum takes axes as an input from opset 13, the other reductions from opset 18.
        axes_as_input = (op == "ReduceSum" and self.opset >= 13) or self.opset >= 18
        if axes is None:
            return self.node(op, [x], op, output, keepdims=keepdims)
        if axes_as_input:
            ax = self.const(np.array(axes, dtype=np.int64), "axes")
            return self.node(op, [x, ax], op, output, keepdims=keepdims)
        return self.node(op, [x], op, output, keepdims=keepdims, axes=axes)


def one_hot_kernel(channels: int, kernel: tuple[int, ...]) -> np.ndarray:
    """Conv weight ``E[(c, i, j), c, i, j] = 1``: a Conv with it emits im2col patches."""
    n = channels * int(np.prod(kernel))
    return np.eye(n, dtype=np.float32).reshape(n, channels, *kernel)


def build_statistics_model(
    model: onnx.ModelProto,
    plans: list[StatPlan],
    mask_input: str | None,
    precision: str = PRECISION,
) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are the statistics of ``plans``.

    Rows of a use inside an If branch are reduced inside that branch; the sums are lifted out
    (the other branch gives zero sums) and added to the other uses' in the main graph.
    """
    stats = onnx.ModelProto()
    stats.CopyFrom(model)
    graph = stats.graph
    del graph.output[:]
    main = _Builder(graph, model_opset(model))
    if any(p.graphs for p in plans):
        # A branch's Gram is onnxruntime's MatMul: float64, as the bits of a float32 product
        # could depend on its thread count (panel_product's guarantee covers Python's only).
        precision = "float64"
    acc_type = TensorProto.DOUBLE if precision == "float64" else TensorProto.FLOAT
    acc_np = np.float64 if precision == "float64" else np.float32
    mask_bool = mask_rows = None
    if mask_input and any(any(p.masks) for p in plans):
        b = main
        flat = b.node(
            "Reshape", [mask_input, b.const(np.array([-1], np.int64), "shape")], "mask_flat"
        )
        mask_bool = b.node("Cast", [flat], "mask_bool", to=TensorProto.BOOL)
        if b.opset < 9:  # no Compress yet: padded rows become zero rows, which add nothing
            column = b.const(np.array([-1, 1], np.int64), "column")
            as_acc = b.node("Cast", [mask_bool], "mask_acc", to=acc_type)
            mask_rows = b.node("Reshape", [as_acc, column], "mask_rows")

    def rows_of(
        b: _Builder, plan: StatPlan, x: str, masked: bool, output: str | None = None
    ) -> str:
        """The rows ``[tokens, n]`` of tensor ``x`` as the plan forms them, in accumulation type."""
        if plan.n not in b.rows_shape:
            b.rows_shape[plan.n] = b.const(np.array([-1, plan.n], np.int64), f"rows{plan.n}")
        if plan.transposed:  # Gemm transA=1 reads its activation as [n, tokens]
            x = b.node("Transpose", [x], "rows_first", perm=[1, 0])
        if plan.conv is not None:
            g = plan.conv
            xf = b.node("Cast", [x], "as_float", to=TensorProto.FLOAT)
            kernel = b.const(one_hot_kernel(plan.channels, g.kernel_shape), "patch_kernel")
            patches = b.node("Conv", [xf, kernel], "patches", **g.onnx_attrs())
            nd = len(g.kernel_shape)
            x = b.node("Transpose", [patches], "patches_last", perm=[0, *range(2, nd + 2), 1])
        rows = b.node("Reshape", [x, b.rows_shape[plan.n]], "rows")
        if masked and mask_rows is None:
            rows = b.node("Compress", [rows, mask_bool], "rows_kept", axis=0)
        zeroed = masked and mask_rows is not None
        rows = b.node("Cast", [rows], "rows_acc", None if zeroed else output, to=acc_type)
        if zeroed:
            rows = b.node("Mul", [rows, mask_rows], "rows_kept", output)
        return rows

    def all_rows(
        b: _Builder,
        plan: StatPlan,
        tensors: list[str],
        masks: list[bool],
        output: str | None = None,
    ) -> str:
        """The rows of the given uses of the plan's weight, one after the other."""
        if len(tensors) == 1:
            return rows_of(b, plan, tensors[0], masks[0], output)
        parts = [rows_of(b, plan, x, m) for x, m in zip(tensors, masks, strict=True)]
        return b.node("Concat", parts, "rows_all", output, axis=0)

    def count_of(
        b: _Builder, plan: StatPlan, xd: str, tensors: list[str], masks: list[bool], out: str | None
    ) -> str:
        """The number of rows that count: the rows' count, or (before opset 9) the mask's
        ones for masked inputs plus the rows of unmasked ones."""
        zero = b.const(np.array(0, np.int64), "zero")
        if mask_rows is None or not any(masks):
            shape = b.node("Shape", [xd], "shape")
            return b.node("Gather", [shape, zero], "count", output=out, axis=0)
        total = None
        for x, masked in zip(tensors, masks, strict=True):
            if masked:
                kept = b.reduce("ReduceSum", mask_rows, None, keepdims=0)
                part = b.node("Cast", [kept], "count_part", to=TensorProto.INT64)
            else:
                part = b.node(
                    "Gather",
                    [b.node("Shape", [rows_of(b, plan, x, False)], "shape"), zero],
                    "count_part",
                    axis=0,
                )
            total = part if total is None else b.node("Add", [total, part], "count_sum")
        return b.node("Identity", [total], "count", output=out)

    def sums(
        b: _Builder, plan: StatPlan, uses: list[int], out: dict[str, str] | None, rows: bool
    ) -> dict:
        """The fields of the plan over the rows of ``uses`` (indices into its inputs), into the
        names ``out`` (fresh names when None); the rows themselves instead of their Gram when
        ``rows``."""
        name = (lambda f: out[f]) if out is not None else (lambda f: None)
        tensors = [plan.inputs[i] for i in uses]
        masks = [plan.masks[i] for i in uses]
        xd = all_rows(b, plan, tensors, masks, name("rows") if rows else None)
        xt = b.node("Transpose", [xd], "rows_t", perm=[1, 0])
        if rows:  # the rows are an output themselves
            got = {"rows": xd}
        else:
            got = {"gram": b.node("MatMul", [xt, xd], "gram", output=name("gram"))}
        got["count"] = count_of(b, plan, xd, tensors, masks, name("count"))
        r2 = b.reduce("ReduceSumSquare", xd, [1], keepdims=1)
        got["sum4"] = b.reduce("ReduceSumSquare", r2, None, keepdims=0, output=name("sum4"))
        got["sum1"] = b.reduce("ReduceSum", xd, [0], keepdims=0, output=name("sum1"))
        weighted = b.node("Mul", [xd, r2], "r2x")
        got["sum2x"] = b.reduce("ReduceSum", weighted, [0], keepdims=0, output=name("sum2x"))
        if plan.partner is not None:
            # Cross-statistic X^T P of the plan's rows with the partner's rows at the same
            # positions: the partner's rows themselves when the rows are an output (BLAS's
            # product, as for the Gram).
            partners = [(plan.partner, *plan.extra_partners)[i] for i in uses]
            if rows:
                got["partner_rows"] = all_rows(b, plan, partners, masks, name("partner_rows"))
            else:
                prows = all_rows(b, plan, partners, masks)
                got["cross"] = b.node("MatMul", [xt, prows], "cross", output=name("cross"))
        return got

    def absent(plan: StatPlan, f: str) -> tuple[int, list[int], np.ndarray]:
        """Type, shape and zero value of one field (what a branch that did not run adds)."""
        if f == "count":
            return TensorProto.INT64, [], np.zeros((), np.int64)
        shape = {"gram": [plan.n, plan.n], "cross": [plan.n, plan.n], "sum1": [plan.n],
                 "sum2x": [plan.n]}.get(f, [])  # fmt: skip
        return acc_type, shape, np.zeros(shape, acc_np)

    for plan in plans:
        out = plan.outputs
        fields = list(plan.fields)
        by_graph: dict[tuple[str, ...], list[int]] = {}
        for i, path in enumerate(plan.scopes):
            by_graph.setdefault(path, []).append(i)
        if list(by_graph) == [()]:
            sums(main, plan, by_graph[()], out, rows=True)  # every use in the main graph
        else:
            parts: dict[str, list[str]] = {f: [] for f in fields}
            for path, uses in by_graph.items():
                scope = scope_of(stats, path)
                got = sums(main.inside(scope.graph) if path else main, plan, uses, None, False)
                lifted = lift(stats, path, [(got[f], *absent(plan, f)) for f in fields])
                for f, name in zip(fields, lifted, strict=True):
                    parts[f].append(name)
            for f in fields:
                total = parts[f][0]
                for more in parts[f][1:-1]:
                    total = main.node("Add", [total, more], f"{f}_sum")
                if len(parts[f]) > 1:
                    main.node("Add", [total, parts[f][-1]], f"{f}_sum", output=out[f])
                else:
                    main.node("Identity", [total], f, output=out[f])
        for f in fields:
            elem = TensorProto.INT64 if f == "count" else acc_type
            graph.output.append(helper.make_tensor_value_info(out[f], elem, None))
    prune_to_outputs(graph)
    return stats


def decide_masks(
    model: onnx.ModelProto,
    plans: list[StatPlan],
    sample_feed: Feed,
    mask_input: str | None = None,
    originals: dict[str, onnx.TensorProto] | None = None,
) -> str | None:
    """Set each plan's mask flags (an input whose rows line up with the attention mask's
    positions is masked), from one forward pass on ``sample_feed``; the mask input found."""
    found = find_mask_input(model, mask_input)
    if found is None or found not in sample_feed:
        return found
    candidates = [x for p in plans if p.conv is None for x in p.inputs]
    graphs = {x: g for p in plans for x, g in zip(p.inputs, p.scopes, strict=True)}
    shapes = intermediate_shapes(model, candidates, sample_feed, originals=originals, graphs=graphs)
    mark_masks(plans, shapes, tuple(sample_feed[found].shape))
    return found


def mark_masks(
    plans: list[StatPlan], shapes: Mapping[str, tuple[int, ...]], mask_shape: tuple[int, ...]
) -> None:
    """Set each plan's mask flags from the shapes of its inputs on one batch: an input laid out
    like the mask plus a feature axis is masked."""

    def spans_mask(p: StatPlan, x: str) -> bool:
        shape = shapes.get(x)
        return (
            p.conv is None
            and not p.transposed
            and shape is not None
            and len(shape) == len(mask_shape) + 1
            and shape[:-1] == mask_shape
        )

    for p in plans:
        p.masked = spans_mask(p, p.input)
        p.extra_masked = tuple(spans_mask(p, x) for x in p.extra)


class StatisticsSession:
    """One onnxruntime session that turns feeds into per-key :class:`Moments`."""

    def __init__(
        self,
        model: onnx.ModelProto,
        targets: list[Target],
        sample_feed: Feed,
        mask_input: str | None = None,
        precision: str = PRECISION,
        threads: int | None = None,
        plans: list[StatPlan] | None = None,
        originals: dict[str, onnx.TensorProto] | None = None,
        masks_decided: bool = False,
        arena: bool = False,
    ) -> None:
        """``originals``: the tensors of stubs in ``model`` (:func:`split_large_initializers`);
        ``masks_decided``: the plans' mask flags are already set (:func:`decide_masks`);
        ``arena``: keep onnxruntime's memory arena (a graph of the statistics nodes alone, whose
        buffers are few and reused every batch)."""
        self.plans = plans if plans is not None else plan_statistics(targets)
        # The statistics graph is built on a copy whose large weights are stubs, never copied.
        model, more = split_large_initializers(model)
        originals = {**more, **(originals or {})}
        if masks_decided:
            self.mask_input = find_mask_input(model, mask_input)
        else:
            self.mask_input = decide_masks(model, self.plans, sample_feed, mask_input, originals)
        stats_model = build_statistics_model(model, self.plans, self.mask_input, precision)
        # Without the arena, the large per-batch outputs go back to the system when freed;
        # pre-packed weight copies would put a large model's weights in memory a second time.
        opts = session_options(
            threads, arena=arena, prepacking=external_dir(stats_model) is None, spinning=False
        )
        self.session = fed_session(stats_model, opts, originals)
        del stats_model, model
        self.output_names = [p.outputs[f] for p in self.plans for f in p.fields]
        # Panels of the products run on the BLAS threads the session was made with, each pinned
        # to one thread through the libraries found once here.
        self.blas = BlasThreads()
        self.workers = self.blas.count()

    def run(self, feed: Feed) -> dict[str, Moments]:
        """One feed's :class:`Moments` (float64) per statistic key; only the upper triangle of
        each Gram is filled (:func:`reduce_shards` mirrors the totals)."""
        return self.moments([self.outputs(feed)])

    def outputs(self, feed: Feed) -> dict[str, dict[str, np.ndarray]]:
        """One feed's graph outputs per statistic key and field (:attr:`StatPlan.fields`): the
        rows, not yet multiplied."""
        values = dict(
            zip(self.output_names, self.session.run(self.output_names, feed), strict=True)
        )
        return {p.key: {f: values.pop(p.outputs[f]) for f in p.fields} for p in self.plans}

    def moments(
        self,
        batches: list[dict[str, dict[str, np.ndarray]]],
        partner_weights: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Moments]:
        """The :class:`Moments` of several feeds' :meth:`outputs` (consumed): each Gram (upper
        triangle) and cross-statistic is one product of the batches' rows stacked (a product
        over a few hundred rows is bound by memory traffic, not arithmetic: 2.3x the time of one
        over the same rows stacked for a 1536-wide input); the other sums add in batch order.
        A key in ``partner_weights`` gets its cross-statistic with the partner's rows times that
        matrix, ``X^T (P B)`` (a tall ``B``'s output: ``2 N n m`` operations, not ``N n^2``)."""
        partner_weights = partner_weights or {}
        out = {}
        for p in self.plans:
            # Each batch's arrays leave ``batches`` as they are stacked: one copy at a time.
            vs = [b.pop(p.key) for b in batches]
            rows = None
            if "rows" in vs[0]:
                rows = _stacked([v.pop("rows") for v in vs])
                gram = panel_product(rows, workers=self.workers, blas=self.blas)
            else:
                gram = _in_order([np.asarray(v["gram"], dtype=np.float64) for v in vs])
            cross = None
            if "partner_rows" in vs[0]:
                partner = _stacked([v.pop("partner_rows") for v in vs])
                if p.key in partner_weights:  # P B, back in the rows' type
                    product = panel_product(
                        partner.T, partner_weights[p.key], self.workers, self.blas
                    )
                    partner = product.astype(rows.dtype, copy=False)
                    del product
                cross = panel_product(rows, partner, self.workers, self.blas)
                del partner
            elif "cross" in vs[0]:
                cross = _in_order([np.asarray(v["cross"], dtype=np.float64) for v in vs])
            del rows
            sums = [(int(v["count"]), float(v["sum4"])) for v in vs]
            out[p.key] = Moments(
                gram=np.asarray(gram, dtype=np.float64),
                count=sum(c for c, _ in sums),
                sum4=_in_order([f for _, f in sums]),
                sum1=_in_order([np.asarray(v["sum1"], dtype=np.float64) for v in vs]),
                sum2x=_in_order([np.asarray(v["sum2x"], dtype=np.float64) for v in vs]),
                cross=None if cross is None else np.asarray(cross, dtype=np.float64),
            )
        return out

    def collect(
        self,
        feeds: Iterable[Feed],
        progress: Progress | None = None,
        description: str = "calibrating",
        checkpoint: Checkpoint | None = None,
    ) -> dict[str, Moments]:
        """Sum the moments of ``feeds`` in batch order, in this process (:func:`reduce_shards`;
        a statistic no row reached, one in an If branch that never ran, has count 0: the caller
        decides)."""
        return reduce_shards(
            self.plans,
            feeds,
            lambda shards: LocalExecutor().stream(lambda: self, shard_sums, shards),
            progress,
            description,
            checkpoint,
            mask_input=self.mask_input,
        )


def shard_sums(session: StatisticsSession, feeds: list[Feed]) -> dict[str, Moments]:
    """The moments of one shard of consecutive batches: products over their rows stacked."""
    return session.moments([session.outputs(feed) for feed in feeds])


def shard_ends(
    plans: list[StatPlan], feeds: list[Feed], mask_input: str | None = None
) -> list[int]:
    """Where each shard ends: consecutive batches, as many as keep every statistic's rows
    within ``SHARD_BYTES`` (in float64), at most ``MAX_SHARD_BATCHES``. A batch's rows are
    taken as its largest input's element count (a token model's positions; more than the
    patches or tokens of an image model, so the estimate errs toward smaller shards), or its
    unmasked positions for a masked statistic. Not a checkpoint's ``every``: a run resumed
    with another one adds the same products."""
    with_rows = [p for p in plans if not p.graphs]  # an If branch's Gram is summed in the graph
    masked = sum(p.n * (1 + (p.partner is not None)) for p in with_rows if all(p.masks))
    other = sum(p.n * (1 + (p.partner is not None)) for p in with_rows if not all(p.masks))
    ends, size, held = [], 0, 0
    for i, f in enumerate(feeds):
        positions = max((int(np.size(v)) for v in f.values()), default=1)
        kept = int(np.count_nonzero(f[mask_input])) if mask_input in f else positions
        nbytes = 8 * (kept * masked + positions * other)
        if size and (held + nbytes > SHARD_BYTES or size == MAX_SHARD_BATCHES):
            ends.append(i)
            size, held = 0, 0
        size, held = size + 1, held + nbytes
    return [*ends, len(feeds)] if feeds else []


def reduce_shards(
    plans: list[StatPlan],
    feeds: Iterable[Feed],
    run: Callable[[list[list[Feed]]], Iterable[dict[str, Moments]]],
    progress: Progress | None = None,
    description: str = "calibrating",
    checkpoint: Checkpoint | None = None,
    identity_feeds: list[Feed] | None = None,
    mask_input: str | None = None,
) -> dict[str, Moments]:
    """Sum the moments of ``feeds`` over shards of consecutive batches (:func:`shard_ends`):
    ``run`` gives each shard's :func:`shard_sums` in shard order (wherever it computes them),
    and they are added to float64 totals in that order, so every executor gives the same bits.

    With ``checkpoint``, the running totals are saved at the end of a shard once another
    ``every`` batches are done (and always after the last one) and, when resuming, the saved
    totals are the starting point and the loop continues at the next shard: the order of
    additions is unchanged, so the result is bit-identical. ``identity_feeds``: the batches
    the checkpoint's identity names (and the shards are sized from) when ``feeds`` are stand-ins
    for them (carried activations); ``mask_input``: the feeds' attention mask, if the plans use
    one.
    """
    progress = progress or NoProgress()
    feeds = list(feeds) if not isinstance(feeds, list) else feeds
    every = checkpoint.every if checkpoint is not None else None
    # Sized from the real batches (carried stand-ins would read their arrays from disk).
    ends = shard_ends(plans, identity_feeds or feeds, mask_input)
    totals = {p.key: Moments.zeros(p.n) for p in plans}
    start = 0
    if checkpoint is not None:
        if checkpoint.resumable:  # what a save must match to be resumed
            checkpoint.identity = {
                **checkpoint.identity,
                "plans": [
                    [p.key, p.input, p.n, p.masked, p.partner, *p.extra, *p.extra_masked]
                    for p in plans
                ],
                "feeds": feeds_digest(identity_feeds if identity_feeds is not None else feeds),
                "batches": len(feeds),
                # Other shards add in another order (one batch each, the batch order, is not
                # recorded).
                **({"shard_ends": ends} if len(ends) != len(feeds) else {}),
            }
        saved = checkpoint.load({p.key: p.n for p in plans})
        if saved is not None:
            start, totals = saved
    shards = [feeds[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True) if a >= start]
    done = start
    sums = progress.track(run(shards), total=len(shards), description=description)
    whole = True  # whether every total's Gram has both triangles
    fresh = set(totals) if start == 0 else set()  # zero totals: the first sums replace them
    for shard, shard_total in zip(shards, sums, strict=True):
        for key, moments in shard_total.items():
            if key in fresh:
                totals[key] = _owned(moments)
                fresh.discard(key)
            else:
                totals[key].add(moments)
        whole = False
        before, done = done, done + len(shard)
        crossed = every is not None and done // every > before // every
        if checkpoint is not None and (done == len(feeds) or crossed):
            whole = _mirror(totals)
            checkpoint.save(done, len(feeds), totals)
    if not whole:
        _mirror(totals)
    return totals


def _owned(moments: Moments) -> Moments:
    """``moments`` with arrays this process may add to (an executor's results can be read-only)."""
    arrays = {f: getattr(moments, f) for f in ("gram", "sum1", "sum2x", "cross")}
    if all(a is None or a.flags.writeable for a in arrays.values()):
        return moments
    return dataclasses.replace(
        moments, **{f: None if a is None else np.array(a) for f, a in arrays.items()}
    )


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """The rows of several batches as one array (the one batch's own array when alone)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def _in_order(values: list) -> np.ndarray | float:
    """Arrays or floats added in order, as :meth:`Moments.add` adds them (the first's own
    value when alone)."""
    return sum(values[1:], values[0])


def _mirror(totals: dict[str, Moments]) -> bool:
    """Complete every Gram from its upper triangle (the batches add only that one)."""
    for moments in totals.values():
        mirror_upper(moments.gram)
    return True


class StatisticsWorker:
    """What builds a :class:`StatisticsSession` in a worker (a Ray actor): the model's graph (a
    large model's weights stay in their files, which every worker maps) and the plans, whose
    mask flags the driver decided once."""

    def __init__(
        self,
        model: onnx.ModelProto,
        targets: list[Target],
        plans: list[StatPlan],
        mask_input: str | None,
        precision: str,
        threads: int | None,
    ) -> None:
        self.model = model
        self.targets = targets
        self.plans = plans
        self.mask_input = mask_input
        self.precision = precision
        self.threads = threads

    def __call__(self) -> StatisticsSession:
        return StatisticsSession(
            self.model,
            self.targets,
            {},
            self.mask_input,
            self.precision,
            self.threads,
            plans=self.plans,
            masks_decided=True,
        )


def collect_statistics(
    model: onnx.ModelProto,
    targets: list[Target],
    feeds: list[Feed],
    mask_input: str | None = None,
    precision: str = PRECISION,
    progress: Progress | None = None,
) -> dict[str, Moments]:
    """Moments of every target's input over ``feeds``, keyed by :attr:`Target.stat_key`."""
    return StatisticsSession(model, targets, feeds[0], mask_input, precision).collect(
        feeds, progress
    )


# Smallest Gram budget of one statistics pass when a large model's statistics are grouped.
STAT_GROUP_MIN_BYTES = 64 << 20


def collect_moments(
    model: onnx.ModelProto,
    targets: list[Target],
    data: CalibrationSet,
    checkpoint: Checkpoint,
    precision: str = PRECISION,
    mask_input: str | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    keep_inputs: bool = False,
) -> Collected:
    """Calibration and held-out moments of every statistic, and the mask input if one was used.

    The calibration sums are saved through ``checkpoint`` (the statistics of the store). The
    held-out ones are computed when first looked up, only for the statistics asked for
    (:class:`OnDemandMoments`), into the store's ``heldout`` groups; the carried inputs they
    read live as long as they do. A large model's statistics are gathered a group at a time,
    their Grams within an eighth of the model's size (held about three times over:
    onnxruntime's outputs, their copies, the sums), and each group is written to disk while the
    next one computes: memory holds two groups at most, not all. In this process the groups read
    the target inputs that one forward pass spilled to disk (:func:`carry_inputs`); on other
    executors each group re-runs the graph up to its layers. ``executor`` says where the batches
    run (:func:`sums_in`); the sums are the same bits on every executor. With ``keep_inputs``
    the carried target inputs outlive the statistics (:class:`Collected`): the caller owns them,
    and their folder goes with :meth:`CarriedInputs.close` or when they are garbage-collected.
    A model of one group carries nothing unless ``keep_inputs``: its graph computes the sums in
    the forward pass, and re-running it costs less than writing its inputs to disk and reading
    them back, but not less than running the original again beside a compensated closed loop's
    compressed twin (``flarc demo``, five interleaved pairs: 0.3-8.6 s less, 4.5 s on average, and
    0.1 GB less memory; ``bench/compress_time.py``'s MiniLM command 2.2 s less, five pairs).
    """
    store = checkpoint.store
    budget = max(STAT_GROUP_MIN_BYTES, tensor_nbytes(model) // 8) if is_large(model) else None
    groups = statistic_groups(plan_statistics(targets), budget)
    carried = None
    local = executor is None or isinstance(executor, LocalExecutor)
    if local and (len(groups) > 1 or keep_inputs):
        carried = carry_inputs(
            model, [p for g in groups for p in g], data, store, mask_input, progress
        )
    stats: dict[str, Moments] = {}
    mask = None
    # A group's sums are written to the store while the next group computes: its arrays stay
    # in memory until then (two groups at most), and are read from the store afterwards.
    writer = ThreadPoolExecutor(1, thread_name_prefix="flarc-store") if store.on_disk else None
    writing: Checkpoint | None = None
    try:
        for g, plans in enumerate(groups):
            label = f" ({g + 1}/{len(groups)})" if len(groups) > 1 else ""
            part = checkpoint if len(groups) == 1 else checkpoint.part(f"part{g}", writer)
            if carried is not None:
                found, run, calibration, _ = carried.sums(targets, plans, precision)
            else:
                found, run = sums_in(executor, model, targets, plans, data, mask_input, precision)
                calibration = data.calibration
            group = reduce_shards(
                plans,
                calibration,
                run,
                progress,
                "calibration statistics" + label,
                part,
                identity_feeds=data.calibration,
                mask_input=found,
            )
            if writing is not None:  # the saved sums, their Grams read when used
                stats.update(writing.saved())
                release_free_memory()
            writing = part if store.on_disk else None
            if any(any(p.masks) for p in plans):
                mask = found
            del run
            stats.update(group)
            del group
        if writing is not None:
            stats.update(writing.saved())
            release_free_memory()
    except BaseException:
        if carried is not None:
            carried.close()
        raise
    finally:
        if writer is not None:
            writer.shutdown()  # waits for a save in flight
    heldout = OnDemandMoments(
        [p for g in groups for p in g] if data.heldout else [],
        HeldoutSums(model, targets, data, store, budget, precision, mask_input, carried),
        progress,
    )
    return Collected(LazyMoments(stats), heldout, mask, carried if keep_inputs else None)


class HeldoutSums:
    """The held-out moments of some statistics (what :class:`OnDemandMoments` asks for), a
    group at a time as the calibration ones were: read from the carried inputs unless their
    owner closed them, else by the graph in this process (whatever executor the calibration
    ran on, which may be closed by now: the sums are the same bits); a large model's Grams go
    to ``store``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        targets: list[Target],
        data: CalibrationSet,
        store: Store,
        budget: int | None,
        precision: str,
        mask_input: str | None,
        carried: CarriedInputs | None,
    ) -> None:
        self.model, self.targets, self.data, self.store = model, targets, data, store
        self.budget, self.precision, self.mask_input = budget, precision, mask_input
        self.carried = carried
        self.saves = 0  # store groups written so far (each call writes new ones)

    def __call__(self, plans: list[StatPlan], progress: Progress) -> dict[str, Moments]:
        out: dict[str, Moments] = {}
        groups = statistic_groups(plans, self.budget)
        for g, group in enumerate(groups):
            label = f" ({g + 1}/{len(groups)})" if len(groups) > 1 else ""
            if self.carried is not None and not self.carried.spill.closed:
                found, run, _, feeds = self.carried.sums(self.targets, group, self.precision)
            else:
                # The plans are the calibration's, their mask flags set by its pass.
                found, run = sums_in(
                    None,
                    self.model,
                    self.targets,
                    group,
                    self.data,
                    self.mask_input,
                    self.precision,
                    masks_decided=True,
                )
                feeds = self.data.heldout
            sums = reduce_shards(
                group,
                feeds,
                run,
                progress,
                "held-out statistics" + label,
                identity_feeds=self.data.heldout,
                mask_input=found,
            )
            del run
            if self.store.on_disk:  # the Grams read when used, as the calibration ones
                held = Checkpoint(self.store, f"heldout/part{self.saves}", {})
                self.saves += 1
                held.save(len(feeds), len(feeds), sums)
                sums = held.saved()
                release_free_memory()
            out.update(sums)
        return out


class OnDemandMoments(LazyMoments):
    """Held-out moments computed when first needed, and only those asked for: the held-out
    errors read the statistics of factorized targets alone (on Qwen2.5-0.5B at a 20% cut,
    never the 4864-wide inputs of the down projections, whose float64 Grams are 90% of the
    arithmetic and bytes of all the held-out Grams). The sums are the same bits as when
    gathered with the calibration ones (the same graph and batches, added in the same order)."""

    def __init__(
        self,
        plans: list[StatPlan],
        compute: Callable[[list[StatPlan], Progress], dict[str, Moments]],
        progress: Progress | None = None,
    ) -> None:
        super().__init__({})
        self._plans = {p.key: p for p in plans}
        self._compute = compute
        self._progress = progress or NoProgress()

    def need(self, keys: Iterable[str]) -> None:
        wanted = [self._plans[k] for k in dict.fromkeys(keys) if k in self._plans]
        missing = [p for p in wanted if p.key not in self._items]
        if missing:
            self._items.update(self._compute(missing, self._progress))

    def __getitem__(self, key: str) -> Moments:
        if key not in self._plans:
            raise KeyError(key)
        self.need([key])
        return super().__getitem__(key)

    def raw(self) -> dict[str, Moments]:
        self.need(self._plans)
        return {k: self._items[k] for k in self._plans}

    def __iter__(self) -> Iterator[str]:
        return iter(self._plans)

    def __len__(self) -> int:
        return len(self._plans)


class Collected(NamedTuple):
    """What :func:`collect_moments` gathered."""

    stats: LazyMoments  # calibration moments
    heldout: LazyMoments  # held-out moments
    mask: str | None  # the mask input, if one was used
    inputs: CarriedInputs | None  # target inputs carried on disk, when kept


class CarriedInputs:
    """The target inputs of every calibration and held-out batch, spilled by one forward pass
    (:mod:`flarc.calib.carry`), and the mask input found; :meth:`sums` reduces one group."""

    def __init__(
        self, model: onnx.ModelProto, spill: ActivationSpill, data: CalibrationSet, mask: str | None
    ) -> None:
        self.model = model
        self.spill = spill
        self.data = data
        self.mask = mask

    def sums(
        self, targets: list[Target], plans: list[StatPlan], precision: str
    ) -> tuple[str | None, Callable, list[Feed], list[Feed]]:
        """What :func:`sums_in` gives for ``plans``, computed by a graph of their statistics
        nodes alone, and the stand-in feeds (calibration, held-out) that graph reads."""
        masked = self.mask is not None and any(any(p.masks) for p in plans)
        names = tuple(dict.fromkeys([x for p in plans for x in p.inputs], None))
        names += (self.mask,) if masked and self.mask not in names else ()
        graph_inputs = [i.name for i in self.model.graph.input if i.name in names]
        dtypes = {n: self.spill.dtypes[n] for n in names if n in self.spill.dtypes}
        base = inputs_model(self.model, dtypes, graph_inputs)
        session = StatisticsSession(
            base, targets, {}, self.mask, precision, plans=plans, masks_decided=True, arena=True
        )
        local = LocalExecutor()
        n = len(self.data.calibration)
        feeds = [
            CarriedFeed(self.spill, i, f, names)
            for i, f in enumerate([*self.data.calibration, *self.data.heldout])
        ]

        def run(shards: list[list[Feed]]) -> Iterable[dict[str, Moments]]:
            return local.stream(lambda: session, shard_sums, shards)

        return self.mask, run, feeds[:n], feeds[n:]

    def serves(self, feeds: list[Feed]) -> bool:
        """Whether ``feeds`` are the calibration batches these inputs were carried from."""
        ours = self.data.calibration
        return len(feeds) == len(ours) and all(a is b for a, b in zip(feeds, ours, strict=True))

    def serves_heldout(self, feeds: list[Feed]) -> bool:
        """Whether ``feeds`` are the first held-out batches these inputs were carried from."""
        ours = self.data.heldout
        return len(feeds) <= len(ours) and all(a is b for a, b in zip(feeds, ours, strict=False))

    def calibration_values(self, batch: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Tensors ``names`` of calibration batch ``batch`` as the original model computed them
        (graph inputs from the batch itself); a ``batch`` past the calibration's is held-out
        batch ``batch - len(calibration)``, as the spill numbers them."""
        count = len(self.data.calibration)
        feed = self.data.calibration[batch] if batch < count else self.data.heldout[batch - count]
        feed = CarriedFeed(self.spill, batch, feed, tuple(names))
        return {n: feed[n] for n in names}

    def close(self) -> None:
        self.spill.close()


def carry_inputs(
    model: onnx.ModelProto,
    plans: list[StatPlan],
    data: CalibrationSet,
    store: Store,
    mask_input: str | None,
    progress: Progress | None = None,
) -> CarriedInputs | None:
    """One forward pass over all batches that spills every plan's input (next to the store's
    arrays), with the plans' mask flags set from the spilled shapes; None where carrying does
    not apply (a use inside an If branch) or the disk has no room (the groups re-run the graph)."""
    if any(p.graphs for p in plans):
        return None
    light, originals = split_large_initializers(model)
    names = list(dict.fromkeys(x for p in plans for x in p.inputs))
    spill = spill_activations(
        light,
        names,
        [*data.calibration, *data.heldout],
        store.root,
        originals,
        progress=progress,
        description="calibration forward pass",
    )
    if spill is None:
        return None
    found = find_mask_input(light, mask_input)
    first = data.calibration[0]
    if found is not None and found in first:
        shapes = {**{n: tuple(first[n].shape) for n in names if n in first}, **spill.shapes}
        mark_masks(plans, shapes, tuple(first[found].shape))
    return CarriedInputs(light, spill, data, found)


def sums_in(
    executor: Executor | None,
    model: onnx.ModelProto,
    targets: list[Target],
    plans: list[StatPlan],
    data: CalibrationSet,
    mask_input: str | None,
    precision: str,
    masks_decided: bool = False,
) -> tuple[str | None, Callable[[list[list[Feed]]], Iterable[dict[str, Moments]]]]:
    """The mask input found, and what computes shards' sums for :func:`reduce_shards`: one
    session here for the local executor; otherwise one per worker of ``executor``, each built
    from the model's graph and these plans (masks decided here, once, unless
    ``masks_decided``: the plans' flags were set by an earlier pass over the same model)."""
    if executor is None or isinstance(executor, LocalExecutor):
        session = StatisticsSession(
            model,
            targets,
            data.calibration[0],
            mask_input,
            precision,
            plans=plans,
            masks_decided=masks_decided,
        )
        local = LocalExecutor()
        return session.mask_input, lambda shards: local.stream(lambda: session, shard_sums, shards)
    light, originals = split_large_initializers(model)
    if masks_decided:
        found = find_mask_input(light, mask_input)
    else:
        found = decide_masks(light, plans, data.calibration[0], mask_input, originals)
    del light, originals
    setup = StatisticsWorker(model, targets, plans, found, precision, executor.job_threads)
    return found, lambda shards: executor.stream(setup, shard_sums, shards)
