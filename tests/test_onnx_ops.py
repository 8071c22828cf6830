"""Every op of the torch interpreter of ONNX graphs, one node at a time.

Each case is a one-node model: its float64 result through :class:`TorchGraph` must equal
onnxruntime's (float32, CPU, no graph optimisation) on the same float32 inputs, integer and
boolean results exactly; for differentiable ops, the gradient autograd computes through the
interpreter must equal finite differences (``torch.autograd.gradcheck``). The cases must cover
exactly the ops of :data:`OPS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flarc.calib.onnx_torch import OPS, TorchGraph

RTOL = 1e-5
_RNG = np.random.default_rng(20240607)


def _f(*shape: int, scale: float = 1.0) -> np.ndarray:
    """Standard normal float32 values; every call draws new ones, so no two inputs tie."""
    return np.asarray(scale * _RNG.standard_normal(shape), dtype=np.float32)


def _pos(*shape: int) -> np.ndarray:
    """Positive float32 values, away from zero (Log, Sqrt, Pow bases, variances)."""
    return (np.abs(_RNG.standard_normal(shape)) + 0.5).astype(np.float32)


def _nonzero(*shape: int) -> np.ndarray:
    """Float32 values of either sign, away from zero (divisors)."""
    x = _RNG.standard_normal(shape)
    return (np.sign(x) * (np.abs(x) + 0.5)).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _scalar(value: float | int, dtype: type = np.int64) -> np.ndarray:
    return np.array(value, dtype=dtype)


def _ints(*shape: int, low: int = -5, high: int = 6, dtype: type = np.int64) -> np.ndarray:
    return _RNG.integers(low, high, shape).astype(dtype)


def _bools(*shape: int) -> np.ndarray:
    return _RNG.random(shape) < 0.5


def _tensor(array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array))


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    inputs: tuple  # arrays, or None for an omitted optional input
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    n_out: int = 1
    # Inputs to differentiate; None: every float input.
    wrt: tuple[int, ...] | None = None

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}" if self.name else self.op

    @property
    def grad_inputs(self) -> tuple[int, ...]:
        if self.wrt is not None:
            return self.wrt
        return tuple(i for i, a in enumerate(self.inputs) if a is not None and a.dtype.kind == "f")


def case(op: str, name: str, *inputs, opset: int = 17, n_out: int = 1, wrt=None, **attrs):
    return Case(op, name, tuple(inputs), attrs, opset, n_out, wrt)


def _unary_cases() -> list[Case]:
    pos = ["Sqrt", "Log"]
    signed = ["Neg", "Exp", "Abs", "Sin", "Cos", "Erf", "Tanh", "Sigmoid", "Relu", "Softplus"]
    cases = [case(op, "", _pos(2, 3, 4)) for op in pos]
    cases += [case(op, "", _f(2, 3, 4)) for op in signed]
    cases += [
        case("Reciprocal", "", _nonzero(3, 4)),
        case("Neg", "int", _ints(3, 4)),
        case("Abs", "int", _ints(3, 4)),
        case("Sign", "", np.array([-1.5, 0.0, 2.0, -0.0, 3e-5], np.float32)),
        case("Sign", "int", _ints(7)),
        case("Floor", "", _f(3, 4, scale=3.0)),
        case("Ceil", "", _f(3, 4, scale=3.0)),
        # Halves round to even in ONNX and in torch.
        case("Round", "", np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -3.7], np.float32)),
        case("LeakyRelu", "", _f(3, 4), alpha=0.15),
        case("LeakyRelu", "default", _f(3, 4)),
        case("Elu", "", _f(3, 4), alpha=0.7),
        case("HardSigmoid", "", _f(3, 4, scale=3.0), alpha=0.3, beta=0.4),
        case("HardSwish", "", _f(3, 4, scale=4.0), opset=14),
        case("Gelu", "", _f(3, 4), opset=20),
        case("Gelu", "tanh", _f(3, 4), opset=20, approximate="tanh"),
    ]
    return cases


def _arithmetic_cases() -> list[Case]:
    return [
        case("Add", "broadcast", _f(2, 3, 4), _f(3, 1)),
        case("Add", "int", _ints(3), _scalar(4)),
        case("Sub", "broadcast", _f(2, 1, 4), _f(3, 4)),
        case("Sub", "int32", _ints(2, 3, dtype=np.int32), _ints(3, dtype=np.int32)),
        case("Mul", "scalar", _f(2, 3), _f()),
        case("Mul", "int", _ints(2, 3), _ints(2, 1)),
        case("Div", "broadcast", _f(2, 3, 4), _nonzero(4)),
        # Integer division truncates towards zero.
        case("Div", "int", _i64(7, -7, 6, -6, 0), _i64(2, 2, -4, -4, 3)),
        case("Div", "int32", np.array([9, -9], np.int32), np.array([-4, 4], np.int32)),
        # fmod=0 takes the divisor's sign, fmod=1 the dividend's.
        case("Mod", "int", _i64(7, -7, 7, -7, 5, 0), _i64(3, 3, -3, -3, 5, 2)),
        case("Mod", "int_fmod", _i64(7, -7, 7, -7, 5), _i64(3, 3, -3, -3, 5), fmod=1),
        case("Mod", "float_fmod", _f(3, 4, scale=3.0), _nonzero(4), fmod=1),
        case("Pow", "", _pos(3, 4), _f(4)),
        case("Pow", "int_exponent", _f(3, 3), _i64(2, 3, -1)),
        case("Pow", "int", _i64(2, -3, 4), _i64(3, 3, 0)),
        # An integer result: no gradient.
        case("Pow", "int_base_float_exponent", _i64(2, 3, 4), _f(3, scale=2.0), wrt=()),
        case("Sum", "broadcast", _f(2, 3), _f(3), _f(1, 1)),
        case("Sum", "single", _f(2, 3)),
        case("Mean", "broadcast", _f(2, 3), _f(3), _f(2, 1)),
        case("Min", "broadcast", _f(2, 3), _f(3), _f(1, 1)),
        case("Min", "int", _ints(4), _ints(4)),
        case("Max", "broadcast", _f(2, 1, 3), _f(4, 1)),
        case("Max", "int", _ints(4), _ints(1)),
        case("Clip", "inputs", _f(3, 4), _scalar(-0.5, np.float32), _scalar(0.3, np.float32)),
        case("Clip", "min_only", _f(3, 4), _scalar(-0.2, np.float32)),
        case("Clip", "max_only", _f(3, 4), None, _scalar(0.1, np.float32)),
        case("Clip", "none", _f(3, 4)),
        case("Clip", "int", _ints(6), _scalar(-2), _scalar(3), opset=13),
        case("Clip", "attrs", _f(3, 4), opset=6, min=-0.2, max=0.4),
        case("Clip", "attr_max", _f(3, 4), opset=6, max=0.1),
    ]


def _softmax_cases() -> list[Case]:
    cases = []
    for op in ("Softmax", "LogSoftmax"):
        cases += [
            case(op, "axis", _f(2, 3, 4), axis=-2, opset=13),
            case(op, "default", _f(2, 3, 4), opset=13),
            # Before opset 13 the input is flattened to 2-D at the axis: normalised over a tail.
            case(op, "opset11", _f(2, 3, 4), axis=1, opset=11),
            case(op, "opset11_default", _f(2, 3, 4), opset=11),
            case(op, "opset11_negative", _f(2, 3, 4), axis=-2, opset=11),
        ]
    return cases


REDUCTIONS = sorted(op for op in OPS if op.startswith("Reduce"))


def _reduce_cases() -> list[Case]:
    cases = []
    for op in REDUCTIONS:
        # Axes as an attribute before opset 18 (13 for ReduceSum), as an input from then on.
        attr_opset, input_opset = (11, 13) if op == "ReduceSum" else (17, 18)
        cases += [
            case(op, "attr", _f(2, 3, 4), axes=[0, -1], keepdims=0, opset=attr_opset),
            case(op, "attr_keepdims", _f(2, 3, 4), axes=[1], opset=attr_opset),
            case(op, "all", _f(2, 3, 2), keepdims=0, opset=attr_opset),
            case(op, "input", _f(2, 3, 4), _i64(-2), opset=input_opset),
            case(op, "input_keepdims0", _f(2, 3, 4), _i64(2, 0), keepdims=0, opset=input_opset),
            case(op, "input_all", _f(3, 2), opset=input_opset),
            case(op, "noop", _f(2, 3), noop_with_empty_axes=1, opset=input_opset),
            case(
                op,
                "empty_axes",
                _f(2, 3),
                np.zeros(0, np.int64),
                keepdims=0,
                opset=input_opset,
            ),
        ]
    cases += [
        case("ReduceSum", "int", _ints(2, 3), _i64(1), keepdims=0, opset=13),
        case("ReduceMax", "int", _ints(2, 3), axes=[-1], opset=17),
        case("ReduceProd", "int", _ints(2, 3, low=-3, high=4), axes=[0], opset=17),
    ]
    return cases


def _index_reduce_cases() -> list[Case]:
    ties = np.round(_f(3, 5, scale=1.5))
    cases = []
    for op in ("ArgMax", "ArgMin"):
        cases += [
            case(op, "", _f(3, 4, 5), axis=-1, keepdims=0),
            case(op, "keepdims", _f(3, 4, 5), axis=1),
            case(op, "default", _f(3, 4)),
            # Ties: the first index by default, the last one with select_last_index.
            case(op, "ties_first", ties, axis=1),
            case(op, "ties_last", ties, axis=1, select_last_index=1),
            case(op, "ties_last_neg_axis", ties, axis=-2, keepdims=0, select_last_index=1),
            case(op, "int", _ints(4, 5), axis=0),
        ]
    cases += [
        case("TopK", "", _f(3, 5), _i64(2), n_out=2),
        case("TopK", "smallest_axis0", _f(4, 3, 2), _i64(3), axis=0, largest=0, n_out=2),
        case("TopK", "negative_axis", _f(2, 5, 3), _i64(4), axis=-2, n_out=2),
        case("TopK", "int", _RNG.permutation(12).astype(np.int64), _i64(5), n_out=2),
        # Of equal values the lower index comes first, largest or smallest (no gradient: at
        # ties the selection is not differentiable).
        case("TopK", "ties", np.round(_f(3, 40)), _i64(10), n_out=2, wrt=()),
        case(
            "TopK",
            "ties_smallest",
            np.round(_f(40, 3)),
            _i64(10),
            axis=0,
            largest=0,
            n_out=2,
            wrt=(),
        ),
        case("TopK", "k_attr", _f(3, 5), k=2, opset=1, n_out=2),
        case("CumSum", "", _f(3, 4), _scalar(1)),
        case("CumSum", "negative_axis", _f(2, 3, 4), _scalar(-3, np.int32)),
        case("CumSum", "reverse", _f(3, 4), _scalar(1), reverse=1),
        case("CumSum", "exclusive", _f(3, 4), _scalar(0), exclusive=1),
        case("CumSum", "reverse_exclusive", _f(3, 4), _i64(1), reverse=1, exclusive=1),
        case("CumSum", "int", _ints(3, 4), _scalar(1)),
    ]
    return cases


def _norm_cases() -> list[Case]:
    return [
        case(
            "LayerNormalization",
            "all_outputs",
            _f(2, 3, 4),
            _f(4),
            _f(4),
            epsilon=1e-3,
            n_out=3,
        ),
        case("LayerNormalization", "axis", _f(2, 3, 4), _f(3, 4), _f(3, 4), axis=-2),
        case("LayerNormalization", "no_bias", _f(2, 3, 4), _f(3, 4), axis=1),
        case(
            "BatchNormalization",
            "",
            _f(2, 3, 4, 5),
            _f(3),
            _f(3),
            _f(3),
            _pos(3),
            epsilon=1e-3,
            opset=15,
        ),
        case("BatchNormalization", "2d", _f(4, 3), _f(3), _f(3), _f(3), _pos(3), opset=15),
        case("BatchNormalization", "opset9", _f(2, 3, 4), _f(3), _f(3), _f(3), _pos(3), opset=9),
        case("InstanceNormalization", "", _f(2, 3, 4, 5), _f(3), _f(3), epsilon=1e-3),
        case("InstanceNormalization", "1d", _f(2, 3, 6), _f(3), _f(3)),
    ]


def _linear_cases() -> list[Case]:
    return [
        case("MatMul", "", _f(3, 4), _f(4, 5)),
        case("MatMul", "batched_broadcast", _f(2, 1, 3, 4), _f(3, 4, 2)),
        case("MatMul", "vector_matrix", _f(4), _f(2, 4, 3)),
        case("MatMul", "matrix_vector", _f(2, 3, 4), _f(4)),
        case("MatMul", "vector_vector", _f(4), _f(4)),
        case(
            "Gemm",
            "trans",
            _f(4, 3),
            _f(5, 4),
            _f(5),
            transA=1,
            transB=1,
            alpha=0.5,
            beta=2.0,
        ),
        case("Gemm", "column_bias", _f(3, 4), _f(4, 5), _f(3, 1), beta=-1.5),
        case("Gemm", "no_bias", _f(3, 4), _f(5, 4), transB=1, alpha=1.5),
        case("Gemm", "scalar_bias", _f(3, 4), _f(4, 2), _f(), transA=0),
        case("Gemm", "row_bias", _f(2, 3), _f(3, 2), _f(1, 2)),
        case("Einsum", "batched", _f(2, 3, 4), _f(2, 4, 5), equation="bij,bjk->bik"),
        case("Einsum", "attention", _f(1, 2, 3, 4), _f(1, 2, 5, 4), equation="bhqd,bhkd->bhqk"),
        case("Einsum", "transpose", _f(3, 4), equation="ij->ji"),
        case("Einsum", "implicit", _f(3, 4), _f(5, 4), equation="ij,kj"),
        case("Einsum", "contract_all", _f(3, 4), _f(3, 4), equation="ij,ij->"),
        case("Einsum", "ellipsis", _f(2, 3, 4), _f(4, 2), equation="...ij,jk->...ik"),
    ]


def _conv_cases() -> list[Case]:
    return [
        case(
            "Conv",
            "same_upper",
            _f(1, 2, 7, 6),
            _f(3, 2, 3, 2),
            auto_pad="SAME_UPPER",
            strides=[2, 2],
        ),
        case("Conv", "same_lower", _f(1, 2, 7, 6), _f(3, 2, 2, 2), auto_pad="SAME_LOWER"),
        case(
            "Conv",
            "same_lower_strided",
            _f(1, 2, 8, 5),
            _f(2, 2, 3, 4),
            auto_pad="SAME_LOWER",
            strides=[3, 2],
        ),
        case(
            "Conv",
            "pads_groups_bias",
            _f(2, 4, 6, 5),
            _f(6, 2, 3, 3),
            _f(6),
            pads=[0, 1, 2, 1],
            group=2,
            dilations=[1, 2],
            strides=[1, 2],
        ),
        case(
            "Conv", "depthwise", _f(1, 3, 5, 5), _f(3, 1, 3, 3), _f(3), group=3, pads=[1, 1, 1, 1]
        ),
        case("Conv", "kernel_shape", _f(1, 2, 5, 4), _f(3, 2, 2, 3), kernel_shape=[2, 3]),
        case("Conv", "1d_valid", _f(2, 3, 9), _f(4, 3, 3), auto_pad="VALID", strides=[2]),
        case("Conv", "3d", _f(1, 2, 4, 5, 3), _f(2, 2, 2, 3, 2), _f(2), pads=[1, 0, 1, 0, 1, 1]),
        case(
            "ConvTranspose",
            "",
            _f(1, 2, 3, 4),
            _f(2, 3, 3, 3),
            _f(3),
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 0],
        ),
        case(
            "ConvTranspose",
            "1d_group_dilation",
            _f(2, 4, 5),
            _f(4, 1, 3),
            group=2,
            dilations=[2],
            strides=[3],
        ),
        case("ConvTranspose", "plain", _f(1, 3, 4, 4), _f(3, 2, 2, 2)),
    ]


def _pool_cases() -> list[Case]:
    return [
        case(
            "MaxPool",
            "pads_dilations",
            _f(1, 2, 7, 7),
            kernel_shape=[3, 3],
            pads=[1, 0, 1, 1],
            strides=[2, 1],
            dilations=[1, 2],
        ),
        case("MaxPool", "ceil", _f(1, 2, 6, 6), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        case(
            "MaxPool",
            "ceil_pads",
            _f(1, 2, 6, 7),
            kernel_shape=[3, 2],
            strides=[2, 3],
            pads=[1, 0, 0, 1],
            ceil_mode=1,
        ),
        case("MaxPool", "kernel_only", _f(1, 3, 4, 5), kernel_shape=[2, 2]),
        # ceil_mode: a window that would start in the end padding is left out.
        case(
            "MaxPool",
            "ceil_window_in_end_pad",
            _f(1, 2, 4, 5),
            kernel_shape=[2, 3],
            strides=[2, 2],
            pads=[0, 1, 1, 1],
            ceil_mode=1,
        ),
        *(
            case(
                "AveragePool",
                f"ceil_window_in_end_pad{'_include_pad' if include else ''}",
                _f(1, 2, 4, 5),
                kernel_shape=[2, 3],
                strides=[2, 2],
                pads=[0, 1, 1, 1],
                ceil_mode=1,
                count_include_pad=include,
            )
            for include in (0, 1)
        ),
        case(
            "MaxPool",
            "same_upper",
            _f(1, 2, 5, 6),
            kernel_shape=[2, 3],
            strides=[2, 2],
            auto_pad="SAME_UPPER",
        ),
        case("MaxPool", "1d", _f(2, 3, 8), kernel_shape=[3], strides=[2], pads=[1, 1]),
        case("MaxPool", "3d", _f(1, 1, 4, 4, 4), kernel_shape=[2, 2, 2], strides=[2, 1, 2]),
        case(
            "AveragePool",
            "exclude_pad",
            _f(1, 2, 6, 5),
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 0],
            strides=[2, 2],
        ),
        case(
            "AveragePool",
            "include_pad",
            _f(1, 2, 6, 5),
            kernel_shape=[3, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        case(
            "AveragePool", "ceil", _f(1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
        ),
        case(
            "AveragePool",
            "ceil_pads",
            _f(1, 2, 6, 7),
            kernel_shape=[3, 2],
            strides=[2, 3],
            pads=[1, 0, 0, 1],
            ceil_mode=1,
        ),
        case(
            "AveragePool",
            "ceil_include_pad",
            _f(1, 2, 6, 7),
            kernel_shape=[3, 2],
            strides=[2, 3],
            pads=[1, 0, 0, 1],
            ceil_mode=1,
            count_include_pad=1,
        ),
        case(
            "AveragePool",
            "same_lower",
            _f(1, 2, 5, 6),
            kernel_shape=[3, 2],
            strides=[2, 2],
            auto_pad="SAME_LOWER",
        ),
        case("AveragePool", "1d", _f(2, 3, 8), kernel_shape=[3], strides=[2]),
        case("GlobalAveragePool", "", _f(2, 3, 4, 5)),
        case("GlobalAveragePool", "1d", _f(2, 3, 4)),
        case("GlobalMaxPool", "", _f(2, 3, 4, 5)),
        case("GlobalMaxPool", "3d", _f(1, 2, 3, 2, 4)),
    ]


def _resize_cases() -> list[Case]:
    # Gradients reach the data only: roi, scales and sizes place the samples.
    cases = [
        case(
            "Resize",
            f"{mode}_{coords}",
            _f(1, 2, 5, 6),
            None,
            None,
            _i64(*size),
            mode=mode,
            coordinate_transformation_mode=coords,
            opset=13,
            wrt=(0,),
        )
        for mode, coords, size in (
            ("linear", "half_pixel", [1, 2, 9, 4]),
            ("linear", "pytorch_half_pixel", [1, 2, 3, 11]),
            ("linear", "align_corners", [1, 2, 3, 11]),
            ("cubic", "half_pixel", [1, 2, 11, 7]),
            ("cubic", "pytorch_half_pixel", [1, 2, 4, 9]),
            ("cubic", "align_corners", [1, 2, 4, 9]),
        )
    ]
    cases += [
        case(
            "Resize",
            "nearest_scales",
            _f(1, 2, 3, 4),
            None,
            np.array([1, 1, 2, 3], np.float32),
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "linear_scales",
            _f(1, 2, 4, 6),
            None,
            np.array([1, 1, 2, 1.5], np.float32),
            mode="linear",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "linear_1d",
            _f(2, 3, 5),
            None,
            None,
            _i64(2, 3, 8),
            mode="linear",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "linear_3d_opset19",
            _f(1, 1, 3, 4, 2),
            None,
            None,
            _i64(1, 1, 5, 3, 4),
            mode="linear",
            opset=19,
            wrt=(0,),
        ),
        # Scales whose products are not whole: the coordinates follow the scale, not out/in.
        case(
            "Resize",
            "linear_inexact_scales",
            _f(1, 2, 5, 3),
            None,
            np.array([1, 1, 1.5, 1.7], np.float32),
            mode="linear",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "cubic_inexact_scales",
            _f(1, 1, 5, 4),
            None,
            np.array([1, 1, 1.5, 0.7], np.float32),
            mode="cubic",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "nearest_inexact_scales",
            _f(1, 2, 5, 3),
            None,
            np.array([1, 1, 1.5, 2.5], np.float32),
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "linear_down",
            _f(1, 2, 7, 6),
            None,
            None,
            _i64(1, 2, 3, 4),
            mode="linear",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "nearest_down_sizes",
            _f(1, 2, 7, 6),
            None,
            None,
            _i64(1, 2, 3, 4),
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
            opset=13,
            wrt=(0,),
        ),
        # A length of one: pytorch_half_pixel samples the first element, half_pixel the centre.
        case(
            "Resize",
            "linear_pytorch_half_pixel_to_one",
            _f(1, 2, 4, 5),
            None,
            None,
            _i64(1, 2, 1, 3),
            mode="linear",
            coordinate_transformation_mode="pytorch_half_pixel",
            opset=13,
            wrt=(0,),
        ),
        case(
            "Resize",
            "linear_half_pixel_to_one",
            _f(1, 2, 4, 5),
            None,
            None,
            _i64(1, 2, 1, 3),
            mode="linear",
            opset=13,
            wrt=(0,),
        ),
        # Exporters write empty roi and scales next to sizes.
        case(
            "Resize",
            "empty_roi_scales",
            _f(1, 2, 3, 4),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            _i64(1, 2, 6, 5),
            mode="cubic",
            coordinate_transformation_mode="pytorch_half_pixel",
            opset=11,
            wrt=(0,),
        ),
    ]
    return cases


def _shape_cases() -> list[Case]:
    return [
        case("Reshape", "zero_minus1", _f(2, 3, 4), _i64(0, -1, 2)),
        # No element to differentiate.
        case("Reshape", "allowzero", _f(2, 0, 4), _i64(4, 0, 2), allowzero=1, opset=14, wrt=()),
        case("Reshape", "flat", _f(2, 3, 4), _i64(-1)),
        case("Reshape", "int", _ints(2, 3), _i64(3, 1, 2)),
        case("Transpose", "default", _f(2, 3, 4)),
        case("Transpose", "perm", _f(2, 3, 4, 5), perm=[2, 0, 3, 1]),
        case("Unsqueeze", "attr", _f(2, 3), axes=[0, -1], opset=11),
        case("Unsqueeze", "input", _f(2, 3), _i64(1, -1), opset=13),
        case("Unsqueeze", "scalar", _scalar(3), _i64(0), opset=13),
        case("Squeeze", "attr", _f(1, 3, 1, 2), axes=[-2], opset=11),
        case("Squeeze", "attr_all", _f(1, 3, 1), opset=11),
        case("Squeeze", "input", _f(1, 3, 1, 2), _i64(0, -2), opset=13),
        case("Squeeze", "all", _f(1, 3, 1), opset=13),
        case("Concat", "", _f(2, 3), _f(2, 1), _f(2, 4), axis=-1),
        case("Concat", "int", _i64(2, 3), _i64(-1), _i64(5), axis=0),
        # The empty part has no element to differentiate.
        case("Concat", "empty_part", _f(2, 0, 3), _f(2, 2, 3), axis=1, wrt=(1,)),
        case("Split", "attr", _f(5, 4), axis=0, split=[2, 3], opset=11, n_out=2),
        case("Split", "even_opset11", _f(2, 6), axis=-1, opset=11, n_out=3),
        case("Split", "input", _f(5, 4), _i64(1, 3), axis=1, opset=13, n_out=2),
        case("Split", "even", _f(6, 2), opset=13, n_out=3),
        case("Split", "num_outputs_uneven", _f(7, 2), axis=0, num_outputs=3, opset=18, n_out=3),
        case("Split", "input_opset18", _f(3, 5), _i64(2, 0, 3), axis=-1, opset=18, n_out=3),
        case(
            "Slice",
            "neg_step",
            _f(5, 6),
            _i64(-1, 1),
            _i64(-100, 6),
            _i64(0, 1),
            _i64(-2, 2),
        ),
        case("Slice", "clamped", _f(5, 6), _i64(2), _i64(np.iinfo(np.int64).max), _i64(-1)),
        case("Slice", "default_axes", _f(5, 6), _i64(1, -4), _i64(-1, 100)),
        case("Slice", "empty", _f(5, 6), _i64(3), _i64(1), _i64(0)),
        case(
            "Slice",
            "neg_step_clamped",
            _f(5, 6),
            _i64(100, -100),
            _i64(-100, 2),
            _i64(0, 1),
            _i64(-1, -1),
        ),
        case("Slice", "neg_step_start_below", _f(5, 6), _i64(-100), _i64(-200), _i64(1), _i64(-1)),
        case("Slice", "int", _i64(2, 3, 4, 5), _i64(-2), _i64(np.iinfo(np.int64).max)),
        case("Slice", "attrs", _f(4, 5, 6), starts=[1, -3], ends=[100, -1], axes=[0, 2], opset=9),
        case("Slice", "attrs_default_axes", _f(4, 5), starts=[1, 0], ends=[3, -2], opset=9),
        case("Gather", "negative", _f(5, 3), np.array([[0, -1], [2, -5]], np.int64), axis=0),
        case("Gather", "scalar", _f(5, 3), _scalar(-1), axis=1),
        case("Gather", "axis_neg", _f(2, 5, 3), np.array([4, 0, 4], np.int32), axis=-2),
        case("Gather", "int_shape", _i64(2, 7, 16), _scalar(1)),
        case("GatherElements", "", _f(3, 4), np.array([[0, 2], [1, -1], [3, 3]], np.int64), axis=1),
        case("GatherElements", "axis0", _f(3, 2, 2), _ints(2, 2, 2, low=-3, high=3)),
        case("GatherND", "", _f(4, 3, 2), np.array([[1], [-1], [0]], np.int64)),
        case("GatherND", "k2", _f(4, 3, 2), np.array([[[1, 2]], [[-1, 0]]], np.int64)),
        case("GatherND", "full", _f(4, 3), np.array([[3, -1], [0, 0]], np.int64)),
        case("ScatterND", "", _f(4, 3), np.array([[1], [3]], np.int64), _f(2, 3)),
        case("ScatterND", "k2", _f(4, 3), np.array([[1, 2], [-1, 0]], np.int64), _f(2)),
        case(
            "ScatterND",
            "add",
            _f(4, 3),
            np.array([[1], [3], [1]], np.int64),
            _f(3, 3),
            reduction="add",
            opset=16,
        ),
        case(
            "ScatterElements",
            "",
            _f(3, 4),
            np.array([[1, -1], [0, 2], [3, 0]], np.int64),
            _f(3, 2),
            axis=-1,
        ),
        case(
            "ScatterElements",
            "axis0",
            _f(3, 2),
            np.array([[2, 0], [0, 1]], np.int64),
            _f(2, 2),
        ),
        case(
            "ScatterElements",
            "add",
            _f(3, 4),
            np.array([[1, 1], [0, 0], [3, 3]], np.int64),
            _f(3, 2),
            axis=1,
            reduction="add",
            opset=16,
        ),
        case("Shape", "", _f(2, 3, 4, 5), opset=13),
        case("Shape", "start_end", _f(2, 3, 4, 5), start=1, end=-1),
        case("Shape", "start_negative", _f(2, 3, 4, 5), start=-2),
        case("Shape", "scalar", _scalar(1.5, np.float32)),
        case("Size", "", _f(2, 3)),
        case("Size", "int", _ints(4, 1, 2)),
        case("ConstantOfShape", "float", _i64(2, 3), value=_tensor(np.array([1.5], np.float32))),
        case("ConstantOfShape", "int", _i64(3), value=_tensor(np.array([7], np.int64))),
        case("ConstantOfShape", "default", _i64(2, 1, 2)),
        case(
            "ConstantOfShape",
            "empty",
            np.zeros(0, np.int64),
            value=_tensor(np.array([2.0], np.float32)),
        ),
        case("Constant", "tensor", value=_tensor(_f(2, 3))),
        case("Constant", "int_tensor", value=_tensor(_i64(3, -1))),
        case("Constant", "value_float", value_float=0.25),
        case("Constant", "value_floats", value_floats=[0.5, -1.25]),
        case("Constant", "value_int", value_int=-3),
        case("Constant", "value_ints", value_ints=[1, 0, -2]),
        case("Expand", "bidirectional", _f(3, 1), _i64(2, 1, 4)),
        case("Expand", "same_rank", _f(1, 3), _i64(4, 3)),
        case("Expand", "int", _i64(5), _i64(2, 1)),
        case("Tile", "", _f(2, 3), _i64(2, 1)),
        case("Tile", "3d", _f(1, 2, 2), _i64(2, 3, 1)),
        case("Tile", "int", _i64(1, 2), _i64(3)),
        case("Trilu", "lower_k", _f(2, 4, 5), _scalar(1), upper=0),
        case("Trilu", "upper", _f(4, 4)),
        case("Trilu", "upper_negative_k", _f(3, 5), _scalar(-1)),
        case("Trilu", "int", _ints(4, 3), upper=0),
        case("Flatten", "", _f(2, 3, 4), axis=2),
        case("Flatten", "default", _f(2, 3, 4)),
        case("Flatten", "axis0", _f(2, 3, 4), axis=0),
        case("Flatten", "negative", _f(2, 3, 4, 2), axis=-1),
        case("Identity", "", _f(2, 3)),
        case("Identity", "int", _ints(3)),
        case("Dropout", "", _f(3, 4)),
        case("Dropout", "mask", _f(3, 4), n_out=2),
        # The ratio is unused at inference.
        case("Dropout", "ratio", _f(3, 4), _scalar(0.3, np.float32), opset=13, wrt=(0,)),
    ]


def _pad_cases() -> list[Case]:
    # The interpreter reads a constant pad value as a number: gradients reach the data only.
    return [
        case(
            "Pad",
            "constant",
            _f(2, 3),
            _i64(0, 1, 1, 2),
            _scalar(0.5, np.float32),
            wrt=(0,),
        ),
        case("Pad", "default_value", _f(2, 3), _i64(1, 0, 0, 1)),
        case("Pad", "negative", _f(3, 4), _i64(-1, 1, 0, -2)),
        case("Pad", "reflect", _f(1, 2, 4, 4), _i64(0, 0, 1, 2, 0, 0, 2, 1), mode="reflect"),
        case("Pad", "reflect_3d", _f(2, 3, 5), _i64(0, 0, 2, 0, 0, 1), mode="reflect"),
        case(
            "Pad",
            "edge_axes",
            _f(1, 2, 4, 4),
            _i64(1, 2, 0, 1),
            None,
            _i64(2, 3),
            mode="edge",
            opset=18,
        ),
        case(
            "Pad",
            "constant_negative_axes",
            _f(2, 3, 4),
            _i64(1, 0, 2, 1),
            _scalar(-1.0, np.float32),
            _i64(-1, 0),
            opset=18,
            wrt=(0,),
        ),
        case("Pad", "wrap", _f(1, 2, 3, 4), _i64(0, 0, 1, 2, 0, 0, 2, 1), mode="wrap", opset=19),
        case("Pad", "int", _ints(2, 3), _i64(1, 1, 0, 2), _scalar(9)),
        case("Pad", "attrs", _f(2, 3), pads=[0, 1, 2, 0], value=1.5, opset=2),
        case(
            "Pad", "attrs_edge", _f(1, 2, 3, 3), pads=[0, 0, 1, 1, 0, 0, 1, 0], mode="edge", opset=2
        ),
    ]


def _cast_cases() -> list[Case]:
    special = np.array([[-2.7, -0.5, 0.0], [0.5, 1.9, 3.0]], np.float32)
    # Casts to integers or booleans have no gradient; the CastLike target only gives a type.
    return [
        case("Cast", "to_int64", special * 3, to=TensorProto.INT64, wrt=()),
        case("Cast", "to_int32", special, to=TensorProto.INT32, wrt=()),
        case("Cast", "to_bool", special, to=TensorProto.BOOL, wrt=()),
        case("Cast", "int_to_float", _ints(2, 3), to=TensorProto.FLOAT),
        case("Cast", "bool_to_float", _bools(2, 3), to=TensorProto.FLOAT),
        case("Cast", "float_to_double", _f(2, 3), to=TensorProto.DOUBLE),
        case("Cast", "float_to_float", _f(2, 3), to=TensorProto.FLOAT),
        case("Cast", "int_to_int32", _ints(4), to=TensorProto.INT32),
        case("CastLike", "int_to_float", _i64(1, -2), _f(1)),
        case("CastLike", "float_to_int", special, _i64(0), wrt=()),
        case("CastLike", "float_to_double", _f(2, 2), np.zeros(1, np.float64), wrt=(0,)),
    ]


def _quantization_cases() -> list[Case]:
    # QuantizeLinear gives its grid values in the compute dtype (fake quantization, so that a
    # QDQ graph can be differentiated): compared by value, with no gradient check.
    u8, i8 = np.uint8, np.int8
    return [
        case("QuantizeLinear", "tensor_u8", _f(2, 5), _scalar(0.05, np.float32), _scalar(128, u8)),
        case("QuantizeLinear", "tensor_no_zero", _f(2, 5), _scalar(0.02, np.float32)),
        case(
            "QuantizeLinear",
            "axis_i8",
            _f(2, 3, 4),
            np.array([0.01, 0.02, 0.05], np.float32),
            np.zeros(3, i8),
            axis=1,
        ),
        case(
            "DequantizeLinear",
            "tensor_u8",
            _ints(2, 5, low=0, high=256, dtype=u8),
            _scalar(0.05, np.float32),
            _scalar(128, u8),
        ),
        case(
            "DequantizeLinear",
            "axis_i8",
            _ints(4, 3, low=-128, high=128, dtype=i8),
            np.array([0.01, 0.02, 0.05], np.float32),
            np.array([1, -2, 0], i8),
            axis=1,
            wrt=(1,),
        ),
    ]


def _misc_cases() -> list[Case]:
    return [
        case(
            "Range",
            "float",
            _scalar(0.5, np.float32),
            _scalar(3.0, np.float32),
            _scalar(0.75, np.float32),
            # The length is a step function of limit.
            wrt=(0, 2),
        ),
        case(
            "Range",
            "float_negative_delta",
            _scalar(1.25, np.float32),
            _scalar(-2.0, np.float32),
            _scalar(-0.5, np.float32),
            wrt=(0, 2),
        ),
        case(
            "Range",
            "float_empty",
            _scalar(1.0, np.float32),
            _scalar(2.0, np.float32),
            _scalar(-0.5, np.float32),
            # Empty: nothing to differentiate.
            wrt=(),
        ),
        case("Range", "int", _scalar(1), _scalar(10), _scalar(3)),
        case("Range", "negative_delta", _scalar(5), _scalar(-3), _scalar(-2)),
        case("Range", "empty", _scalar(5), _scalar(1), _scalar(1)),
        case("Range", "int32", _scalar(-2, np.int32), _scalar(3, np.int32), _scalar(2, np.int32)),
        case("NonZero", "float", np.array([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]], np.float32)),
        case("NonZero", "bool", _bools(3, 4)),
        case("NonZero", "int", np.array([0, 3, 0, -1], np.int64)),
        case("NonZero", "none", np.zeros((2, 2), np.float32)),
        case("OneHot", "", _i64(0, 2, -1, 3), _scalar(4), np.array([0.0, 1.0], np.float32)),
        case(
            "OneHot",
            "axis0",
            np.array([[1, -2], [0, 2]], np.int64),
            _scalar(3),
            np.array([-0.5, 2.0], np.float32),
            axis=0,
        ),
        # Indices outside [-depth, depth - 1] give rows of off values.
        case(
            "OneHot", "out_of_range", _i64(0, 5, -5, 3), _i64(4), np.array([0.5, 2.0], np.float32)
        ),
        case(
            "OneHot",
            "float_depth",
            _i64(3, 0, -4),
            _scalar(4.0, np.float32),
            np.array([1.0, -1.0], np.float32),
            # A depth is a count: no gradient.
            wrt=(2,),
        ),
        case(
            "OneHot",
            "int_values",
            _i64(1, 0),
            _i64(3),
            _i64(5, 9),
            axis=-2,
        ),
    ]


def _logic_cases() -> list[Case]:
    cases = []
    for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
        ties = np.round(_f(2, 3))
        cases += [
            case(op, "", ties, np.round(_f(3))),
            case(op, "int", _ints(2, 3, low=-2, high=2), _ints(1, 3, low=-2, high=2)),
        ]
    cases += [case("Equal", "bool", _bools(2, 3), _bools(3), opset=11)]
    for op in ("And", "Or", "Xor"):
        cases += [case(op, "", _bools(2, 3), _bools(3))]
    cases += [
        case("Not", "", _bools(2, 3)),
        case("Where", "", _bools(3), _f(2, 3), _f(1)),
        case("Where", "broadcast", _bools(2, 1), _f(3), _f(2, 3)),
        case("Where", "int", _bools(2, 3), _ints(2, 3), _scalar(-1)),
        case("IsNaN", "", np.array([1.0, np.nan, 0.0, np.inf], np.float32)),
    ]
    special = np.array([1.0, np.inf, -np.inf, np.nan, 0.0], np.float32)
    cases += [
        case("IsInf", "", special),
        case("IsInf", "positive", special, detect_negative=0),
        case("IsInf", "negative", special, detect_positive=0),
    ]
    return cases


CASES: list[Case] = [
    *_unary_cases(),
    *_arithmetic_cases(),
    *_softmax_cases(),
    *_reduce_cases(),
    *_index_reduce_cases(),
    *_norm_cases(),
    *_linear_cases(),
    *_conv_cases(),
    *_pool_cases(),
    *_resize_cases(),
    *_shape_cases(),
    *_pad_cases(),
    *_cast_cases(),
    *_misc_cases(),
    *_quantization_cases(),
    *_logic_cases(),
]

# Ops that need no gradient check, each for the reason in its comment.
FAKE_QUANT = {"QuantizeLinear"}  # integer grid values in the compute dtype
NON_DIFFERENTIABLE = {
    "QuantizeLinear",  # straight-through gradient, not the piecewise-constant derivative
    # piecewise constant: zero derivative wherever it exists
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    # integer or boolean results
    "ArgMax",
    "ArgMin",
    "NonZero",
    "Shape",
    "Size",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "IsNaN",
    "IsInf",
    # no float input: the values come from attributes or integer shapes
    "Constant",
    "ConstantOfShape",
}

GRAD_CASES = [c for c in CASES if c.op not in NON_DIFFERENTIABLE and c.grad_inputs]


def _model(c: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The one-node model of ``c`` and its feeds: float inputs are graph inputs, the others
    initializers (as axes, shapes and indices are in exported models)."""
    names = ["" if a is None else f"x{i}" for i, a in enumerate(c.inputs)]
    given = {n: a for n, a in zip(names, c.inputs, strict=True) if a is not None}
    feeds = {n: a for n, a in given.items() if a.dtype.kind == "f"}
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in feeds.items()
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in given.items() if n not in feeds]
    outputs = [f"y{k}" for k in range(c.n_out)]
    node = helper.make_node(c.op, names, outputs, name=c.id, **c.attrs)
    graph = helper.make_graph(
        [node], c.id, graph_inputs, [onnx.ValueInfoProto(name=o) for o in outputs], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", c.opset)])
    # onnxruntime rejects IR versions newer than it knows.
    model.ir_version = 10
    # Strict inference types the outputs and rejects a node its schema does not allow.
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model)
    return model, feeds


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # The op's own kernel, not a constant-folded or fused replacement.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def test_case_ids_are_unique():
    ids = _ids(CASES)
    assert len(ids) == len(set(ids))


