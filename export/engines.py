"""Deployable artifacts of a (compressed) model and the check that they still agree with it:
an onnxruntime ``.ort`` model, a TensorRT engine built through polygraphy's loaders, and a
polygraphy Comparator run between onnxruntime and the artifact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from flarc.core.errors import BackendError, FlarcError
from flarc.core.files import atomic_path, check_output_path, write_bytes_atomic
from flarc.core.modelio import load_model
from flarc.core.polygraphy import accuracy_results, quiet, simple_compare_func
from flarc.core.sessions import OPTIMIZATION, open_session, session_options
from flarc.latency.shapes import input_shapes
from flarc.latency.tensorrt import require_tensorrt

log = logging.getLogger(__name__)

ONNX_SUFFIXES = (".onnx", ".ort")


def export_ort(
    model_path: str | os.PathLike, out_path: str | os.PathLike, optimization: str = "basic"
) -> Path:
    """Write ``model_path`` as an onnxruntime-format (``.ort``) model after graph optimization.

    ``basic`` keeps the model portable across onnxruntime builds and CPUs; ``extended``/``all``
    bake in optimizations specific to this build's execution provider.
    """
    if optimization not in OPTIMIZATION:
        raise FlarcError(f"--optimization '{optimization}' is not one of {', '.join(OPTIMIZATION)}")
    load_model(model_path)  # one-line errors for a missing or bad model before onnxruntime speaks
    out = check_output_path(out_path, [model_path])
    with atomic_path(out, suffix=".ort") as tmp:
        so = session_options(optimization=optimization)
        so.optimized_model_filepath = str(tmp)
        so.add_session_config_entry("session.save_model_format", "ORT")
        open_session(model_path, so)
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise FlarcError(f"{out}: onnxruntime wrote no .ort model")
    return out


def export_trt(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    fp16: bool = False,
    shapes: dict[str, list[int]] | None = None,
) -> Path:
    """Build a TensorRT engine for ``model_path`` at fixed input ``shapes`` (defaults as in
    ``flarc.latency.shapes``) and write its serialized bytes atomically."""
    require_tensorrt()
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )

    model = load_model(model_path)
    out = check_output_path(out_path, [model_path])
    profile = Profile()
    for name, shape in input_shapes(model, shapes).items():
        profile.add(name, min=shape, opt=shape, max=shape)
    config = CreateConfig(fp16=fp16, profiles=[profile])
    try:
        with quiet():
            data = EngineBytesFromNetwork(NetworkFromOnnxPath(str(model_path)), config=config)()
    except Exception as exc:  # polygraphy reports build failures as PolygraphyException
        raise BackendError(f"{model_path}: TensorRT engine build failed ({exc})") from None
    write_bytes_atomic(out, bytes(data))
    return out


def _runner(path: Path, name: str):
    """An onnxruntime runner for .onnx/.ort files, a TensorRT runner for anything else (engines)."""
    if path.suffix.lower() in ONNX_SUFFIXES:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        return OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=name)
    require_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(path))), name=name)


def compare(
    model_path: str | os.PathLike,
    engine_or_model_path: str | os.PathLike,
    shapes: dict[str, list[int]] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    iterations: int = 2,
    seed: int = 1,
) -> dict:
    """Run polygraphy's Comparator on random inputs: onnxruntime on ``model_path`` against
    ``engine_or_model_path`` (a TensorRT engine, or an .onnx/.ort model run in onnxruntime).

    Returns ``{"passed", "atol", "rtol", "shapes", "outputs": {name: {max_abs, max_rel, passed}}}``
    with each output's worst error over the iterations.
    """
    from polygraphy import comparator as pc
    from polygraphy.common import TensorMetadata

    model_path, other = Path(model_path), Path(engine_or_model_path)
    model = load_model(model_path)
    if not other.exists():
        raise FlarcError(f"{other}: no such engine or model")
    fixed = input_shapes(model, shapes)
    meta = TensorMetadata()
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            meta.add(inp.name, dtype=dtype, shape=fixed[inp.name])
    runners = [_runner(model_path, "onnxruntime"), _runner(other, other.name)]
    loader = pc.DataLoader(seed=seed, iterations=iterations, input_metadata=meta)
    compare_func = simple_compare_func(atol=atol, rtol=rtol)
    try:
        with quiet():
            results = pc.Comparator.run(runners, data_loader=loader)
            accuracy = pc.Comparator.compare_accuracy(results, compare_func=compare_func)
    except FlarcError:
        raise
    except Exception as exc:  # polygraphy wraps runner failures in PolygraphyException
        raise FlarcError(f"compare {model_path} vs {other}: {exc}") from None
    outputs: dict[str, dict] = {}
    for iteration_results in (r for res in accuracy_results(accuracy) for r in res.values()):
        for iteration in iteration_results:
            for name, res in iteration.items():
                worst = outputs.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "passed": True})
                worst["max_abs"] = max(worst["max_abs"], float(res.max_absdiff))
                worst["max_rel"] = max(worst["max_rel"], float(res.max_reldiff))
                worst["passed"] = worst["passed"] and bool(res)
    if not outputs:
        raise FlarcError(f"compare {model_path} vs {other}: no output names in common")
    return {
        "passed": bool(accuracy) and all(o["passed"] for o in outputs.values()),
        "atol": atol,
        "rtol": rtol,
        "shapes": fixed,
        "outputs": outputs,
    }
