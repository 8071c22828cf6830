"""Reading and writing ONNX models safely: hostile external data is refused before any byte
is read, and every output is written atomically (a temporary name, then one rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from flarc.core.errors import FlarcError, ModelError
from flarc.core.external import (
    all_tensors,
    declared_nbytes,
    external_dir,
    is_external,
    mark_external_dir,
    write_streamed,
)
from flarc.core.files import write_bytes_atomic
from flarc.core.graphs import scopes

# onnxruntime 1.2x rejects the IR version that onnx 1.23 writes by default.
MAX_IR_VERSION = 10
MIN_OPSET = 7
# Protobuf cannot serialise a single message over 2 GiB; stay well under it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# A declared input/output/intermediate shape with more elements than this (8 GiB of float32 for
# one batch) cannot be calibrated on; refusing it up front beats an out-of-memory kill later
# (random --synthetic inputs are allocated from the declared shapes).
MAX_ACTIVATION_ELEMENTS = 1 << 31
# A model whose tensors take at least this many bytes is large: loaded lazily when its data are
# external, its statistics and spectra kept on disk, its gradients taken in float32.
LARGE_MODEL_BYTES = 256 << 20


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def check_external_data(model: onnx.ModelProto, base_dir: Path, model_path: Path) -> None:
    """Refuse external-data references that leave the model's folder or do not fit their file."""
    root = base_dir.resolve()
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_entries(tensor)
        location = info.get("location", "")
        where = f"{model_path}: tensor '{tensor.name}'"
        if not location:
            raise ModelError(f"{where} has external data with no location")
        rel = Path(location)
        if rel.is_absolute() or location.startswith(("/", "\\")) or ":" in rel.parts[0]:
            raise ModelError(f"{where}: external data location '{location}' is absolute; refused")
        if ".." in rel.parts:
            raise ModelError(f"{where}: external data location '{location}' contains '..'; refused")
        target = (root / rel).resolve()
        if root != target and root not in target.parents:
            raise ModelError(
                f"{where}: external data location '{location}' resolves outside {root}; refused"
            )
        if not target.is_file():
            raise ModelError(f"{where}: external data file '{location}' is missing")
        size = target.stat().st_size
        offset = int(info.get("offset", 0) or 0)
        declared = declared_nbytes(tensor, where)
        length = int(info["length"]) if info.get("length") else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelError(
                f"{where}: external data range [{offset}, {offset + length}) exceeds '{location}' "
                f"({size} bytes)"
            )
        if declared is not None and length != declared:
            raise ModelError(
                f"{where}: shape {list(tensor.dims)} needs {declared} bytes but external data has {length}"
            )


def check_inline_sizes(model: onnx.ModelProto, model_path: Path) -> None:
    """Raw tensor data whose length disagrees with the declared shape is refused."""
    for tensor in all_tensors(model):
        where = f"{model_path}: tensor '{tensor.name}'"
        declared = declared_nbytes(tensor, where)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or declared is None:
            continue
        if tensor.HasField("raw_data") and len(tensor.raw_data) != declared:
            raise ModelError(
                f"{where}: shape {list(tensor.dims)} needs {declared} bytes but has {len(tensor.raw_data)}"
            )


