"""A graph run level by level: each segment runs once per batch on what earlier segments carried.

Closed-loop factorization needs the inputs of each level's targets as the partly compressed model
computes them (docs/design.md section 4). Running the graph from its inputs up to every level
costs a partial forward pass per level, quadratic in depth (96 levels on Qwen2.5-0.5B: about
48 forward passes); cut into segments it costs one. Segment ``i`` holds the nodes that the
inputs of level ``i`` need and no earlier segment ran. Its graph inputs are the model's inputs,
the weights of the targets it runs (fed: original or compressed), and the tensors earlier
segments computed, kept per batch until their last reader has run.

Targets are grouped by *level*: a target's level counts the targets on the longest path from the
inputs to it, so targets of one level never feed each other and share one segment.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from flarc.core.inputs import Feed
from flarc.core.sessions import FedSession, fed_session, session_options
from flarc.core.targets import Target, node_names


def target_levels(model: onnx.ModelProto, targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by level, in graph order: level L depends only on levels below L."""
    by_node = {t.name: t for t in targets}
    tensor_level: dict[str, int] = defaultdict(int)
    levels: dict[int, list[Target]] = defaultdict(list)
    for node, name in zip(model.graph.node, node_names(model), strict=True):
        level = max((tensor_level[i] for i in node.input if i), default=0)
        if name in by_node:
            levels[level].append(by_node[name])
            level += 1
        for o in node.output:
            tensor_level[o] = level
    return [levels[k] for k in sorted(levels)]


@dataclass
class Segment:
    """The nodes of one level's segment and the tensors that cross its borders."""

    nodes: list[onnx.NodeProto]
    wanted: list[str]  # the tensors the level asks for (wherever they are computed)
    carried_in: list[str]  # computed by earlier segments, read here
    outputs: list[str]  # computed here, wanted now or read later
    carried_out: list[str]  # computed here, read later
    released: list[str]  # carried tensors nothing after this segment reads


