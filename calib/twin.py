"""The original model and its partly compressed twin side by side in one graph (closed loop).

The twin is a renamed copy of every node whose target weights are graph inputs: feeding the
dense products ``A C`` of the targets already factorized makes it compute what the
compressed model will compute, and feeding the original weights makes it the original. One
statistics graph over both yields ``X_comp^T X_comp`` and ``X_comp^T X_orig`` in one pass.

Targets are processed by *level*: a target's level counts the targets on the longest path
from the inputs to it, so targets of one level never feed each other and share one pass.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from flarc.core.targets import Target, constant_tensors, node_names

PREFIX = "flarc_cl/"


def twin_name(model: onnx.ModelProto, tensor: str) -> str:
    """The twin's name of ``tensor`` (graph inputs and shared constants keep theirs)."""
    if tensor in {i.name for i in model.graph.input} or tensor in constant_tensors(model):
        return tensor
    return PREFIX + tensor


def weight_input(weight: str) -> str:
    """The name of the graph input that feeds the twin's copy of weight ``weight``."""
    return f"{PREFIX}weight/{weight}"


def twin_model(model: onnx.ModelProto, targets: list[Target]) -> onnx.ModelProto:
    """``model`` plus a twin whose targets read their weights (the tensors their nodes read)
    from the graph inputs ``weight_input(w)``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    reads = {u.consumed: t for t in targets for u in t.all_uses}
    weights = set(reads)
    consts = constant_tensors(model)
    keep = {i.name for i in model.graph.input} | (set(consts) - weights)

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return weight_input(name) if name in weights else PREFIX + name

    twins = []
    for node, name in zip(model.graph.node, node_names(model), strict=True):
        if node.op_type == "Constant" and node.output[0] in consts:
            continue  # shared with the original; a target weight comes from the graph input
        if any(o in weights for o in node.output):
            continue  # the end of a weight path: the twin's targets read the graph input
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = PREFIX + name
        twin.input[:] = [rename(i) for i in node.input]
        twin.output[:] = [rename(o) for o in node.output]
        twins.append(twin)
    graph.node.extend(twins)
    for w in sorted(weights):
        t = reads[w]
        graph.input.append(
            helper.make_tensor_value_info(weight_input(w), t.elem_type, list(t.weight_shape))
        )
    return out


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
