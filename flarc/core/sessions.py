"""The one place flarc makes onnxruntime sessions (CPU): their options, where the model comes
from (bytes, a lazily loaded model's data folder, or a file for a model over protobuf's limit),
sessions whose large weights are fed rather than copied, and one error when onnxruntime refuses a
model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from flarc.core.errors import FlarcError, ModelError
from flarc.core.external import (
    all_tensors,
    external_dir,
    in_model_folder,
    is_external,
    session_options_for,
    split_large_initializers,
    tensor_array,
)
from flarc.core.graphs import all_nodes
from flarc.core.modelio import EXTERNAL_DATA_THRESHOLD, inline_nbytes, prepare_for_save, save_model

PROVIDERS = ["CPUExecutionProvider"]
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    threads: int | None = None,
    optimization: str | None = None,
    arena: bool = True,
    prepacking: bool = True,
    sequential: bool = False,
    spinning: bool = True,
    global_threads: bool = False,
) -> ort.SessionOptions:
    """Options for every session flarc opens: quiet, ``threads`` intra-op threads, an optimization
    level by name (onnxruntime's default when None), optionally without the CPU arena (freed
    outputs go back to the system) and without pre-packed weight copies (one per MatMul).
    ``global_threads``: run on the process's global thread pools (``threads`` then ignored),
    which ``onnxruntime.set_global_thread_pool_sizes`` must have made."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if global_threads:
        options.use_per_session_threads = False
    elif threads:
        options.intra_op_num_threads = threads
    if optimization is not None:
        options.graph_optimization_level = OPTIMIZATION[optimization]
    if not arena:
        options.enable_cpu_mem_arena = False
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        # Idle intra-op threads sleep: between runs this process does its own BLAS work
        # (Grams, products), which spinning threads slow down (2x on two cores, measured).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
    return options


def lean_session_options(model: onnx.ModelProto | None = None) -> ort.SessionOptions:
    """Options for sessions that check rather than serve: no arena, no pre-packed weights; for a
    ``model`` with QuantizeLinear nodes, no graph optimizations either: the graph then computes
    what its QDQ nodes say, where onnxruntime's fused u8s8 kernels may saturate differently in
    two graphs that compute the same function (measured: 12% on a quantize_static MiniLM)."""
    quantized = model is not None and any(n.op_type == "QuantizeLinear" for n in all_nodes(model))
    return session_options(
        arena=False, prepacking=False, optimization="disable" if quantized else None
    )


def session_source(
    model: onnx.ModelProto, workdir: Path, options: ort.SessionOptions
) -> tuple[str | bytes, ort.SessionOptions]:
    """What onnxruntime.InferenceSession takes for ``model`` and the options to go with it:
    bytes (with a lazy model's data folder in ``options``), or a file written to ``workdir``
    for a model over protobuf's limit or with data outside its folder."""
    prepare_for_save(model)
    escaped = any(is_external(t) and not in_model_folder(t) for t in all_tensors(model))
    if inline_nbytes(model) <= EXTERNAL_DATA_THRESHOLD and not escaped:
        return model.SerializeToString(), session_options_for(model, options)
    target = workdir / "session.onnx"
    save_model(model, target, external_data=True)
    return str(target), options


def open_session(
    model: onnx.ModelProto | str | Path,
    options: ort.SessionOptions | None = None,
    what: str | None = None,
    workdir: Path | None = None,
    error: type[FlarcError] = ModelError,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model file or proto (see :func:`session_source`; a
    proto that must go through a file is written to ``workdir``, which must outlive the
    session). onnxruntime refusing the model raises ``error`` naming ``what``."""
    options = options or session_options()
    tmp = None
    try:
        if isinstance(model, onnx.ModelProto):
            if workdir is None:
                tmp = tempfile.TemporaryDirectory(prefix="flarc-session-")
                workdir = Path(tmp.name)
            source, options = session_source(model, workdir, options)
        else:
            source = str(model)
        return ort.InferenceSession(source, sess_options=options, providers=PROVIDERS)
    except FlarcError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = what or (str(model) if not isinstance(model, onnx.ModelProto) else "the model")
        raise error(f"{name}: onnxruntime cannot load it ({first})") from None
    finally:
        if tmp is not None:
            tmp.cleanup()  # onnxruntime has read the file (its data are mapped or copied)


class FedSession:
    """An onnxruntime session whose large weights are graph inputs fed from arrays on every run."""

    def __init__(self, session: ort.InferenceSession, fed: dict[str, np.ndarray]) -> None:
        self.session = session
        self.fed = fed

    def run(self, output_names, feed: dict, *args, **kwargs):
        """``InferenceSession.run`` with the fed weights added to ``feed``."""
        return self.session.run(output_names, {**feed, **self.fed}, *args, **kwargs)


def fed_session(
    model: onnx.ModelProto,
    options: ort.SessionOptions | None = None,
    originals: dict[str, onnx.TensorProto] | None = None,
    fed: dict[str, np.ndarray] | None = None,
) -> FedSession:
    """An onnxruntime session for ``model`` without a serialised copy of its large initializers.

    ``model`` may hold stubs from :func:`split_large_initializers` (their tensors in
    ``originals``); its own large initializers are split off here. Each becomes a graph input
    fed from one array; ``fed`` gives arrays already made (shared, not copied again).
    """
    light, more = split_large_initializers(model)
    originals = {**more, **(originals or {})}  # a stub in ``model`` is not an original
    graph = light.graph
    # External data outside the model's folder (a large rewrite's factors) is fed, mapped.
    escaped = {t.name: t for t in graph.initializer if is_external(t) and not in_model_folder(t)}
    stubs = [
        t
        for t in graph.initializer
        if t.name in escaped or (t.name in originals and not t.HasField("raw_data"))
    ]
    names = {t.name for t in stubs}
    if stubs:
        keep = [t for t in graph.initializer if t.name not in names]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        declared = {i.name for i in graph.input}
        for t in stubs:
            if t.name not in declared:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                )
    arrays = {n: (fed or {}).get(n) for n in names}
    for n, value in arrays.items():
        if value is None and n in escaped:
            arrays[n] = tensor_array(escaped[n], external_dir(light))
        elif value is None:
            arrays[n] = numpy_helper.to_array(originals[n])
    prepare_for_save(light)
    session = ort.InferenceSession(
        light.SerializeToString(),
        session_options_for(light, options or lean_session_options()),
        providers=PROVIDERS,
    )
    return FedSession(session, arrays)
