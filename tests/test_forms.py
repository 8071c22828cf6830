"""The forms deployed files come in (issue 15): old opsets and IR versions, weight paths and
their storage forms. Each is built from the tests' own models with the ecosystem's tools, then
compressed; the output keeps the input's opset, IR version and storage form, and full rank
reproduces the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flarc.calib.data import CalibrationSet
from flarc.calib.statistics import collect_statistics
from flarc.cli import main
from flarc.core.targets import find_targets

from _models import SmallCnn, export, full_rank_model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _full_rank_reproduces(model: onnx.ModelProto, data: CalibrationSet, rtol: float) -> None:
    """Every target at full rank (exact factors): the rewritten model computes the original."""
    _, full = full_rank_model(model, data)
    feed = data.heldout[0]
    for a, b in zip(_session(full).run(None, feed), _session(model).run(None, feed), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("opset", [7, 9, 11])
def test_old_opset_models_compress_and_keep_their_opset_and_ir(tmp_path, opset):
    torch.manual_seed(0)
    path = export(SmallCnn(), (torch.randn(2, 3, 12, 12),), tmp_path / "m.onnx", ["x"],
                  {"x": {0: "b"}}, opset=opset)  # fmt: skip
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((24, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "small.onnx"
    args = ["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "c.npz")]
    assert main([*args, "--batch-size", "4", "--ratio", "0.5", "--align", "4"]) == 0
    small = onnx.load(str(out))
    assert small.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in small.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    onnx.checker.check_model(small)
    small_params = sum(int(np.prod(t.dims)) for t in small.graph.initializer)
    assert small_params < sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    feeds = [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(4)]
    _full_rank_reproduces(model, CalibrationSet(feeds[:3], feeds[3:], "t"), 1e-4)


def _masked_matmul(opset: int) -> onnx.ModelProto:
    """``y = (x W) * mask``: a model with an attention mask, in ops every opset from 7 has."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    axes = [numpy_helper.from_array(np.array([2], np.int64), "axes")] if opset >= 13 else []
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        *(
            [helper.make_node("Unsqueeze", ["m"], ["m3"], axes=[2])]
            if opset < 13
            else [helper.make_node("Unsqueeze", ["m", "axes"], ["m3"])]
        ),
        helper.make_node("Mul", ["h", "m3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
            # Before IR 4 every initializer is also listed as a graph input.
            *([helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 6])] if opset < 9 else []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 6])],
        [w, *axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 9 else 7
    onnx.checker.check_model(model)
    return model


def test_masked_statistics_are_the_same_before_and_after_compress_exists():
    """Before opset 9 (no Compress) padded rows are zeroed instead of dropped: every statistic,
    the row count included, is the same as the Compress path's."""
    rng = np.random.default_rng(2)
    feeds = []
    for _ in range(3):
        mask = np.ones((3, 5), np.int64)
        mask[1, 3:] = 0
        mask[2, 1:] = 0
        feeds.append(
            {"x": rng.standard_normal((3, 5, 8)).astype(np.float32), "attention_mask": mask}
        )
    stats = {}
    for opset in (7, 8, 9, 13):
        model = _masked_matmul(opset)
        (target,) = find_targets(model).targets
        stats[opset] = collect_statistics(model, [target], feeds, precision="float64")[
            target.stat_key
        ]
    rows = np.concatenate([f["x"][f["attention_mask"] != 0] for f in feeds]).astype(np.float64)
    for opset, m in stats.items():
        assert m.count == len(rows) == 27, opset
        np.testing.assert_allclose(m.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.sum1, rows.sum(0), rtol=1e-12, atol=1e-12)
        assert m.sum4 == pytest.approx(float(np.sum(np.sum(rows * rows, 1) ** 2)), rel=1e-12)


def test_opset_below_7_is_a_one_line_error(tmp_path, capsys):
    model = _masked_matmul(7)
    model.opset_import[0].version = 6
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert main(["inspect", str(tmp_path / "old.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flarc: error:") and "opset 6" in err and "7" in err