def check_declared_shapes(model: onnx.ModelProto, model_path: Path) -> None:
    """Graph inputs, outputs and value_info whose fixed dims are negative or absurdly large."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        elem = vi.type.tensor_type.elem_type
        try:
            onnx.helper.tensor_dtype_to_np_dtype(elem)
        except (KeyError, TypeError, ValueError):
            # Inputs are fed from numpy arrays: a type with no numpy equivalent cannot be fed.
            raise ModelError(
                f"{model_path}: input '{vi.name}' has unsupported element type {elem}"
            ) from None
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        where = f"{model_path}: tensor '{vi.name}'"
        if any(d < 0 for d in dims):
            raise ModelError(f"{where}: negative dimension in declared shape {dims}")
        count = float(np.prod(dims, dtype=np.float64)) if dims else 1.0
        if count > MAX_ACTIVATION_ELEMENTS:
            raise ModelError(
                f"{where}: absurd declared shape {dims} ({count:.3g} elements); refused"
            )


def load_model(
    path: str | os.PathLike, load_external_data: bool = True, lazy: bool | None = None
) -> onnx.ModelProto:
    """Load and check an ONNX model; raise ModelError with the path on anything wrong.

    External data are read into the proto, except for a lazy load (by default, a model with at
    least ``LARGE_MODEL_BYTES`` of tensors in external data files): then they stay in their files, the model is
    marked with their folder (:mod:`flarc.core.external`), and flarc reads, runs and writes it from
    there.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for garbage
        raise ModelError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path}: not an ONNX model (no graph or no nodes)")
    check_inline_sizes(model, path)
    check_external_data(model, path.parent, path)
    check_declared_shapes(model, path)
    opset = model_opset(model)
    if opset == 0:
        raise ModelError(
            f"{path}: imports no ai.onnx opset (its standard operators have no version); "
            f"need opset {MIN_OPSET}+"
        )
    if opset < MIN_OPSET:
        raise ModelError(
            f"{path}: opset {opset} is not supported (need {MIN_OPSET}+); "
            "convert it with onnx.version_converter first"
        )
    try:
        # The in-memory proto has no folder: external data files would be looked up in the
        # current directory. Checking the file finds them beside the model (checked above).
        if uses_external_data(model):
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{path}: invalid ONNX model: {exc}") from None
    if load_external_data and uses_external_data(model):
        if lazy is None:
            lazy = is_large(model)
        if lazy:
            mark_external_dir(model, path.parent)
        else:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` (:func:`all_tensors`) keeps its data in an external file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model))


def model_opset(model: onnx.ModelProto) -> int:
    """The model's opset version for the default (``ai.onnx``) domain; 0 when it imports none."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model's tensors take ``LARGE_MODEL_BYTES`` or more, in memory or in files."""
    return tensor_nbytes(model) >= LARGE_MODEL_BYTES


def tensor_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's stored tensors (:func:`stored_tensors`), in memory or in data files."""
    return sum(declared_nbytes(t, t.name) or 0 for t in stored_tensors(model))


def stored_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors a model stores: the initializers of every graph, and the values of its
    Constant nodes (some exporters keep every weight in one)."""
    out = []
    for scope in scopes(model):
        out += scope.graph.initializer
        out += [
            a.t
            for n in scope.graph.node
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
            for a in n.attribute
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR
        ]
    return out


def inline_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto itself (a serialised copy's payload)."""
    return sum(
        declared_nbytes(t, t.name) or 0 for t in model.graph.initializer if not is_external(t)
    )


def prepare_for_save(model: onnx.ModelProto) -> onnx.ModelProto:
    """Clamp the IR version so current onnxruntime loads what we write."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; large models get a ``<name>.data`` file beside it.

    Returns the files written. Data goes first, the model file last, so a reader never
    finds a model whose data is missing.
    """
    path = Path(path)
    prepare_for_save(model)
    lazy = uses_external_data(model)
    if external_data is None or lazy:
        external_data = lazy or tensor_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        data = model.SerializeToString()
        write_bytes_atomic(path, data)
        return [path]
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".flarc-", dir=path.parent) as tmpdir:
        tmp_model = Path(tmpdir) / path.name
        if lazy:  # data in files (or a mix): copied tensor by tensor, never all in memory
            refuse_overwriting_sources(model, path.parent / data_name)
            write_streamed(model, tmp_model, Path(tmpdir) / data_name)
            os.replace(Path(tmpdir) / data_name, path.parent / data_name)
            os.replace(tmp_model, path)
            return [path, path.parent / data_name]
        onnx.save_model(
            model,
            str(tmp_model),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        # onnx.save_model turned the in-memory tensors into references: read the bytes back in.
        external_data_helper.load_external_data_for_model(model, tmpdir)
        os.replace(Path(tmpdir) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return [path, path.parent / data_name]


def refuse_overwriting_sources(model: onnx.ModelProto, data_path: Path) -> None:
    """A lazy model's output must not replace a data file the model is still read from."""
    folder = external_dir(model)
    target = data_path.resolve()
    for tensor in all_tensors(model):
        if is_external(tensor) and folder is not None:
            source = (folder / _external_entries(tensor)["location"]).resolve()
            if source == target:
                raise FlarcError(
                    f"{data_path}: is the data file of the model being compressed "
                    f"(tensor '{tensor.name}'); choose another output name"
                )


def _check_graph_of_lazy_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on a model whose data stay in files, without reading them: every
    external reference is pointed at one empty file (the checker wants a file, not its bytes)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="flarc-check-") as tmp:
        (Path(tmp) / "data").touch()
        for tensor in all_tensors(light):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "data"
        path = Path(tmp) / "model.onnx"
        path.write_bytes(light.SerializeToString())
        onnx.checker.check_model(str(path))


def check_model_any_size(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on ``model``; one over protobuf's 2 GB limit cannot be serialised for
    the in-memory check, so it is checked from a file with external data."""
    if external_dir(model) is not None:
        _check_graph_of_lazy_model(model)
        return
    if tensor_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="flarc-check-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True)
        onnx.checker.check_model(str(path))
