"""Engines: .ort export loads and matches the ONNX model; polygraphy comparison; TensorRT absent."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from flarc.cli import build_parser
from flarc.cli.export import ExportOrt, ExportTrt
from flarc.core.errors import BackendError, FlarcError
from flarc.core.modelio import save_model
from flarc.export.engines import compare, export_ort, export_trt


def gemm_model(scale: float = 1.0) -> onnx.ModelProto:
    """X [batch, 16] -> Gemm(transB) -> Relu -> MatMul -> Y."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((24, 16)) * scale).astype(np.float32)
    b1 = rng.standard_normal(24).astype(np.float32)
    w2 = (rng.standard_normal((24, 8)) * scale).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], name="fc1", transB=1),
            helper.make_node("Relu", ["H"], ["R"], name="act"),
            helper.make_node("MatMul", ["R", "W2"], ["Y"], name="fc2"),
        ],
        "gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[
            numpy_helper.from_array(a, n) for a, n in [(w1, "W1"), (b1, "B1"), (w2, "W2")]
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    save_model(gemm_model(), path)
    return path


def run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def test_export_ort_loads_and_matches(model_path, tmp_path):
    out = export_ort(model_path, tmp_path / "model.ort")
    assert out.exists() and out.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(model_path, x), rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".model.ort.*"))  # no temporary left behind


def test_export_ort_refuses_bad_input(tmp_path, model_path):
    with pytest.raises(FlarcError, match="no such file"):
        export_ort(tmp_path / "missing.onnx", tmp_path / "x.ort")
    with pytest.raises(FlarcError, match="overwrite"):
        export_ort(model_path, model_path)


def test_compare_ort_passes_and_detects_a_different_model(model_path, tmp_path):
    ort_path = export_ort(model_path, tmp_path / "model.ort")
    result = compare(model_path, ort_path, shapes={"X": [4, 16]})
    assert result["passed"] and set(result["outputs"]) == {"Y"}
    assert result["outputs"]["Y"]["max_abs"] < 1e-4 and result["shapes"] == {"X": [4, 16]}
    other = tmp_path / "other.onnx"
    save_model(gemm_model(scale=0.9), other)
    bad = compare(model_path, other)
    assert not bad["passed"] and bad["outputs"]["Y"]["max_abs"] > 1e-3


def test_tensorrt_export_and_compare_fail_in_one_line(model_path, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: this test is for machines without it")
    with pytest.raises(
        BackendError, match=r"^tensorrt: Python module 'tensorrt' is not installed"
    ) as err:
        export_trt(model_path, tmp_path / "model.engine", fp16=True, shapes={"X": [1, 16]})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "model.engine").exists()
    fake_engine = tmp_path / "model.engine"
    fake_engine.write_bytes(b"not an engine")
    with pytest.raises(BackendError, match="tensorrt"):
        compare(model_path, fake_engine)


def test_cli_export_and_compare(model_path, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "m.ort"
    args = parser.parse_args(["export", "ort", str(model_path), "-o", str(out)])
    assert isinstance(args.func.__self__, ExportOrt) and args.func(args) == 0 and out.exists()
    args = parser.parse_args(["compare", str(model_path), str(out), "--shape", "X:2x16"])
    assert args.func(args) == 0
    assert "PASSED" in capsys.readouterr().out
    args = parser.parse_args(
        ["export", "trt", str(model_path), "-o", "e.plan", "--fp16", "--shape", "X:1x16"]
    )
    assert isinstance(args.func.__self__, ExportTrt) and args.fp16 and args.shape == ["X:1x16"]
