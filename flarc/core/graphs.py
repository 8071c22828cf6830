"""Walks over a model's graphs that several stages need: what subgraphs read, pruning to
outputs, the scopes (main graph and If/Loop/Scan bodies) and their node names, and lifting a
branch's tensors out to the main graph."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


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


def graph_node_names(graph: onnx.GraphProto, prefix: str = "") -> list[str]:
    """Node names as flarc refers to them: the graph's own, or ``<op>_<index>`` when empty, made
    unique, after ``prefix`` (a subgraph's: ``<If node>/<branch>/``)."""
    seen: Counter[str] = Counter()
    names = []
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        seen[name] += 1
        names.append(prefix + (name if seen[name] == 1 else f"{name}_{seen[name] - 1}"))
    return names


@dataclass
class Scope:
    """One graph of a model: the main graph (``path == ()``) or a subgraph, reached from the
    main graph by ``path`` = (node name, attribute name, node name, attribute name, ...)."""

    path: tuple[str, ...]
    graph: onnx.GraphProto
    names: list[str]  # flarc's name of every node of ``graph``
    kind: str = ""  # op of the node that owns the subgraph (If, Loop, Scan); "" for main

    @property
    def prefix(self) -> str:
        """What flarc's names of this graph's nodes start with."""
        return "".join(f"{p}/" for p in self.path)


def scopes(model: onnx.ModelProto) -> list[Scope]:
    """Every graph of ``model``, the main graph first, each subgraph after its owner's graph."""
    out: list[Scope] = []

    def walk(graph: onnx.GraphProto, path: tuple[str, ...], kind: str) -> None:
        scope = Scope(path, graph, graph_node_names(graph, "".join(f"{p}/" for p in path)), kind)
        out.append(scope)
        for node, name in zip(graph.node, scope.names, strict=True):
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, (*_tail(name, path), attr.name), node.op_type)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for j, g in enumerate(attr.graphs):
                        walk(g, (*_tail(name, path), f"{attr.name}{j}"), node.op_type)

    walk(model.graph, (), "")
    return out


def _tail(name: str, path: tuple[str, ...]) -> tuple[str, ...]:
    """The path of a node's subgraphs: the owner's path, then the owner's own (short) name."""
    prefix = "".join(f"{p}/" for p in path)
    return (*path, name[len(prefix) :])


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of every graph of ``model``, outer graphs' first."""
    return [node for scope in scopes(model) for node in scope.graph.node]


def producer_map(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node that computes each tensor, over every graph of ``model`` (names are unique
    across a model's graphs)."""
    return {o: node for node in all_nodes(model) for o in node.output if o}


def scope_of(model: onnx.ModelProto, path: tuple[str, ...]) -> Scope:
    """The scope at ``path`` (ModelError-free: a bad path is a bug, KeyError)."""
    for scope in scopes(model):
        if scope.path == path:
            return scope
    raise KeyError(f"no subgraph at {'/'.join(path)}")


def lift(
    model: onnx.ModelProto,
    path: tuple[str, ...],
    values: list[tuple[str, int, list[int] | None, np.ndarray]],
) -> list[str]:
    """Make tensors computed inside an If branch available in the main graph.

    Each ``(name, elem_type, shape, absent)`` becomes an output of its branch and of the If
    node; the other branch outputs ``absent`` (what the tensor is when that branch runs: zero
    sums, an empty shape). Nested branches are lifted level by level. Returns the main graph's
    names of the lifted tensors. Loop and Scan bodies cannot be lifted (KeyError).
    """
    if not path:
        return [v[0] for v in values]
    owner_path, owner, attr = path[:-2], path[-2], path[-1]
    parent = scope_of(model, owner_path)
    node = parent.graph.node[parent.names.index(parent.prefix + owner)]
    if node.op_type != "If":
        raise KeyError(f"{node.op_type} node '{owner}': only If branches are lifted")
    branches = {a.name: a.g for a in node.attribute}
    branch, other = (
        branches[attr],
        branches["else_branch" if attr == "then_branch" else "then_branch"],
    )
    lifted = []
    for name, elem, shape, absent in values:
        branch.output.append(helper.make_tensor_value_info(name, elem, shape))
        fill = f"{name}/flarc_absent"
        other.node.append(
            helper.make_node(
                "Constant", [], [fill], name=fill, value=numpy_helper.from_array(absent, fill)
            )
        )
        other.output.append(helper.make_tensor_value_info(fill, elem, list(absent.shape)))
        out = f"{name}/flarc_lifted"
        node.output.append(out)
        lifted.append((out, elem, shape, absent))
    return lift(model, owner_path, lifted)
