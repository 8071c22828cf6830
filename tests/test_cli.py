"""The command line: a compress run end to end, and bad input that fails cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from flarc.cli import main

from _models import Mlp3d, export


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def mlp(tmp_path):
    torch.manual_seed(0)
    path = export(
        Mlp3d(), (torch.randn(2, 5, 24),), tmp_path / "mlp.onnx", ["x"], {"x": {0: "b", 1: "s"}}
    )
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 5, 24)).astype(np.float32))
    return path


def fail(capsys, argv: list[str], *expect: str) -> str:
    """Run the CLI, expect a non-zero exit and a one-line error mentioning ``expect``."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    lines = [line for line in err.splitlines() if line.startswith("flarc: error:")]
    assert len(lines) == 1, err
    for word in expect:
        assert word in lines[0], lines[0]
    return lines[0]


def compress_argv(model, out, tmp_path) -> list[str]:
    """``flarc compress`` of ``model`` to ``out`` on the test's calibration file, ratio 0.5."""
    return ["compress", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
            "--ratio", "0.5", "--align", "4"]  # fmt: skip


def test_compress_end_to_end(tmp_path, mlp, capsys):
    before = sha(mlp)
    out = tmp_path / "small.onnx"
    code = main(
        [
            *compress_argv(mlp, out, tmp_path),
            "--report",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sha(mlp) == before
    onnx.checker.check_model(onnx.load(str(out)))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["factorized"] == 2
    assert report["summary"]["target_params_after"] < report["summary"]["target_params_before"]
    for row in report["targets"]:
        assert row["rank"] % 4 == 0 and row["rank"] < row["k_equiv"]
        assert 0 <= row["predicted_error"] < 1
    assert report["comparison"][0]["cosine"] > 0.5
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inspect_lists_targets(mlp, capsys):
    assert main(["inspect", str(mlp), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(t["n"], t["m"]) for t in data["targets"]] == [(24, 40), (40, 16)]


def test_console_script_runs(mlp):
    proc = subprocess.run(
        [sys.executable, "-m", "flarc.cli", "inspect", str(mlp)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "MatMul" in proc.stdout


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    fail(capsys, ["inspect", str(bad)], "bad.onnx")


def test_truncated_model(tmp_path, mlp, capsys):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(mlp.read_bytes()[: mlp.stat().st_size // 2])
    out = tmp_path / "o.onnx"
    fail(capsys, ["compress", str(cut), "-o", str(out), "--synthetic", "2"], "cut.onnx")
    assert not out.exists()


def test_model_without_targets(tmp_path, capsys):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(
        onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10
        ),
        str(path),
    )
    fail(
        capsys,
        ["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--synthetic", "2"],
        "relu.onnx",
        "no MatMul",
    )


@pytest.mark.parametrize(
    ("arrays", "expect"),
    [
        ({"y": np.zeros((4, 5, 24), np.float32)}, "'y'"),
        ({"x": np.zeros((4, 5, 23), np.float32)}, "'x'"),
        ({"x": np.zeros((4, 24), np.float32)}, "'x'"),
        ({"x": np.zeros((4, 5, 24), np.int32)}, "'x'"),
        ({"x": np.full((4, 5, 24), np.nan, np.float32)}, "NaN"),
        ({"x": np.full((4, 5, 24), np.inf, np.float32)}, "Inf"),
        ({"x": np.zeros((0, 5, 24), np.float32)}, "zero samples"),
    ],
)
def test_bad_calibration_arrays(tmp_path, mlp, capsys, arrays, expect):
    np.savez(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "o.onnx"
    fail(
        capsys, ["compress", str(mlp), "-o", str(out), "--calib", str(tmp_path / "bad.npz")], expect
    )
    assert not out.exists()


def test_pickled_calibration_is_refused(tmp_path, mlp, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "obj.npy", tmp_path / "x.npy")
    import zipfile

    with zipfile.ZipFile(tmp_path / "p.npz", "w") as z:
        z.write(tmp_path / "x.npy", "x.npy")
    fail(
        capsys,
        ["compress", str(mlp), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "p.npz")],
        "p.npz",
        "pickle",
    )


def test_external_data_outside_folder_is_refused(tmp_path, mlp, capsys):
    model = onnx.load(str(mlp))
    sub = tmp_path / "m"
    sub.mkdir()
    onnx.save(
        model, str(sub / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    (tmp_path / "secret.bin").write_bytes((sub / "w.bin").read_bytes())
    for location in ("../secret.bin", str(tmp_path / "secret.bin")):
        m = onnx.load(str(sub / "m.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        evil = sub / "evil.onnx"
        evil.write_bytes(m.SerializeToString())
        fail(capsys, ["inspect", str(evil)], "evil.onnx", "refused")
    (sub / "link.bin").symlink_to(tmp_path / "secret.bin")
    m = onnx.load(str(sub / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "link.bin"
    (sub / "evil.onnx").write_bytes(m.SerializeToString())
    fail(capsys, ["inspect", str(sub / "evil.onnx")], "outside")


def test_output_equal_to_input(mlp, capsys):
    before = sha(mlp)
    fail(capsys, ["compress", str(mlp), "-o", str(mlp), "--synthetic", "2"], "input model")
    assert sha(mlp) == before


def test_unwritable_output_folder(tmp_path, mlp, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fail(
        capsys, ["compress", str(mlp), "-o", str(blocker / "o.onnx"), "--synthetic", "2"], "o.onnx"
    )
    if os.geteuid() != 0:  # root writes anywhere, so the permission case needs a normal user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        fail(
            capsys,
            ["compress", str(mlp), "-o", str(ro / "o.onnx"), "--synthetic", "2"],
            "not writable",
        )


def test_compress_with_latency_reports_speedups(tmp_path, mlp, capsys, monkeypatch):
    monkeypatch.setenv("FLARC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "small.onnx"
    argv = compress_argv(mlp, out, tmp_path)
    assert main([*argv, "--latency", "ort-cpu", "--report", str(tmp_path / "r.json")]) == 0, (
        capsys.readouterr().err
    )
    timing = json.loads((tmp_path / "r.json").read_text())["latency"]
    assert timing["backend"] == "ort-cpu"
    assert timing["speedup"] > 0 and timing["predicted_speedup"] > 0
    assert timing["original"]["median"] > 0 and timing["compressed"]["median"] > 0
    profiled = json.loads((tmp_path / "r.json").read_text())["targets"]
    assert all(r["rank"] is None or r["rank"] < r["k_equiv"] for r in profiled)


def test_data_loader_script_and_calibration_data_reader(tmp_path, mlp):
    """A polygraphy-style loader script and an onnxruntime CalibrationDataReader give the same feeds."""
    from flarc.calib.data import load_calibration
    from flarc.core.inputs import model_inputs

    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(4):\n"
        "        yield {'x': rng.standard_normal((2, 5, 24)).astype(np.float32)}\n"
    )
    specs = model_inputs(onnx.load(str(mlp)))
    from_script = load_calibration(f"{script}:load_data", specs, holdout=0.25)

    class Reader:  # the onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter(
                [{"x": rng.standard_normal((2, 5, 24)).astype(np.float32)} for _ in range(4)]
            )

        def get_next(self):
            return next(self.feeds, None)

    from_reader = load_calibration(Reader(), specs, holdout=0.25)
    assert len(from_script.calibration) == len(from_reader.calibration) == 3
    assert len(from_script.heldout) == 1
    for a, b in zip(
        from_script.calibration + from_script.heldout,
        from_reader.calibration + from_reader.heldout,
        strict=True,
    ):
        np.testing.assert_array_equal(a["x"], b["x"])
    code = main(
        ["compress", str(mlp), "-o", str(tmp_path / "o.onnx"), "--calib", f"{script}:load_data"]
    )
    assert code == 0


def test_compress_lazy_external_model_matches_in_memory(tmp_path, mlp, capsys, monkeypatch):
    """A model with external data, compressed with its weights left in their files (forced
    here): the same output model as in memory; an output whose data file would replace the
    input's is refused, and the input stays untouched."""
    import flarc.core.modelio

    folder = tmp_path / "ext"
    folder.mkdir()
    src = folder / "m.onnx"
    onnx.save(onnx.load(str(mlp)), str(src), save_as_external_data=True,
              location="out.onnx.data", size_threshold=0)  # fmt: skip
    before = {p.name: sha(p) for p in folder.iterdir()}
    assert main(compress_argv(src, tmp_path / "eager.onnx", tmp_path)) == 0
    monkeypatch.setattr(flarc.core.modelio, "LARGE_MODEL_BYTES", 0)
    assert main(compress_argv(src, tmp_path / "lazy.onnx", tmp_path)) == 0, capsys.readouterr()
    eager = onnx.load(str(tmp_path / "eager.onnx"))
    lazy = onnx.load(str(tmp_path / "lazy.onnx"))
    assert [t.name for t in eager.graph.initializer] == [t.name for t in lazy.graph.initializer]
    for a, b in zip(eager.graph.initializer, lazy.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    fail(capsys, compress_argv(src, folder / "out.onnx", tmp_path), "out.onnx.data", "data file")
    assert before == {p.name: sha(p) for p in folder.iterdir()}