def test_cases_cover_exactly_the_table():
    covered = {c.op for c in CASES}
    assert sorted(set(OPS) - covered) == [], "ops of OPS without a test case"
    assert sorted(covered - set(OPS)) == [], "test cases for ops not in OPS"


def test_every_differentiable_op_has_a_gradient_check():
    assert NON_DIFFERENTIABLE <= set(OPS)
    with_grad = {c.op for c in GRAD_CASES}
    assert sorted(set(OPS) - NON_DIFFERENTIABLE - with_grad) == []


@pytest.mark.parametrize("c", CASES, ids=_ids(CASES))
def test_forward_matches_onnxruntime(c: Case):
    model, feeds = _model(c)
    expected = _onnxruntime(model, feeds)
    with torch.no_grad():
        got = TorchGraph(model, dtype=torch.float64).run(feeds)
    assert list(got) == [o.name for o in model.graph.output]
    for name, ref, value in zip(got, expected, got.values(), strict=True):
        value = value.numpy()
        assert value.shape == ref.shape, name
        if c.op in FAKE_QUANT:
            np.testing.assert_array_equal(value, ref.astype(np.float64), err_msg=name)
        elif ref.dtype.kind == "f":
            assert value.dtype == np.float64, name
            scale = max(1.0, float(np.nanmax(np.abs(ref), initial=0.0)))
            np.testing.assert_allclose(
                value, ref.astype(np.float64), rtol=RTOL, atol=RTOL * scale, err_msg=name
            )
        else:
            assert value.dtype == ref.dtype, name
            np.testing.assert_array_equal(value, ref, err_msg=name)


@pytest.mark.parametrize("c", GRAD_CASES, ids=_ids(GRAD_CASES))
def test_gradient_matches_finite_differences(c: Case):
    model, feeds = _model(c)
    graph = TorchGraph(model, dtype=torch.float64)
    names = [f"x{i}" for i in c.grad_inputs]
    leaves = [torch.tensor(feeds[n], dtype=torch.float64, requires_grad=True) for n in names]

    def fn(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = graph.run({**feeds, **dict(zip(names, values, strict=True))})
        return tuple(v for v in out.values() if v.is_floating_point())

    assert fn(*leaves), "no float output to differentiate"
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)
