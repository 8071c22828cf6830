"""Latency stage: shapes, cache, monotone predictor, LatencyModel seam, backends, CLI (no GPU)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flarc.cli import build_parser
from flarc.cli.args import ShapeArgs
from flarc.cli.latency import Profile, Show
from flarc.core.errors import BackendError, DataError
from flarc.core.modelio import prepare_for_save
from flarc.core.targets import ConvGeometry, find_targets
from flarc.latency.backend import Backend, get_backend
from flarc.latency.cache import LatencyCache, default_cache_dir
from flarc.latency.end_to_end import measure_end_to_end
from flarc.latency.model import LatencyModel, load_latency_model
from flarc.latency.predictor import LatencyRegressor, MonotoneCurve, isotonic
from flarc.latency.profile import LatencyProfile, ShapeProfile, profile_model
from flarc.latency.shapes import input_shapes, target_input_shapes
from flarc.latency.spec import LayerSpec, spec_for_target
from flarc.latency.timing import Stats, TimingConfig, measure

QUICK = TimingConfig.quick()


def mlp_model(n: int = 32, hidden: int = 64, scale: float = 1.0) -> onnx.ModelProto:
    """X [batch, seq, n] -> MatMul -> Relu -> MatMul -> Y, with symbolic batch and seq."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((n, hidden)) * scale).astype(np.float32)
    w2 = (rng.standard_normal((hidden, n)) * scale).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
            helper.make_node("Relu", ["H"], ["R"], name="act"),
            helper.make_node("MatMul", ["R", "W2"], ["Y"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", n])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return prepare_for_save(model)


def conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["X", "W"], ["Y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]
            )
        ],
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return prepare_for_save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def stats(t: float) -> Stats:
    return Stats.from_samples([t * 0.99, t, t * 1.01])


class CountingBackend(Backend):
    """Deterministic fake: dense costs n*m, a pair k*(n+m) plus a fixed overhead; counts calls."""

    name = "fake"

    def __init__(self, device: str = "fake-device", **kw) -> None:
        super().__init__(**kw)
        self.device = device
        self.calls: list[tuple[str, int | None]] = []

    def version(self) -> str:
        return "1.0"

    def fingerprint(self) -> str:
        return self.device

    def time_dense(self, spec: LayerSpec) -> Stats:
        self.calls.append((spec.key, None))
        return stats(1e-9 * spec.tokens * spec.n * spec.m + 1e-6)

    def time_pair(self, spec: LayerSpec, k: int) -> Stats:
        self.calls.append((spec.key, k))
        return stats(1e-9 * spec.tokens * k * (spec.n + spec.m) + 2e-6)


# --- shapes ---------------------------------------------------------------------------------


def test_symbolic_dims_default_and_override():
    model = mlp_model()
    assert input_shapes(model) == {"X": [1, 128, 32]}
    assert input_shapes(model, {"X": [2, 16, 32]}) == {"X": [2, 16, 32]}
    with pytest.raises(DataError, match="not a model input"):
        input_shapes(model, {"nope": [1]})
    with pytest.raises(DataError, match="fixes 32"):
        input_shapes(model, {"X": [1, 16, 31]})


def test_parse_shape_args():
    assert parse_shape_args(["X:1x128", "ids:0:2x8", "y:3,4"]) == {
        "X": [1, 128],
        "ids:0": [2, 8],
        "y": [3, 4],
    }
    for bad in ["X", "X:", "X:1xa", "X:0x3", ":3"]:
        with pytest.raises(DataError, match="NAME:DIMS"):
            parse_shape_args([bad])


def test_target_shapes_by_inference_and_by_running_ort():
    model = mlp_model()
    targets = find_targets(model).targets
    shapes = target_input_shapes(model, targets, {"X": [2, 8, 32]})
    assert shapes == {"fc1": (2, 8, 32), "fc2": (2, 8, 64)}
    # Without any shape information in value_info or outputs, onnxruntime must supply them.
    from flarc.latency import shapes as shapes_mod

    observed = shapes_mod._observed_shapes(
        model, {"X": np.zeros((2, 8, 32), np.float32)}, {"X", "R"}
    )
    assert observed == {"X": (2, 8, 32), "R": (2, 8, 64)}
    spec = spec_for_target(targets[1], shapes["fc2"])
    assert (spec.kind, spec.tokens, spec.n, spec.m) == ("linear", 16, 64, 32)
    assert spec.key == "linear:16x64->32"


def test_conv_spec_geometry():
    model = conv_model()
    (target,) = find_targets(model).targets
    shapes = target_input_shapes(model, [target], {"X": [2, 8, 12, 12]})
    spec = spec_for_target(target, shapes["conv"])
    assert spec.out_spatial == (6, 6) and spec.tokens == 2 * 36 and spec.n == 72
    same = ConvGeometry((3, 3), (2, 2), (0, 0, 0, 0), (1, 1), "SAME_UPPER")
    assert LayerSpec("conv", 72, 16, (1, 8, 11, 11), same).out_spatial == (6, 6)
    assert LayerSpec("conv", 72, 16, (1, 8, 11, 11), same).pads == (1, 1, 1, 1)
    assert LayerSpec.from_dict(spec.to_dict()) == spec


# --- predictor ------------------------------------------------------------------------------


def test_curve_interpolates_measured_points_exactly():
    ks, ts = [8, 16, 24, 32], [1.0, 1.5, 2.7, 3.0]
    curve = MonotoneCurve(ks, ts)
    for k, t in zip(ks, ts, strict=True):
        assert curve(k) == t
    assert curve(12) == pytest.approx(1.25)
    assert curve(4) == 1.0  # held below the grid
    assert curve(40) == pytest.approx(3.3)  # last slope continued


def test_curve_is_monotone_on_noisy_data():
    rng = np.random.default_rng(3)
    ks = list(range(8, 200, 8))
    ts = [k * 0.01 + rng.normal(0, 0.3) for k in ks]
    curve = MonotoneCurve(ks, ts)
    values = [curve(k) for k in np.linspace(1, 260, 500)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert not all(b >= a for a, b in itertools.pairwise(ts))  # the data really were noisy
    fit = isotonic(ts)
    assert np.mean(fit) == pytest.approx(np.mean(ts))  # least squares keeps the mean


def test_regressor_is_monotone_in_rank_and_fits_its_data():
    specs = [
        LayerSpec("linear", n, m, (t, n))
        for t, n, m in [(128, 384, 384), (128, 384, 1536), (64, 256, 256)]
    ]
    samples = []
    for s in specs:
        samples.append((s, None, 1e-9 * s.flops(None) + 1e-5))
        samples += [(s, k, 1e-9 * s.flops(k) + 2e-5) for k in s.grid(32)]
    reg = LatencyRegressor().fit(samples)
    new = LayerSpec("linear", 512, 512, (100, 512))
    preds = [reg.predict(new, k) for k in range(8, 257, 8)]
    assert all(p > 0 and math.isfinite(p) for p in preds)
    assert all(b >= a for a, b in itertools.pairwise(preds))
    errors = [abs(math.log(reg.predict(s, k) / t)) for s, k, t in samples]
    assert max(errors) < math.log(2)


def synthetic_profile() -> LatencyProfile:
    spec = LayerSpec("linear", 64, 64, (16, 64))
    pair = {8: stats(0.2), 16: stats(0.45), 24: stats(0.8), 32: stats(1.3)}
    sp = ShapeProfile(spec=spec, dense=stats(1.0), pair=pair, targets=["a"])
    return LatencyProfile(
        "fake", "1", "dev", None, "fp32", 8, {"X": [16, 64]}, {spec.key: sp}, {"a": spec.key}
    )


def test_latency_model_exact_monotone_break_even():
    profile = synthetic_profile()
    spec = next(iter(profile.shapes.values())).spec
    lm = LatencyModel(profile)
    for k, s in profile.shapes[spec.key].pair.items():
        assert lm.lat_recov(spec, k) == pytest.approx(s.median / 1.0)
    recov = [lm.lat_recov(spec, k) for k in range(1, 40)]
    assert all(b >= a for a, b in itertools.pairwise(recov))
    assert lm.break_even(spec, 8) == 24  # 0.8 < 1 at 24, 1.3 at 32
    # A shape never measured is predicted, still monotone.
    other = LayerSpec("linear", 128, 128, (16, 128))
    assert lm.t_dense(other) > 0
    preds = [lm.t_pair(other, k) for k in (8, 16, 32, 64)]
    assert all(b >= a for a, b in itertools.pairwise(preds))


# --- cache ----------------------------------------------------------------------------------


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLARC_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "latency"


def test_second_run_hits_the_cache(tmp_path):
    model = mlp_model()
    targets = find_targets(model).targets
    cache = LatencyCache(tmp_path)
    first = CountingBackend()
    p1 = profile_model(model, targets, first, {"X": [1, 16, 32]}, align=8, cache=cache)
    # fc1 32->64 (k_equiv 21.3: ranks 8, 16) and fc2 64->32: two shapes, dense + 2 ranks each.
    assert len(first.calls) == 6
    second = CountingBackend()
    p2 = profile_model(
        model, targets, second, {"X": [1, 16, 32]}, align=8, cache=LatencyCache(tmp_path)
    )
    assert second.calls == []
    assert p2.to_dict() == p1.to_dict()
    # Another device shares nothing.
    third = CountingBackend(device="other-device")
    profile_model(model, targets, third, {"X": [1, 16, 32]}, align=8, cache=LatencyCache(tmp_path))
    assert len(third.calls) == 6


@pytest.mark.parametrize("damage", ["garbage", "foreign", "schema", "bad-stats"])
def test_damaged_cache_entry_is_rejected_and_remeasured(tmp_path, caplog, damage):
    model = mlp_model()
    targets = find_targets(model).targets
    profile_model(
        model, targets, CountingBackend(), {"X": [1, 16, 32]}, cache=LatencyCache(tmp_path)
    )
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 6
    victim = files[0]
    entry = json.loads(victim.read_text())
    if damage == "garbage":
        victim.write_bytes(b"\x00{not json")
    elif damage == "foreign":
        entry["key"]["device"] = "someone-elses-gpu"
        victim.write_text(json.dumps(entry))
    elif damage == "schema":
        entry["schema"] = 999
        victim.write_text(json.dumps(entry))
    else:
        entry["stats"]["median"] = -1.0
        victim.write_text(json.dumps(entry))
    again = CountingBackend()
    with caplog.at_level(logging.WARNING, logger="flarc.latency.cache"):
        profile_model(model, targets, again, {"X": [1, 16, 32]}, cache=LatencyCache(tmp_path))
    assert len(again.calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "measuring again" in warnings[0]
    # The entry was rewritten: a third run measures nothing.
    third = CountingBackend()
    profile_model(model, targets, third, {"X": [1, 16, 32]}, cache=LatencyCache(tmp_path))
    assert third.calls == []


# --- profile files and the seam -------------------------------------------------------------


def test_profile_json_roundtrip_and_load_latency_model(tmp_path):
    model = mlp_model()
    targets = find_targets(model).targets
    profile = profile_model(
        model, targets, CountingBackend(), {"X": [1, 16, 32]}, cache=LatencyCache(tmp_path / "c")
    )
    path = tmp_path / "latency.json"
    profile.save(path)
    assert LatencyProfile.load(path).to_dict() == profile.to_dict()
    lm = load_latency_model(str(path), model, targets)
    fc1 = targets[0]
    sp = profile.shapes[profile.targets["fc1"]]
    for k, s in sp.pair.items():
        assert lm.t_pair(fc1, k) == s.median
        assert lm.lat_recov(fc1, k) == pytest.approx(s.median / sp.dense.median)
    assert lm.t_dense(fc1) == sp.dense.median
    expected = max(k for k, s in sp.pair.items() if s.median < sp.dense.median)
    assert lm.break_even(fc1, 8) == expected == 16
    # A dense layer cheaper than any pair (the fake's 2 us pair overhead dominates): never faster.
    tiny = LayerSpec("linear", 8, 8, (1, 8))
    lm_tiny = LatencyModel(profile_model_for_spec(tiny, tmp_path / "t"))
    assert lm_tiny.break_even(tiny, 2) is None
    # Targets the file does not name get their shapes found and are predicted.
    bigger = find_targets(mlp_model(n=48, hidden=96)).targets
    lm2 = load_latency_model(str(path), mlp_model(n=48, hidden=96), bigger, {"X": [1, 16, 48]})
    assert all(lm2.t_dense(t) > 0 and not lm2.is_measured(t) for t in bigger)


def profile_model_for_spec(spec: LayerSpec, cache_dir) -> LatencyProfile:
    from flarc.latency.profile import profile_specs

    shapes = profile_specs([spec], CountingBackend(), align=2, cache=LatencyCache(cache_dir))
    return LatencyProfile("fake", "1", "dev", None, "fp32", 2, {}, shapes, {})


def test_bad_latency_files(tmp_path):
    model = mlp_model()
    targets = find_targets(model).targets
    with pytest.raises(DataError, match="not a backend name"):
        load_latency_model(str(tmp_path / "missing.json"), model, targets)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="not a readable latency JSON"):
        LatencyProfile.load(bad)
    bad.write_text(json.dumps({"format": "flarc-latency", "version": 1, "shapes": {}}))
    with pytest.raises(DataError, match="malformed"):
        LatencyProfile.load(bad)


# --- real backends --------------------------------------------------------------------------


def test_timing_stops_when_median_is_stable():
    calls = []

    def run(number: int) -> float:
        calls.append(number)
        return 1e-3 * number

    s = measure(run, TimingConfig(warmup=2, min_repeats=5, max_repeats=50, min_sample_s=0.0))
    assert s.median == pytest.approx(1e-3) and s.repeats == 5 and s.number == 1


def test_gpu_backends_fail_in_one_line():
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        with pytest.raises(BackendError) as err:
            get_backend("torch-cuda")
        assert "\n" not in str(err.value) and str(err.value).startswith("torch-cuda:")
        assert (
            "CPU-only" in str(err.value)
            or "no CUDA device" in str(err.value)
            or "not installed" in str(err.value)
        )
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    if not has_trt:
        with pytest.raises(
            BackendError, match=r"^tensorrt: Python module 'tensorrt' is not installed"
        ):
            get_backend("tensorrt")
    with pytest.raises(BackendError, match="unknown latency backend"):
        get_backend("tpu")


def test_ort_cpu_profiles_tiny_matmul_model(tmp_path):
    model = mlp_model()
    targets = find_targets(model).targets
    backend = get_backend("ort-cpu", threads=1, timing=QUICK)
    profile = profile_model(
        model, targets, backend, {"X": [1, 16, 32]}, align=4, cache=LatencyCache(tmp_path)
    )
    assert set(profile.targets) == {"fc1", "fc2"}
    for sp in profile.shapes.values():
        assert sp.spec.grid(4) == sorted(sp.pair) == [4, 8, 12, 16, 20]
        for s in [sp.dense, *sp.pair.values()]:
            assert math.isfinite(s.median) and 0 < s.min <= s.median <= s.max < 1.0
    assert profile.backend_version and profile.device.startswith("cpu:")


def test_ort_cpu_times_conv_layers():
    """onnxruntime times real conv work, asymmetric pads included: a rank-8 pair does 44x fewer
    multiply-adds than the dense conv and than the largest aligned pair (each measured ~12x
    slower than it, on one thread); 3x is asserted, far below either."""
    backend = get_backend("ort-cpu", threads=1, timing=QUICK)
    geo = ConvGeometry((3, 3), (1, 1), (1, 0, 1, 0), (1, 1))  # asymmetric pads
    spec = LayerSpec("conv", 128 * 9, 512, (1, 128, 24, 24), geo)
    assert spec.out_spatial == (24, 22)  # rows padded, columns not
    top = spec.grid(8)[-1]
    assert spec.flops(None) / spec.flops(8) > 40 and spec.flops(top) / spec.flops(8) > 40
    dense = backend.time_dense(spec).median
    small = backend.time_pair(spec, 8).median
    large = backend.time_pair(spec, top).median
    assert dense > 3 * small
    assert large > 3 * small


def test_measure_end_to_end():
    """The backend's whole-model timing sees work: a model with 256x the multiply-adds of
    another (measured ~65x slower, the cheap one being mostly call overhead) gives a speedup
    far above 1 in the original-over-compressed direction."""
    heavy, cheap = mlp_model(n=256, hidden=2048), mlp_model(n=256, hidden=8)
    feeds = {"X": np.ones((1, 64, 256), np.float32)}
    r = measure_end_to_end(heavy, cheap, feeds, threads=1, timing=QUICK)
    assert r["speedup"] > 10
    assert r["feeds"] == {"X": [1, 64, 256]} and r["backend"] == "ort-cpu"


def parse_shape_args(items: list[str]) -> dict[str, list[int]]:
    return ShapeArgs().parse(argparse.Namespace(shape=items))


# --- CLI ------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    return build_parser()


def test_cli_parses():
    args = make_parser().parse_args(
        [
            "latency",
            "profile",
            "m.onnx",
            "--backend",
            "ort-cpu",
            "--threads",
            "2",
            "--dtype",
            "fp16",
            "--shape",
            "input_ids:1x128",
            "attention_mask:1x128",
            "--align",
            "16",
            "-o",
            "l.json",
        ]
    )
    assert isinstance(args.func.__self__, Profile) and args.threads == 2 and args.align == 16
    assert args.shape == ["input_ids:1x128", "attention_mask:1x128"] and args.dtype == "fp16"
    with pytest.raises(SystemExit):
        make_parser().parse_args(["latency", "profile", "m.onnx", "--backend", "tpu", "-o", "x"])
    with pytest.raises(SystemExit):
        make_parser().parse_args(["latency", "profile", "m.onnx", "--threads", "0", "-o", "x"])
    assert isinstance(make_parser().parse_args(["latency", "show", "l.json"]).func.__self__, Show)


def test_cli_profile_then_show(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLARC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long cells at pytest's 80 columns
    model_path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp_model(), str(model_path))
    out = tmp_path / "latency.json"
    parser = make_parser()
    args = parser.parse_args(
        [
            "latency",
            "profile",
            str(model_path),
            "--threads",
            "1",
            "--shape",
            "X:1x8x32",
            "--max-repeats",
            "3",
            "--max-seconds",
            "0.1",
            "-o",
            str(out),
        ]
    )
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["input_shapes"] == {"X": [1, 8, 32]} and set(data["targets"]) == {"fc1", "fc2"}
    assert any((tmp_path / "cache" / "latency").rglob("*.json"))
    png = tmp_path / "plot.png"
    args = parser.parse_args(["latency", "show", str(out), "-o", str(png)])
    assert args.func(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = capsys.readouterr().out
    assert "linear:8x32->64" in shown and "k_equiv" in shown


@pytest.mark.parametrize("prefix_rows", [False, True])
@pytest.mark.parametrize(
    "spec",
    [
        LayerSpec("linear", 48, 40, (5, 48)),
        LayerSpec("conv", 12, 10, (1, 3, 9, 8), ConvGeometry((2, 2), (2, 1), (1, 0, 0, 1), (1, 1))),
    ],
    ids=["linear", "conv"],
)
def test_timed_pair_is_the_writers_pair_and_computes_it(spec, prefix_rows):
    """The latency layer models are written by the one factor-pair writer: the pair graph computes
    the dense layer with its weight replaced by ``A C`` (read back from the pair's own factors)."""
    import onnxruntime as ort

    from flarc.latency.layers import dense_model, layer_model, layer_target, random_input

    if prefix_rows and spec.kind == "conv":
        with pytest.raises(Exception, match="row-prefix"):
            layer_model(spec, 4, prefix_rows=True)
        return
    pair = layer_model(spec, 4, prefix_rows=prefix_rows)
    inits = {t.name: numpy_helper.to_array(t) for t in pair.graph.initializer}
    t = layer_target(spec)
    a_name = "dense/lowrank_At" if prefix_rows else "dense/lowrank_A"
    a = inits[a_name].T if prefix_rows else inits[a_name]
    if spec.kind == "conv":
        a = a.reshape(4, -1).T
    c = (
        inits["dense/lowrank_C"].reshape(t.m, 4).T
        if spec.kind == "conv"
        else inits["dense/lowrank_C"]
    )
    dense = dense_model(spec)
    for init in dense.graph.initializer:  # the dense layer with B = A C, stored as the node wants
        if init.name == t.weight:
            w = (a @ c).T.reshape(t.weight_shape) if spec.kind == "conv" else a @ c
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.weight))
    x = random_input(spec)
    want = ort.InferenceSession(dense.SerializeToString()).run(None, {"X": x})[0]
    got = ort.InferenceSession(pair.SerializeToString()).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    ops = [n.op_type for n in pair.graph.node]
    expected = {"linear": ["MatMul", "MatMul"], "conv": ["Conv", "Conv"]}[spec.kind]
    if prefix_rows:
        expected = ["Shape", "Slice", "Reshape", "Gemm", "MatMul", "Concat", "Reshape"]
    assert sorted(ops) == sorted(expected)
