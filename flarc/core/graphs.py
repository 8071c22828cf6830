"""Walks over a graph that several stages need: what subgraphs read, and pruning to outputs."""

from __future__ import annotations

import onnx


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name the subgraphs of ``node`` read (outer-scope values included)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_reads(inner)
    return names


def prune_to_outputs(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output depends on: onnxruntime runs every node,
    so an early group's statistics pass would otherwise run (and read the weights of) the
    whole model."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= subgraph_reads(node)
    if len(keep) == len(graph.node):
        return
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    dropped = {t.name for t in graph.initializer if t.name not in needed}
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    # Before IR 4 initializers are listed as inputs too: a dropped one must not be asked for.
    inputs = [i for i in graph.input if i.name not in dropped]
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)
