"""Layer forms beyond Conv2d, Linear and plain Gemm (issue 15): Conv1d and Conv3d compress, full
rank reproduces them and the whitened-error identity holds against a real convolution; a Gemm
with transA=1 compresses and full rank reproduces it; a MatMul with a 3-D constant weight and a
ConvTranspose are skipped with their reasons while the other targets are compressed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn import functional as F

from flarc.calib.data import CalibrationSet
from flarc.cli import main
from flarc.core.targets import constant_tensors, find_targets, weight_matrix

from _models import export, full_rank_model


def _run(model: onnx.ModelProto, feed: dict, outputs: list[str] | None = None) -> list:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compress(tmp_path: Path, model: onnx.ModelProto, capsys, *calib: str) -> onnx.ModelProto:
    """``flarc compress`` at ratio 0.5: exit 0, the input file untouched, a valid output."""
    path, out = tmp_path / "model.onnx", tmp_path / "small.onnx"
    onnx.save(model, str(path))
    before = _sha(path)
    argv = ["compress", str(path), "-o", str(out), *calib, "--ratio", "0.5", "--align", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert _sha(path) == before
    small = onnx.load(str(out))
    onnx.checker.check_model(small)
    return small


def _factored(model: onnx.ModelProto) -> set[str]:
    """Target names whose factor pair is in ``model``."""
    suffix = "/lowrank_A"
    return {t.name[: -len(suffix)] for t in model.graph.initializer if t.name.endswith(suffix)}


def _full_rank(model: onnx.ModelProto, feeds: list[dict]):
    """The analysis (no shrinkage, every singular value) and the model with every target at full
    rank."""
    return full_rank_model(model, CalibrationSet(feeds, [], "t"))


def _assert_reproduces(model: onnx.ModelProto, full: onnx.ModelProto, feeds: list[dict]) -> None:
    for feed in feeds:
        for a, b in zip(_run(model, feed), _run(full, feed), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5 * np.abs(a).max())


# ---------------------------------------------------------------------------------------------
# Conv1d and Conv3d


class Conv1dNet(torch.nn.Module):
    """Two Conv1d: stride 2 with padding, then a dilated one with a wide kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv1d(4, 12, 3, stride=2, padding=1)
        self.b = torch.nn.Conv1d(12, 8, 5, padding=4, dilation=2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Conv3dNet(torch.nn.Module):
    """Two Conv3d: anisotropic strides, then a (1, 3, 3) kernel with a dilation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1)
        self.b = torch.nn.Conv3d(8, 6, (1, 3, 3), padding=(0, 2, 2), dilation=(1, 2, 2))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


CONVS = {
    "conv1d": (Conv1dNet, (3, 4, 20), F.conv1d),
    "conv3d": (Conv3dNet, (2, 3, 4, 8, 8), F.conv3d),
}


def _conv_model(tmp_path: Path, kind: str):
    cls, shape, conv = CONVS[kind]
    torch.manual_seed(0)
    path = export(cls(), (torch.randn(*shape),), tmp_path / f"{kind}.onnx", ["x"], {"x": {0: "b"}})
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    return onnx.load(str(path)), feeds, conv


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_1d_3d_compress_through_the_cli(tmp_path, kind, capsys):
    model, feeds, _ = _conv_model(tmp_path, kind)
    found = find_targets(model)
    nd = 1 if kind == "conv1d" else 3
    assert len(found.targets) == 2 and not found.skipped
    assert all(len(t.conv.kernel_shape) == nd for t in found.targets)
    np.savez(tmp_path / "c.npz", x=np.concatenate([f["x"] for f in feeds]))
    calib = ("--calib", str(tmp_path / "c.npz"), "--batch-size", "2")
    small = _compress(tmp_path, model, capsys, *calib)
    assert _factored(small) == {t.name for t in found.targets}
    convs = [n for n in small.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    # The first factor keeps the kernel and geometry; the second is a 1x..x1 conv.
    kernels = sorted(
        tuple(helper.get_attribute_value(a))
        for n in convs
        for a in n.attribute
        if a.name == "kernel_shape"
    )
    assert kernels.count((1,) * nd) == 2
    y0, y1 = _run(model, feeds[0])[0], _run(small, feeds[0])[0]
    assert y1.shape == y0.shape and np.isfinite(y1).all()


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_1d_3d_full_rank_and_whitened_error_identity(tmp_path, kind):
    """Full rank reproduces the model; predicted sum_{i>k} s_i^2 / sum s_i^2 equals the measured
    ||conv(X, W - W_k)||^2 / ||conv(X, W)||^2 with torch's convolution on the activations each
    target saw in a forward pass of the original."""
    model, feeds, conv = _conv_model(tmp_path, kind)
    analysis, full = _full_rank(model, feeds[:3])
    _assert_reproduces(model, full, feeds)
    targets = find_targets(model).targets
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t.input) for t in targets)
    consts = constant_tensors(model)
    checked = 0
    for t in targets:
        xs = [torch.from_numpy(_run(probe, f, [t.input])[0]).double() for f in feeds[:3]]
        nd = len(t.conv.kernel_shape)
        assert t.conv.pads[:nd] == t.conv.pads[nd:]  # torch pads symmetrically
        geometry = {
            "stride": t.conv.strides,
            "padding": t.conv.pads[:nd],
            "dilation": t.conv.dilations,
        }
        b = weight_matrix(t, consts[t.weight])

        def energy(matrix: np.ndarray, xs=xs, geometry=geometry, t=t) -> float:
            w = torch.from_numpy(np.ascontiguousarray(matrix.T.reshape(t.weight_shape)))
            return sum(float((conv(x, w, **geometry) ** 2).sum()) for x in xs)

        spectrum = analysis.entries[t.name].spectrum
        for k in sorted({1, 2, min(t.n, t.m) // 2, min(t.n, t.m) - 1}):
            a_k, c_k = spectrum.factors(k)
            measured = energy(b - a_k @ c_k) / energy(b)
            assert spectrum.error(k) == pytest.approx(measured, rel=1e-6), (t.name, k)
            checked += 1
    assert checked >= 6


# ---------------------------------------------------------------------------------------------
# Gemm with transA=1


def _gemm_trans_a() -> onnx.ModelProto:
    """x [16, b] read transposed by a Gemm (transA=1, alpha, beta, bias), then a MatMul."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 12)) / 4).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "C"),
        numpy_helper.from_array((rng.standard_normal((12, 8)) / 4).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node(
            "Gemm", ["x", "B", "C"], ["h"], name="gemm_ta", transA=1, alpha=0.5, beta=2.0
        ),
        helper.make_node("Tanh", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, "b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_gemm_trans_a_compresses_and_full_rank_reproduces(tmp_path, capsys):
    model = _gemm_trans_a()
    found = find_targets(model)
    gemm = next(t for t in found.targets if t.name == "gemm_ta")
    assert (gemm.n, gemm.m, gemm.transposed_input, gemm.transposed) == (16, 12, True, False)
    assert not found.skipped
    # The batch is axis 1 of x: random batches from --shape (an .npz batches along axis 0).
    small = _compress(tmp_path, model, capsys, "--synthetic", "6", "--shape", "x:16x10")
    assert _factored(small) == {"gemm_ta", "mm"}
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((16, 20)).astype(np.float32)} for _ in range(4)]
    analysis, full = _full_rank(model, feeds[:3])
    _assert_reproduces(model, full, feeds)
    # The statistic is over the rows x^T (tokens x n): the whitened-error identity on them.
    x = np.concatenate([f["x"].T for f in feeds[:3]]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    spectrum = analysis.entries["gemm_ta"].spectrum
    for k in (1, 4, 11):
        a_k, c_k = spectrum.factors(k)
        measured = np.linalg.norm(x @ (b - a_k @ c_k)) ** 2 / np.linalg.norm(x @ b) ** 2
        assert spectrum.error(k) == pytest.approx(measured, rel=1e-6), k


# ---------------------------------------------------------------------------------------------
# skipped with their reasons, the rest compressed


def _batched_matmul() -> onnx.ModelProto:
    """x [2, b, 16] times a constant [2, 16, 12] (one matrix per leading index), then a MatMul."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((2, 16, 12)) / 4).astype(np.float32), "W3"),
        numpy_helper.from_array((rng.standard_normal((12, 8)) / 4).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W3"], ["h"], name="bmm"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "b", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


class UpDown(torch.nn.Module):
    """A Conv2d, a ConvTranspose2d (skipped), a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.b = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.up(torch.relu(self.a(x)))))


