"""The tensor walker every lazy-data path relies on agrees with onnx's own (a reference that is
private to onnx, so flarc does not call it) on a model with subgraphs, Constant nodes and a local
function."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from flarc.core.external import all_tensors


def _model() -> onnx.ModelProto:
    def const(name: str, value: float) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(np.full((2,), value, np.float32), f"{name}_value")
        return helper.make_node("Constant", [], [name], value=tensor)

    then = helper.make_graph(
        [const("t", 1.0), helper.make_node("Add", ["x", "t"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.zeros(3, np.float32), "then_init")],
    )
    other = helper.make_graph(
        [const("e", 2.0), helper.make_node("Sub", ["x", "e"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [2])],
    )
    function = helper.make_function(
        "local", "Twice", ["a"], ["b"], [const("two", 2.0), helper.make_node("Mul", ["a", "two"], ["b"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            const("c", 3.0),
            helper.make_node("Add", ["x", "c"], ["z"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
            helper.make_node("Twice", ["z"], ["w"], domain="local"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        initializer=[numpy_helper.from_array(np.ones(4, np.float32), "top")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[function])


def test_all_tensors_walks_what_onnx_walks():
    model = _model()
    onnx.checker.check_model(model)
    ours = list(all_tensors(model))
    theirs = list(external_data_helper._get_all_tensors(model))
    assert [t.name for t in ours] == [t.name for t in theirs]
    assert all(a is b for a, b in zip(ours, theirs, strict=True))  # the protos themselves
    assert {t.name for t in ours} >= {
        "top",
        "then_init",
        "c_value",
        "t_value",
        "e_value",
        "two_value",
    }
