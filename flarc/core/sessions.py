"""onnxruntime sessions over flarc's models: lazily loaded models run from their data files,
large inline weights are fed rather than copied, and checking sessions run lean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from flarc.core.external import (
    all_tensors,
    external_dir,
    in_model_folder,
    is_external,
    session_options_for,
    split_large_initializers,
    tensor_array,
)
from flarc.core.modelio import EXTERNAL_DATA_THRESHOLD, inline_nbytes, prepare_for_save, save_model


def session_bytes(model: onnx.ModelProto) -> bytes:
    """Serialised ``model`` for onnxruntime (IR version clamped)."""
    return prepare_for_save(model).SerializeToString()


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


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return tensor_array(tensor, external_dir(model))
    raise KeyError(name)


# Inline initializers at least this large are never copied as protos for an onnxruntime session:
# graphs built for sessions carry a data-less stub instead, and the session is fed the tensor as
# an input at every run (onnxruntime does not copy a fed numpy array; it copies initializers, and
# ``add_external_initializers`` copies too). Small models are untouched, so tests see no change.
def lean_session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Options for sessions that check rather than serve: no CPU arena (freed outputs go back to
    the system) and no pre-packed copies of the weights (onnxruntime keeps one per MatMul)."""
    options = options or ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class FedSession:
    """An onnxruntime session whose large weights are graph inputs fed from arrays on every run."""

    def __init__(self, session: ort.InferenceSession, fed: dict[str, np.ndarray]) -> None:
        self.session = session
        self.fed = fed

    def run(self, output_names, feed: dict, *args, **kwargs):
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
        providers=["CPUExecutionProvider"],
    )
    return FedSession(session, arrays)