def _conv_transpose(tmp_path: Path) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = export(
        UpDown(), (torch.randn(2, 3, 6, 6),), tmp_path / "updown.onnx", ["x"], {"x": {0: "b"}}
    )
    return onnx.load(str(path))


@pytest.mark.parametrize("kind", ["batched-matmul", "conv-transpose"])
def test_skipped_forms_keep_their_weight_and_the_rest_is_compressed(tmp_path, kind, capsys):
    if kind == "batched-matmul":
        model, shape = _batched_matmul(), (2, 4, 16)
        op, words, calib = "MatMul", ("'W3'", "3-D", "batched MatMul"), ("--synthetic", "4")
    else:
        model, shape = _conv_transpose(tmp_path), (2, 3, 6, 6)
        op, words, calib = "ConvTranspose", ("transposed convolution",), ("--synthetic", "4")
    found = find_targets(model)
    (skip,) = found.skipped
    assert skip.op_type == op and all(w in skip.reason for w in words), skip.reason
    skipped = next(n for n in model.graph.node if n.op_type == op)
    dense = skipped.input[1]
    small = _compress(tmp_path, model, capsys, *calib)
    assert _factored(small) == {t.name for t in found.targets} and found.targets
    # The skipped node reads its weight unchanged; the model still runs and changed only
    # through the factorized targets.
    before = {t.name: t for t in model.graph.initializer}
    after = {t.name: t for t in small.graph.initializer}
    assert after[dense].SerializeToString() == before[dense].SerializeToString()
    (kept,) = [n for n in small.graph.node if n.name == skipped.name]
    assert (kept.op_type, list(kept.input)) == (op, list(skipped.input))
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    y0, y1 = _run(model, {"x": x})[0], _run(small, {"x": x})[0]
    assert y1.shape == y0.shape and np.isfinite(y1).all()
    # Full rank of the other targets reproduces the model around the dense node.
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    _, full = _full_rank(model, feeds[:3])
    _assert_reproduces(model, full, feeds)
