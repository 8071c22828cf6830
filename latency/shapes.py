"""The real input shape of every target: fix the model's input shapes, then read the shapes of the
targets' activations from shape inference when it is complete, or else from one onnxruntime run
on a synthetic feed with those activations added as extra outputs.

Unset symbolic dimensions default to 1 for the first axis (batch) and 128 for every other axis
(a typical sequence length / feature size); ``--shape input:1x128`` overrides them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from flarc.core.errors import DataError, ModelError
from flarc.core.modelio import is_large
from flarc.core.sessions import open_session, session_options
from flarc.core.targets import Target

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1
DEFAULT_DIM = 128


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs that need a feed (initializers listed as inputs have a default)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shapes(
    model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """Concrete shapes for every model input: the override, else static dims and defaults."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    names = {i.name for i in inputs}
    for name in overrides:
        if name not in names:
            raise DataError(
                f"--shape names '{name}', which is not a model input ({', '.join(sorted(names))})"
            )
    shapes = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in overrides:
            shape = overrides[inp.name]
            if inp.type.tensor_type.HasField("shape") and len(shape) != len(dims):
                raise DataError(
                    f"--shape {inp.name}: {len(shape)} dims given, the model has {len(dims)}"
                )
            for given, dim in zip(shape, dims, strict=False):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != given:
                    raise DataError(
                        f"--shape {inp.name}: dim {given} where the model fixes {dim.dim_value}"
                    )
            shapes[inp.name] = list(shape)
            continue
        shape = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            else:
                shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
        if any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims):
            log.info("input '%s': symbolic dims set to %s (override with --shape)", inp.name, shape)
        shapes[inp.name] = shape
    return shapes


def synthetic_feed(
    model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random floats, zero ids (valid for any vocabulary), all-ones masks and booleans."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in graph_inputs(model):
        elem = inp.type.tensor_type.elem_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"input '{inp.name}' has unsupported element type {elem}") from None
        shape = shapes[inp.name]
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in inp.name.lower():
            feed[inp.name] = np.ones(shape, dtype=dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype=dtype)
    return feed


def _inferred_shapes(
    model: onnx.ModelProto, shapes: dict[str, list[int]], wanted: set[str]
) -> dict[str, tuple[int, ...]]:
    """Static shapes from onnx shape inference with the inputs fixed; only complete ones."""
    if is_large(model):
        return {}  # inference serialises the model; large ones go straight to onnxruntime
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shapes:
            tt = inp.type.tensor_type
            tt.shape.Clear()
            for d in shapes[inp.name]:
                tt.shape.dim.add().dim_value = d
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as exc:  # onnx raises several types on models it cannot infer
        log.debug("shape inference failed (%s); running onnxruntime", exc)
        return {}
    found = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.name not in wanted or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            found[vi.name] = tuple(int(d.dim_value) for d in dims)
    return found


def _observed_shapes(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], wanted: set[str]
) -> dict[str, tuple[int, ...]]:
    """Shapes seen in one onnxruntime run with the wanted tensors as extra graph outputs."""
    run = onnx.ModelProto()
    run.CopyFrom(model)
    existing = {o.name for o in run.graph.output}
    feeds_known = {name: tuple(arr.shape) for name, arr in feed.items() if name in wanted}
    extra = [n for n in sorted(wanted) if n not in existing and n not in feeds_known]
    for name in extra:
        run.graph.output.append(onnx.ValueInfoProto(name=name))
    outputs = [o.name for o in run.graph.output]
    # Optimizations could fuse a target's input away; keep the graph as written.
    so = session_options(optimization="disable")
    with tempfile.TemporaryDirectory(prefix="flarc-shapes-") as tmp:
        try:
            sess = open_session(run, so, "the model", Path(tmp))
            values = sess.run(outputs, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(
                f"onnxruntime could not run the model on a synthetic feed of shapes "
                f"{ {k: list(v.shape) for k, v in feed.items()} } ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); set input shapes with --shape"
            ) from None
    found = {
        name: tuple(int(d) for d in np.shape(v)) for name, v in zip(outputs, values, strict=True)
    }
    found.update(feeds_known)
    return {name: shape for name, shape in found.items() if name in wanted}


def target_input_shapes(
    model: onnx.ModelProto, targets: list[Target], shapes: dict[str, list[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Real activation-input shape of each target, keyed by target name."""
    fixed = input_shapes(model, shapes)
    wanted = {t.input for t in targets}
    found = _inferred_shapes(model, fixed, wanted)
    missing = wanted - set(found)
    if missing:
        feed = synthetic_feed(model, fixed)
        found.update(_observed_shapes(model, feed, missing))
    result = {}
    for t in targets:
        if t.input not in found:
            raise ModelError(f"target '{t.name}': no shape found for its input '{t.input}'")
        result[t.name] = found[t.input]
    return result
