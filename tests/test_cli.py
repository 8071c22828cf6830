"""The command line: a compress run end to end, and bad input that fails cleanly."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from sklearn.covariance import ledoit_wolf

from flarc.cli import main
from flarc.core.targets import find_targets
from flarc.latency.model import load_latency_model
from flarc.latency.profile import LatencyProfile, ShapeProfile
from flarc.latency.spec import LayerSpec
from flarc.latency.timing import Stats

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
    err = capsys.readouterr().err
    assert code == 0, err
    # Redirected, progress is timed lines: every stage starts and ends, in pipeline order (no
    # sensitivities: --ratio needs none; held-out statistics when the held-out errors ask).
    stages = ["calibration statistics", "whitened SVD", "output guard", "comparison: original",
              "comparison: compressed", "held-out statistics", "held-out errors",
              "writing"]  # fmt: skip
    lines = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")]
    starts = [line.split(": started")[0] for line in lines if ": started" in line]
    assert starts == stages, starts
    for stage in stages:
        assert any(line.startswith(f"{stage}: ") and line.endswith("done") for line in lines)
    assert sha(mlp) == before
    onnx.checker.check_model(onnx.load(str(out)))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["factorized"] == 2
    assert report["summary"]["target_params_after"] < report["summary"]["target_params_before"]
    for row in report["targets"]:
        assert row["rank"] % 4 == 0 and row["rank"] < row["k_equiv"]
        assert 0 <= row["predicted_error"] < 1
    # An independent float64 reference (scikit-learn's Ledoit-Wolf, Cholesky, SVD; docs/design.md
    # sections 3-4) at the reported ranks: same intensities, predicted errors and held-out cosine.
    ranks = [row["rank"] for row in report["targets"]]
    reference = whitened_reference(mlp, np.load(tmp_path / "calib.npz")["x"], ranks)
    for row, (lam, error) in zip(report["targets"], reference["targets"], strict=True):
        assert row["rows"] == 56 * 5  # the first seven batches of eight samples, five tokens each
        assert row["shrinkage"] == pytest.approx(lam, rel=1e-6)  # fc2 reads float32 activations
        assert row["predicted_error"] == pytest.approx(error, rel=1e-6)
    cosine = report["comparison"][0]["cosine"]
    assert cosine == pytest.approx(reference["cosine"], rel=1e-6)
    assert cosine > 0.8  # measured 0.834: ranks 8 of 24 x 40 and 40 x 16 on white-noise inputs
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def whitened_reference(model_path, x: np.ndarray, ranks: list[int]) -> dict:
    """Mlp3d (``relu(x B1 + b1) B2``) compressed by hand in float64 at ``ranks``: per target the
    Ledoit-Wolf intensity and relative output error on the calibration rows (the first 56
    samples; the last of eight batches of eight is held out), and the held-out output cosine."""
    model = onnx.load(str(model_path))
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    b1, b2 = (w[n.input[1]] for n in model.graph.node if n.op_type == "MatMul")
    (bias,) = (w[i] for n in model.graph.node if n.op_type == "Add" for i in n.input if i in w)
    x = x.astype(np.float64)
    calib, held = x[:56].reshape(-1, x.shape[-1]), x[56:]

    def truncate(rows: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
        shrunk, lam = ledoit_wolf(rows, assume_centered=True)
        lower = np.linalg.cholesky(shrunk)
        u, s, vt = np.linalg.svd(lower.T @ b, full_matrices=False)
        b_k = np.linalg.solve(lower.T, u[:, :k] * s[:k]) @ vt[:k]
        return b_k, lam, float(np.sum(s[k:] ** 2) / np.sum(s**2))

    b1_k, lam1, err1 = truncate(calib, b1, ranks[0])
    b2_k, lam2, err2 = truncate(np.maximum(calib @ b1 + bias, 0), b2, ranks[1])
    y = np.maximum(held @ b1 + bias, 0) @ b2
    y_k = np.maximum(held @ b1_k + bias, 0) @ b2_k
    cosine = float(np.sum(y * y_k) / np.linalg.norm(y) / np.linalg.norm(y_k))
    return {"targets": [(lam1, err1), (lam2, err2)], "cosine": cosine}


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
    """``--latency ort-cpu`` profiles on the fly; the profile it left in the cache explains the
    report: every kept rank is predicted no slower than dense, every target left dense at its
    ratio rank is predicted slower, and the predicted speedup is the profile's (targets'
    predicted times plus the rest of the measured original time)."""
    monkeypatch.setenv("FLARC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "small.onnx"
    argv = compress_argv(mlp, out, tmp_path)
    assert main([*argv, "--latency", "ort-cpu", "--report", str(tmp_path / "r.json")]) == 0, (
        capsys.readouterr().err
    )
    report = json.loads((tmp_path / "r.json").read_text())
    timing = report["latency"]
    assert timing["backend"] == "ort-cpu" and timing["feeds"] == {"x": [8, 5, 24]}
    for side in ("original", "compressed"):
        assert 0 < timing[side]["min"] <= timing[side]["median"] <= timing[side]["max"] < 1
    assert math.isfinite(timing["speedup"]) and timing["speedup"] > 0
    # The same profile again, from the cache only: a new measurement would fail the test.
    import flarc.latency.ort_cpu

    def remeasured(*_):
        raise AssertionError("the profile was not cached")

    for method in ("time_dense", "time_pair"):
        monkeypatch.setattr(flarc.latency.ort_cpu.OrtCpuBackend, method, remeasured)
    model = onnx.load(str(mlp))
    targets = {t.name: t for t in find_targets(model).targets}
    latency = load_latency_model(
        "ort-cpu", model, list(targets.values()), {"x": [8, 5, 24]}, align=4
    )
    dense, new = 0.0, 0.0
    for row in report["targets"]:
        t = targets[row["name"]]
        assert latency.t_dense(t) > 0 and all(latency.t_pair(t, k) > 0 for k in (4, 8))
        dense += latency.t_dense(t)
        if row["rank"] is None:
            assert latency.lat_recov(t, 8) > 1.0 and "not faster" in row["reason"]
            new += latency.t_dense(t)
        else:
            assert row["rank"] == 8 and latency.lat_recov(t, 8) <= 1.0
            new += latency.t_pair(t, 8)
    rest = max(timing["original"]["median"] - dense, 0.0)
    assert timing["predicted_speedup"] == pytest.approx((rest + dense) / (rest + new), rel=1e-9)


def seconds(t: float) -> Stats:
    return Stats.from_samples([t])


def write_latency_file(path) -> None:
    """A made-up profile of the mlp fixture's targets at the held-out batch shape (8 x 5 tokens):
    dense 1 s each; fc1's rank-8 pair 1.2 s (slower), fc2's 0.5 s."""
    fc1 = LayerSpec("linear", 24, 40, (40, 24))
    fc2 = LayerSpec("linear", 40, 16, (40, 40))
    fc1_pairs = {4: seconds(0.6), 8: seconds(1.2), 12: seconds(1.5)}
    shapes = {
        fc1.key: ShapeProfile(fc1, seconds(1.0), fc1_pairs, ["/fc1/MatMul"]),
        fc2.key: ShapeProfile(
            fc2, seconds(1.0), {4: seconds(0.3), 8: seconds(0.5)}, ["/fc2/MatMul"]
        ),
    }
    names = {"/fc1/MatMul": fc1.key, "/fc2/MatMul": fc2.key}
    LatencyProfile("ort-cpu", "0", "made-up", 1, "fp32", 4, {"x": [8, 5, 24]}, shapes, names).save(
        path
    )


@pytest.mark.parametrize(
    ("max_lat_recov", "ranks", "predicted"),
    [(None, [None, 8], 2.0 / 1.5), ("1.25", [8, 8], 2.0 / 1.7)],
    ids=["default-1.0", "1.25"],
)
def test_compress_with_latency_file_obeys_max_lat_recov(
    tmp_path, mlp, capsys, max_lat_recov, ranks, predicted
):
    """With a latency file, a ratio rank predicted slower than ``--max-lat-recov`` x dense leaves
    the target dense, and the predicted speedup is the file's: the made-up layers take 1 s, far
    more than the whole measured model, so it is (dense times) / (chosen times) exactly."""
    write_latency_file(tmp_path / "latency.json")
    argv = compress_argv(mlp, tmp_path / "small.onnx", tmp_path)
    argv += ["--report", str(tmp_path / "r.json"), "--latency", str(tmp_path / "latency.json")]
    if max_lat_recov is not None:
        argv += ["--max-lat-recov", max_lat_recov]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [row["rank"] for row in report["targets"]] == ranks
    if ranks[0] is None:
        assert "not faster (lat_recov 1.20)" in report["targets"][0]["reason"]
    assert report["summary"]["factorized"] == sum(r is not None for r in ranks)
    assert report["latency"]["predicted_speedup"] == pytest.approx(predicted, rel=1e-12)
    # The written model really keeps fc1 dense when told to: its weight is still there.
    (fc1,) = (t for t in find_targets(onnx.load(str(mlp))).targets if t.name == "/fc1/MatMul")
    kept = {t.name for t in onnx.load(str(tmp_path / "small.onnx")).graph.initializer}
    assert (fc1.weight in kept) == (ranks[0] is None)


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


def test_preset_best_refits_closed_loop_and_fast_does_not(tmp_path, mlp, capsys):
    """The default rule under the default preset (best) runs the compensated closed loop after
    the SVDs (the original's side read from the inputs its calibration pass carried); --preset
    fast and an explicit rule (--ratio) stay open loop."""

    def stages(*extra: str) -> list[str]:
        out = tmp_path / f"{'_'.join(extra) or 'default'}.onnx"
        argv = ["compress", str(mlp), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                "--align", "4", *extra]  # fmt: skip
        assert main(argv) == 0
        err = capsys.readouterr().err
        return [line.split("] ", 1)[1].split(": started")[0] for line in err.splitlines()
                if line.startswith("[") and ": started" in line]  # fmt: skip

    best = stages()
    assert best.index("closed loop") == best.index("whitened SVD") + 1
    # The compensated closed loop keeps the original's inputs: one pass carries them to disk.
    assert best.index("calibration forward pass") < best.index("calibration statistics")
    fast = stages("--preset", "fast")
    assert "closed loop" not in fast and "calibration forward pass" not in fast
    assert "closed loop" not in stages("--ratio", "0.5")
    # --validate-fits chooses between closed-loop fits: on the open loop it is refused.
    argv = ["compress", str(mlp), "-o", str(tmp_path / "v.onnx"), "--calib",
            str(tmp_path / "calib.npz"), "--preset", "fast", "--validate-fits"]  # fmt: skip
    assert main(argv) != 0
    assert "--validate-fits" in capsys.readouterr().err
    assert not (tmp_path / "v.onnx").exists()
    assert "closed loop" in stages("--validate-fits")
    # --compensation-floor shrinks compensated fits: refused on the open loop and outside [0, 1].
    for extra in (["--preset", "fast"], ["--compensation-floor", "1.5"]):
        argv = ["compress", str(mlp), "-o", str(tmp_path / "f.onnx"), "--calib",
                str(tmp_path / "calib.npz"), "--compensation-floor", "0.4", *extra]  # fmt: skip
        assert main(argv) != 0
        assert "--compensation-floor" in capsys.readouterr().err
        assert not (tmp_path / "f.onnx").exists()
    assert "closed loop" in stages("--compensation-floor", "0.4")


def test_a_large_compress_removes_its_temporaries_while_it_writes(
    tmp_path, mlp, capsys, monkeypatch
):
    """The analysis' store and carried inputs (a large model's, here forced) are removed while
    the model is written (not after, nor at interpreter exit); the model is written whole."""
    import tempfile
    import threading

    import flarc.calib.statistics
    import flarc.core.modelio
    from flarc.rewrite.analysis import Analysis

    monkeypatch.setattr(flarc.core.modelio, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(flarc.calib.statistics, "STAT_GROUP_MIN_BYTES", 0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    removed = threading.Event()
    seen: dict[str, list[str]] = {}
    close, save = Analysis.close, flarc.core.modelio.save_model

    def closing(self) -> None:
        seen["before"] = sorted(p.name.split("-")[1] for p in scratch.iterdir())
        close(self)
        seen["after"] = sorted(p.name.split("-")[1] for p in scratch.iterdir())
        removed.set()

    def saving(*args, **kwargs):
        assert removed.wait(timeout=60), "the temporaries were not removed during the writing"
        return save(*args, **kwargs)

    monkeypatch.setattr(Analysis, "close", closing)
    monkeypatch.setattr(flarc.core.modelio, "save_model", saving)
    out = tmp_path / "small.onnx"
    code = main([*compress_argv(mlp, out, tmp_path)[:-4], "--budget", "0.6", "--align", "4"])
    assert code == 0, capsys.readouterr().err
    assert seen == {"before": ["store"], "after": []}  # the carried inputs live in the store
    assert onnx.load(str(out)).graph.node


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, mlp, capsys, monkeypatch):
    """numpy reports a full disk as an OSError naming neither file nor errno; the run ends with
    one line naming the file it was writing (exit 2), not as an internal error."""
    import flarc.calib.statistics
    import flarc.core.modelio

    monkeypatch.setattr(flarc.core.modelio, "LARGE_MODEL_BYTES", 0)  # arrays go to a store
    monkeypatch.setattr(flarc.calib.statistics, "STAT_GROUP_MIN_BYTES", 0)

    def full(*args, **kwargs):
        raise OSError("1000000 requested and 0 written")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "small.onnx"
    line = fail(capsys, compress_argv(mlp, out, tmp_path), "could not write", "requested and 0")
    assert ".npy" in line and not out.exists()
    assert main(compress_argv(mlp, out, tmp_path)) == 2
