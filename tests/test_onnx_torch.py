"""The torch interpreter of ONNX graphs: forward equals onnxruntime, gradients equal autograd."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flarc.calib.onnx_torch import TorchGraph
from flarc.core.errors import DataError, ModelError

from _models import (
    KIND_OUTPUTS,
    KIND_VOCAB,
    example_batch,
    match_initializers,
    run_ort,
    torch_inputs,
)

KINDS = ["gpt", "bert", "cnn"]
EXPORTERS = ["legacy", "dynamo"]


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    scale = float(np.abs(expected).max()) if np.size(expected) else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# exported models


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_onnxruntime(exported, kind, exporter):
    _, model = exported(kind, exporter)
    # Other batch and sequence sizes than at export: the shape subgraphs must follow.
    feeds = example_batch(kind, seed=5, batch=3, seq=5)
    expected = run_ort(model, feeds)
    graph = TorchGraph(model, dtype=torch.float64)
    with torch.no_grad():
        got = graph.run(feeds)
    assert list(got) == list(expected)
    for name, ref in expected.items():
        assert got[name].dtype == torch.float64
        _close(got[name].numpy(), ref, rtol=1e-5)
    graph32 = TorchGraph(model, dtype="float32")
    with torch.no_grad():
        got32 = graph32.run(feeds)
    for name, ref in expected.items():
        assert got32[name].dtype == torch.float32
        _close(got32[name].numpy(), ref, rtol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_torch_autograd(exported, kind, exporter):
    module, model = exported(kind, exporter)
    reference = copy.deepcopy(module).double()
    matches = match_initializers(model, reference)
    # Every matrix/kernel of the module must be found in the graph, or the test would be empty.
    for pname, p in reference.named_parameters():
        if p.dim() >= 2:
            assert pname in matches, f"{pname} not found among the ONNX initializers"
    weights = sorted({iname for found in matches.values() for iname, _ in found})
    graph = TorchGraph(model, params=weights, dtype=torch.float64)
    feeds = example_batch(kind, seed=7, batch=3, seq=5)
    rng = np.random.default_rng(0)
    outs = graph.run(feeds)
    coefs = {n: torch.from_numpy(rng.standard_normal(tuple(y.shape))) for n, y in outs.items()}
    loss = sum((outs[n] * coefs[n]).sum() for n in outs)
    grads = dict(
        zip(weights, torch.autograd.grad(loss, [graph.params[w] for w in weights]), strict=True)
    )

    ref_out = reference(*torch_inputs(kind, feeds))
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    ref_loss = sum((y * coefs[n]).sum() for n, y in zip(KIND_OUTPUTS[kind], ref_out, strict=True))
    ref_loss.backward()
    _close(loss.item(), ref_loss.item(), rtol=1e-6)
    for pname, p in reference.named_parameters():
        if pname not in matches:
            continue
        # A parameter stored several times (a folded transpose of a tied weight) sums its copies.
        total = sum(
            (grads[iname].T if transposed else grads[iname].reshape(p.shape)).numpy()
            for iname, transposed in matches[pname]
        )
        ref = p.grad.numpy()
        assert np.linalg.norm(total - ref) <= 1e-5 * np.linalg.norm(ref), pname
        _close(total, ref, rtol=1e-5)


def test_tied_weight_in_graph_gets_summed_gradient(exported):
    """The dynamo export keeps the GPT embedding and its lm head as one initializer, two uses."""
    module, model = exported("gpt", "dynamo")
    tied = [name for name, _ in match_initializers(model, module)["wte.weight"]]
    assert len(tied) == 1
    uses = [n.op_type for n in model.graph.node if tied[0] in n.input]
    assert sorted(uses) == ["Gather", "Gemm"]
    reference = copy.deepcopy(module).double()
    feeds = example_batch("gpt", seed=2)
    graph = TorchGraph(model, params=tied)
    (grad,) = torch.autograd.grad(graph.run(feeds)["logits"].pow(2).sum(), [graph.params[tied[0]]])
    reference(*torch_inputs("gpt", feeds)).pow(2).sum().backward()
    _close(grad.numpy(), reference.wte.weight.grad.numpy(), rtol=1e-5)
    # Both uses contribute: the embedding rows of unused tokens still get the head's gradient.
    unused = sorted(set(range(KIND_VOCAB)) - set(feeds["input_ids"].ravel().tolist()))
    assert unused and np.abs(grad.numpy()[unused]).max() > 0


def test_tied_weight_hand_built_graph():
    """y = (x W) W with one initializer W: dL/dW is the sum over both MatMuls."""
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("MatMul", ["h", "W"], ["y"]),
        ],
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tg = TorchGraph(model, params=["W"])
    (grad,) = torch.autograd.grad(tg.run({"x": x})["y"].sum(), [tg.params["W"]])
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    ((torch.tensor(x, dtype=torch.float64) @ wt) @ wt).sum().backward()
    _close(grad.numpy(), wt.grad.numpy(), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# single ops against onnxruntime


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


F, INT, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL

# (id, op, inputs (arrays; int ones become initializers), attrs, opset, output types)
OP_CASES = [
    (
        "conv_same_upper",
        "Conv",
        [_rand(1, 2, 7, 6), _rand(3, 2, 3, 2, seed=1)],
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        17,
        [F],
    ),
    (
        "conv_same_lower",
        "Conv",
        [_rand(1, 2, 7, 6), _rand(3, 2, 2, 2, seed=1)],
        {"auto_pad": "SAME_LOWER"},
        17,
        [F],
    ),
    (
        "conv_asym_pads_groups",
        "Conv",
        [_rand(2, 4, 6, 5), _rand(6, 2, 3, 3, seed=1), _rand(6)],
        {"pads": [0, 1, 2, 1], "group": 2, "dilations": [1, 2]},
        17,
        [F],
    ),
    (
        "conv1d_valid",
        "Conv",
        [_rand(2, 3, 9), _rand(4, 3, 3, seed=1)],
        {"auto_pad": "VALID", "strides": [2]},
        17,
        [F],
    ),
    (
        "maxpool_pads_dil",
        "MaxPool",
        [_rand(1, 2, 7, 7)],
        {"kernel_shape": [3, 3], "pads": [1, 0, 1, 1], "strides": [2, 1], "dilations": [1, 2]},
        17,
        [F],
    ),
    (
        "maxpool_ceil",
        "MaxPool",
        [_rand(1, 2, 6, 6)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
        17,
        [F],
    ),
    (
        "avgpool_exclude_pad",
        "AveragePool",
        [_rand(1, 2, 6, 5)],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 0], "strides": [2, 2]},
        17,
        [F],
    ),
    (
        "avgpool_include_pad",
        "AveragePool",
        [_rand(1, 2, 6, 5)],
        {"kernel_shape": [3, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        17,
        [F],
    ),
    ("globalavgpool", "GlobalAveragePool", [_rand(2, 3, 4, 5)], {}, 17, [F]),
    (
        "batchnorm",
        "BatchNormalization",
        [
            _rand(2, 3, 4),
            _rand(3, seed=1),
            _rand(3, seed=2),
            _rand(3, seed=3),
            np.abs(_rand(3, seed=4)) + 0.5,
        ],
        {"epsilon": 1e-3},
        17,
        [F],
    ),
    (
        "layernorm_axis",
        "LayerNormalization",
        [_rand(2, 3, 4), _rand(3, 4, seed=1), _rand(3, 4, seed=2)],
        {"axis": -2, "epsilon": 1e-3},
        17,
        [F],
    ),
    ("gelu_tanh", "Gelu", [_rand(3, 4)], {"approximate": "tanh"}, 20, [F]),
    ("softmax_opset11", "Softmax", [_rand(2, 3, 4)], {"axis": 1}, 11, [F]),
    ("logsoftmax_opset13", "LogSoftmax", [_rand(2, 3, 4)], {"axis": 1}, 13, [F]),
    ("reducemean_attr", "ReduceMean", [_rand(2, 3, 4)], {"axes": [0, -1], "keepdims": 0}, 17, [F]),
    ("reducemean_input", "ReduceMean", [_rand(2, 3, 4), _i64(1)], {}, 18, [F]),
    ("reducesum_all", "ReduceSum", [_rand(2, 3, 4)], {"keepdims": 0}, 13, [F]),
    (
        "reducesum_noop",
        "ReduceSum",
        [_rand(2, 3), np.zeros(0, np.int64)],
        {"noop_with_empty_axes": 1},
        13,
        [F],
    ),
    ("reducemax_input", "ReduceMax", [_rand(2, 3, 4), _i64(-1, 0)], {}, 18, [F]),
    ("reducel2", "ReduceL2", [_rand(2, 3, 4)], {"axes": [1]}, 17, [F]),
    ("reshape_zero_minus1", "Reshape", [_rand(2, 3, 4), _i64(0, -1, 2)], {}, 17, [F]),
    ("reshape_allowzero", "Reshape", [_rand(2, 0, 4), _i64(4, 0, 2)], {"allowzero": 1}, 17, [F]),
    ("transpose_default", "Transpose", [_rand(2, 3, 4)], {}, 17, [F]),
    ("unsqueeze_attr", "Unsqueeze", [_rand(2, 3)], {"axes": [0, -1]}, 11, [F]),
    ("unsqueeze_input", "Unsqueeze", [_rand(2, 3), _i64(1, 3)], {}, 13, [F]),
    ("squeeze_attr", "Squeeze", [_rand(1, 3, 1)], {"axes": [2]}, 11, [F]),
    ("squeeze_all", "Squeeze", [_rand(1, 3, 1)], {}, 13, [F]),
    ("split_attr", "Split", [_rand(5, 4)], {"axis": 0, "split": [2, 3]}, 11, [F, F]),
    ("split_input", "Split", [_rand(5, 4), _i64(1, 3)], {"axis": 1}, 13, [F, F]),
    ("split_num_outputs", "Split", [_rand(5, 4)], {"axis": 0, "num_outputs": 2}, 18, [F, F]),
    (
        "slice_neg_step",
        "Slice",
        [_rand(5, 6), _i64(-1, 1), _i64(-100, 6), _i64(0, 1), _i64(-2, 2)],
        {},
        17,
        [F],
    ),
    (
        "slice_clamped",
        "Slice",
        [_rand(5, 6), _i64(2), _i64(9223372036854775807), _i64(-1)],
        {},
        17,
        [F],
    ),
    (
        "gather_negative",
        "Gather",
        [_rand(5, 3), np.array([[0, -1], [2, -5]], np.int64)],
        {"axis": 0},
        17,
        [F],
    ),
    ("gather_scalar", "Gather", [_rand(5, 3), np.array(-1, np.int64)], {"axis": 1}, 17, [F]),
    (
        "gatherelements",
        "GatherElements",
        [_rand(3, 4), np.array([[0, 2], [1, -1], [3, 3]], np.int64)],
        {"axis": 1},
        17,
        [F],
    ),
    (
        "scatternd",
        "ScatterND",
        [_rand(4, 3), np.array([[1], [3]], np.int64), _rand(2, 3, seed=1)],
        {},
        17,
        [F],
    ),
    ("shape_start_end", "Shape", [_rand(2, 3, 4, 5)], {"start": 1, "end": -1}, 17, [INT]),
    ("size", "Size", [_rand(2, 3)], {}, 17, [INT]),
    (
        "constantofshape",
        "ConstantOfShape",
        [_i64(2, 3)],
        {"value": numpy_helper.from_array(np.array([1.5], np.float32))},
        17,
        [F],
    ),
    ("cast_to_int", "Cast", [_rand(3, 4) * 3], {"to": TensorProto.INT64}, 17, [INT]),
    ("castlike", "CastLike", [np.array([1, 2], np.int64), _rand(1)], {}, 17, [F]),
    ("where", "Where", [np.array([True, False, True]), _rand(2, 3), _rand(1, seed=1)], {}, 17, [F]),
    ("expand_bidirectional", "Expand", [_rand(3, 1), _i64(2, 1, 4)], {}, 17, [F]),
    (
        "range_float",
        "Range",
        [np.array(0.5, np.float32), np.array(3.0, np.float32), np.array(0.75, np.float32)],
        {},
        17,
        [F],
    ),
    ("trilu_lower_k", "Trilu", [_rand(2, 4, 5), np.array(1, np.int64)], {"upper": 0}, 17, [F]),
    ("trilu_upper", "Trilu", [_rand(4, 4)], {}, 17, [F]),
    ("min_broadcast", "Min", [_rand(2, 3), _rand(3, seed=1), _rand(1, 1, seed=2)], {}, 17, [F]),
    ("max", "Max", [_rand(2, 3), _rand(3, seed=1)], {}, 17, [F]),
    (
        "clip_inputs",
        "Clip",
        [_rand(3, 4), np.array(-0.5, np.float32), np.array(0.3, np.float32)],
        {},
        17,
        [F],
    ),
    ("clip_attrs", "Clip", [_rand(3, 4)], {"min": -0.2, "max": 0.4}, 6, [F]),
    ("flatten", "Flatten", [_rand(2, 3, 4)], {"axis": 2}, 17, [F]),
    (
        "einsum",
        "Einsum",
        [_rand(2, 3, 4), _rand(4, 5, seed=1)],
        {"equation": "bij,jk->bik"},
        17,
        [F],
    ),
    ("tile", "Tile", [_rand(2, 3), _i64(2, 1)], {}, 17, [F]),
    (
        "pad_constant",
        "Pad",
        [_rand(2, 3), _i64(0, 1, 1, 2), np.array(0.5, np.float32)],
        {},
        17,
        [F],
    ),
    (
        "pad_reflect",
        "Pad",
        [_rand(1, 2, 4, 4), _i64(0, 0, 1, 2, 0, 0, 2, 1)],
        {"mode": "reflect"},
        17,
        [F],
    ),
    (
        "pad_edge_axes",
        "Pad",
        [_rand(1, 2, 4, 4), _i64(1, 2, 0, 1), np.array(0, np.float32), _i64(2, 3)],
        {"mode": "edge"},
        18,
        [F],
    ),
    ("pow", "Pow", [np.abs(_rand(3, 4)), np.array(1.7, np.float32)], {}, 17, [F]),
    ("div_int", "Div", [_i64(7, -7, 6), _i64(2, 2, 4)], {}, 17, [INT]),
    ("isnan", "IsNaN", [np.array([1.0, np.nan, 0.0], np.float32)], {}, 17, [B]),
    ("dropout", "Dropout", [_rand(3, 4)], {}, 17, [F]),
    (
        "gemm_trans",
        "Gemm",
        [_rand(4, 3), _rand(5, 4, seed=1), _rand(5, seed=2)],
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
        17,
        [F],
    ),
    ("not", "Not", [np.array([True, False])], {}, 17, [B]),
    *(
        (
            f"resize_{mode}_{coords}",
            "Resize",
            [_rand(1, 2, 5, 6), None, None, np.array(size, np.int64)],
            {"mode": mode, "coordinate_transformation_mode": coords, "cubic_coeff_a": -0.75},
            13,
            [F],
        )
        for mode, coords, size in (
            ("linear", "half_pixel", [1, 2, 9, 4]),
            ("linear", "align_corners", [1, 2, 3, 11]),
            ("cubic", "half_pixel", [1, 2, 11, 7]),
            ("cubic", "align_corners", [1, 2, 4, 9]),
        )
    ),
    (
        "resize_nearest_scales",
        "Resize",
        [_rand(1, 2, 3, 4), None, np.array([1, 1, 2, 3], np.float32)],
        {
            "mode": "nearest",
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        },
        13,
        [F],
    ),
    (
        "cumsum_reverse_exclusive",
        "CumSum",
        [_rand(3, 4), np.array(1, np.int64)],
        {"reverse": 1, "exclusive": 1},
        17,
        [F],
    ),
]


def _op_model(op: str, inputs: list[np.ndarray], attrs: dict, opset: int, out_types: list[int]):
    """One-node model: float inputs are graph inputs, integer ones initializers (ort-friendly);
    ``None`` is an omitted optional input."""
    names = ["" if a is None else f"in{i}" for i, a in enumerate(inputs)]
    outs = [f"out{i}" for i in range(len(out_types))]
    graph_inputs, inits, feeds = [], [], {}
    for name, array in zip(names, inputs, strict=True):
        if array is None:
            continue
        if array.dtype == np.float32 or array.dtype == np.bool_:
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
            feeds[name] = array
        else:
            inits.append(numpy_helper.from_array(array, name))
    node = helper.make_node(op, names, outs, name=f"the_{op}", **attrs)
    graph = helper.make_graph(
        [node],
        "op",
        graph_inputs,
        [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types, strict=True)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "opset", "out_types"),
    [case[1:] for case in OP_CASES],
    ids=[case[0] for case in OP_CASES],
)
def test_op_matches_onnxruntime(op, inputs, attrs, opset, out_types):
    model, feeds = _op_model(op, inputs, attrs, opset, out_types)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    got = TorchGraph(model).run(feeds)
    for ref, (name, value) in zip(expected, got.items(), strict=True):
        value = value.detach().numpy()
        assert value.shape == ref.shape, name
        if ref.dtype.kind == "f":
            _close(value, ref, rtol=1e-5)
        else:
            np.testing.assert_array_equal(value, ref)


# ---------------------------------------------------------------------------------------------
# errors


def test_unsupported_op_is_a_one_line_model_error():
    model, _ = _op_model("Det", [_rand(3, 3)], {}, 17, [F])
    with pytest.raises(ModelError) as info:
        TorchGraph(model)
    assert str(info.value) == "node 'the_Det' (op Det): not supported for gradients"
    custom, _ = _op_model("Relu", [_rand(3)], {}, 17, [F])
    custom.graph.node[0].domain = "com.microsoft"
    custom.graph.node[0].op_type = "FastGelu"
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(ModelError, match=r"^node 'the_Relu' \(op com.microsoft.FastGelu\)"):
        TorchGraph(custom)


def test_weight_must_be_a_constant_and_inputs_present():
    model, feeds = _op_model("Add", [_rand(3), _rand(3, seed=1)], {}, 17, [F])
    with pytest.raises(ModelError, match="weight 'in0' is not a constant"):
        TorchGraph(model, params=["in0"])
    with pytest.raises(DataError, match="model input 'in1' is missing"):
        TorchGraph(model).run({"in0": feeds["in0"]})


def test_constant_node_weight_becomes_a_parameter():
    w = _rand(3, 2)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w))
    graph = helper.make_graph(
        [const, helper.make_node("MatMul", ["x", "W"], ["y"])],
        "c",
        [helper.make_tensor_value_info("x", F, [4, 3])],
        [helper.make_tensor_value_info("y", F, [4, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = _rand(4, 3, seed=3)
    tg = TorchGraph(model, params=["W"])
    (grad,) = torch.autograd.grad(tg.run({"x": x})["y"].sum(), [tg.params["W"]])
    # d/dW sum(x W) = x^T 1
    _close(grad.numpy(), x.astype(np.float64).T @ np.ones((4, 2)), rtol=1e-12)
    onnx.checker.check_model(model)


def test_unsupported_extra_output_and_unknown_output():
    model, feeds = _op_model("MaxPool", [_rand(1, 1, 4, 4)], {"kernel_shape": [2, 2]}, 17, [F, INT])
    with pytest.raises(ModelError, match=r"output 1 \('out1'\) not supported"):
        TorchGraph(model).run(feeds)
    with pytest.raises(ModelError, match="output 'nope' is not computed"):
        TorchGraph(model).run(feeds, outputs=["nope"])


def test_requested_outputs_only_run_what_they_need(exported):
    _, model = exported("bert", "legacy")
    graph = TorchGraph(model)
    feeds = example_batch("bert")
    both = graph.run(feeds)
    # input_ids alone suffices for the embeddings: the mask branch is never evaluated.
    emb = next(n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization")
    only = graph.run({"input_ids": feeds["input_ids"]}, outputs=[emb])
    assert list(only) == [emb]
    pooled = graph.run(feeds, outputs=["pooler_output"])
    assert torch.equal(pooled["pooler_output"], both["pooler_output"])


def test_local_functions_are_inlined():
    fn = helper.make_function(
        "local",
        "Scaled",
        ["a", "b"],
        ["c"],
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Tanh", ["ab"], ["c"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("Scaled", ["x", "W"], ["y"], domain="local")],
        "f",
        [helper.make_tensor_value_info("x", F, [3])],
        [helper.make_tensor_value_info("y", F, [3])],
        [numpy_helper.from_array(_rand(3, seed=1), "W")],
    )
    model = helper.make_model(
        graph,
        functions=[fn],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    x = _rand(3)
    tg = TorchGraph(model, params=["W"])
    (grad,) = torch.autograd.grad(tg.run({"x": x})["y"].sum(), [tg.params["W"]])
    xw = x.astype(np.float64) * _rand(3, seed=1).astype(np.float64)
    _close(grad.numpy(), x * (1 - np.tanh(xw) ** 2), rtol=1e-6)