def cut_segments(graph: onnx.GraphProto, wanted: list[list[str]], fed: set[str]) -> list[Segment]:
    """Segment ``i`` computes ``wanted[i]`` from the model's inputs, its initializers, the fed
    tensors ``fed`` (their producers never run) and what segments before ``i`` computed."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o and o not in fed}
    owner = [-1] * len(nodes)
    for i, names in enumerate(wanted):
        stack = [producer[x] for x in names if x in producer]
        while stack:
            k = stack.pop()
            if owner[k] >= 0:
                continue
            owner[k] = i
            stack.extend(producer[x] for x in nodes[k].input if x in producer)
    made_in = {o: owner[k] for o, k in producer.items() if owner[k] >= 0}
    last: dict[str, int] = {}
    reads: list[list[str]] = [[] for _ in wanted]
    for k, node in enumerate(nodes):
        if owner[k] >= 0:
            reads[owner[k]].extend(x for x in node.input if x)
    for i in range(len(wanted)):
        for x in (*reads[i], *wanted[i]):
            if x in made_in:
                last[x] = max(last.get(x, -1), i)
    segments = []
    for i, names in enumerate(wanted):
        mine = [o for k, n in enumerate(nodes) if owner[k] == i for o in n.output if o in made_in]
        segments.append(
            Segment(
                nodes=[n for k, n in enumerate(nodes) if owner[k] == i],
                wanted=list(names),
                carried_in=list(dict.fromkeys(x for x in reads[i] if made_in.get(x, i) < i)),
                outputs=[o for o in mine if o in names or last.get(o, -1) > i],
                carried_out=[o for o in mine if last.get(o, -1) > i],
                released=[x for x, j in last.items() if j == i and made_in[x] < i],
            )
        )
    return segments


class SegmentedModel:
    """``model`` cut at its levels (:func:`cut_segments`), run one segment at a time over a fixed
    list of batches in one or more *states* (the same graph with other fed weights: the original
    model and its compressed twin), each state carrying its own tensors from segment to segment.

    ``model`` may hold stubs of large initializers (:func:`split_large_initializers`), whose
    tensors are ``originals``; ``weights`` declares the fed tensors, name -> (type, shape)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        wanted: list[list[str]],
        weights: Mapping[str, tuple[int, list[int]]],
        feeds: list[Feed],
        originals: dict[str, onnx.TensorProto] | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.weights = dict(weights)
        self.feeds = feeds
        self.originals = originals or {}
        self.threads = threads
        self.segments = cut_segments(model.graph, wanted, set(self.weights))
        self.initializers = {t.name: t for t in model.graph.initializer}
        # Before IR 4 initializers are listed as inputs too: those are not fed.
        self.inputs = {i.name: i for i in model.graph.input if i.name not in self.initializers}
        self.reads = [
            list(dict.fromkeys(x for n in s.nodes for x in n.input if x)) for s in self.segments
        ]
        self.carried: dict[str, list[dict[str, np.ndarray]]] = {}
        self.done = 0

    def session(self, i: int) -> FedSession | None:
        """An onnxruntime session for segment ``i`` (None when it has no nodes); its inputs are
        typed from what the states carry."""
        seg = self.segments[i]
        if not seg.nodes:
            return None
        reads = self.reads[i]
        sample = next(iter(self.carried.values()), [{}])[0]  # batch 0 of a state, typing only
        inputs = [self.inputs[x] for x in reads if x in self.inputs]
        inputs += [
            helper.make_tensor_value_info(x, *self.weights[x]) for x in reads if x in self.weights
        ]
        inputs += [
            helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(sample[x].dtype), None)
            for x in seg.carried_in
        ]
        graph = helper.make_graph(
            seg.nodes,
            f"{self.model.graph.name or 'model'}_segment{i}",
            inputs,
            [helper.make_empty_tensor_value_info(o) for o in seg.outputs],
            [self.initializers[x] for x in reads if x in self.initializers],
        )
        part = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        part.ir_version = self.model.ir_version
        part.metadata_props.extend(self.model.metadata_props)  # where a lazy model's data lies
        for f in self.model.functions:
            part.functions.append(f)
        options = session_options(self.threads, prepacking=False, spinning=False)
        return fed_session(part, options, self.originals)

    def run(
        self, i: int, states: Mapping[str, Mapping[str, np.ndarray]]
    ) -> Iterator[tuple[int, dict[str, dict[str, np.ndarray]]]]:
        """Run segment ``i`` (the next one) once per batch in each state (name -> the fed weights
        its nodes read) and yield ``(batch, {state: {wanted tensor: value}})`` batch by batch."""
        if i != self.done:
            raise ValueError(f"segment {i} asked for, segment {self.done} is next")
        seg = self.segments[i]
        session = self.session(i)
        for name in states:
            self.carried.setdefault(name, [{} for _ in self.feeds])
        for b, feed in enumerate(self.feeds):
            got = {}
            for name, weights in states.items():
                carried = self.carried[name][b]
                values = {}
                if session is not None:
                    given = {x: feed[x] for x in self.reads[i] if x in self.inputs}
                    given.update({x: weights[x] for x in self.reads[i] if x in self.weights})
                    given.update({x: carried[x] for x in seg.carried_in})
                    values = dict(zip(seg.outputs, session.run(seg.outputs, given), strict=True))
                got[name] = {x: _lookup(x, values, carried, feed) for x in seg.wanted}
                for x in seg.released:
                    carried.pop(x, None)
                carried.update({x: values[x] for x in seg.carried_out})
            yield b, got
        self.done += 1


def _lookup(
    name: str, values: Mapping[str, np.ndarray], carried: Mapping, feed: Feed
) -> np.ndarray:
    if name in values:
        return values[name]
    if name in carried:
        return carried[name]
    return feed[name]
