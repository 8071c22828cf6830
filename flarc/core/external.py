"""Weights that stay in their external data files.

A large model is loaded without its external data (:func:`flarc.core.modelio.load_model` marks it
with the folder its data files live in). Its tensors are then read through read-only memory
maps, onnxruntime runs it from the same files (it maps them rather than copying them, see
:func:`session_options_for`), and it is written by copying each tensor's bytes from its file
to the output's. So the weights are resident once, as clean file pages, never as copies in the
process's own memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from flarc.core.errors import ModelError

# Metadata key of a lazily loaded model: the absolute folder its external data lives in.
EXTERNAL_DIR_KEY = "flarc.external_data_dir"
# Offsets of tensors we write are multiples of this, so onnxruntime can map each one.
ALIGNMENT = 4096
# Inline tensors at least this large go to the data file when a model is saved with one.
INLINE_LIMIT = 1024
COPY_CHUNK = 64 << 20
# A tensor that claims more elements than this is treated as hostile, whatever its data says.
MAX_TENSOR_ELEMENTS = 1 << 34
# Types a memory map can show as they are stored (others are decoded by onnx, one tensor).
_MAPPABLE = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def external_dir(model: onnx.ModelProto) -> Path | None:
    """The folder of a lazily loaded model's external data, or None for a model held in memory."""
    for prop in model.metadata_props:
        if prop.key == EXTERNAL_DIR_KEY:
            return Path(prop.value)
    return None


def mark_external_dir(model: onnx.ModelProto, folder: Path) -> None:
    """Mark ``model`` as lazily loaded with its external data in ``folder`` (replacing any earlier
    mark)."""
    unmark(model)
    model.metadata_props.add(key=EXTERNAL_DIR_KEY, value=str(folder.resolve()))


def unmark(model: onnx.ModelProto) -> None:
    """Remove the lazy-loading mark (:data:`EXTERNAL_DIR_KEY`) from ``model``'s metadata, if any."""
    keep = [p for p in model.metadata_props if p.key != EXTERNAL_DIR_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def is_external(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor``'s data lives in an external file."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _location(tensor: onnx.TensorProto, folder: Path | None) -> tuple[Path, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    if folder is None:
        raise ModelError(
            f"tensor '{tensor.name}': external data but the model was not loaded from a file"
        )
    path = folder / info["location"]
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if info.get("length") else path.stat().st_size - offset
    return path, offset, length


def tensor_array(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray:
    """The values of ``tensor``; external data is memory-mapped read-only from its file."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = _location(tensor, folder)
    shape = tuple(int(d) for d in tensor.dims)
    if tensor.data_type not in _MAPPABLE or length == 0:
        # bfloat16, float8, 4-bit types: onnx decodes them from an inline copy of this tensor.
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        del copy.external_data[:]
        copy.data_location = onnx.TensorProto.DEFAULT
        with open(path, "rb") as fh:
            fh.seek(offset)
            copy.raw_data = fh.read(length)
        return numpy_helper.to_array(copy)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    flat = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(length // dtype.itemsize,))
    return flat.reshape(shape)


def as_array(value: onnx.TensorProto | np.ndarray, folder: Path | None = None) -> np.ndarray:
    """An array for a constant that is either already one or a tensor proto."""
    return value if isinstance(value, np.ndarray) else tensor_array(value, folder)


def session_options_for(
    model: onnx.ModelProto, options: ort.SessionOptions | None = None
) -> ort.SessionOptions:
    """``options`` (or new ones) that let onnxruntime find a lazy model's data files when it is
    given the model as bytes; it maps them into memory rather than copying them."""
    options = options or ort.SessionOptions()
    folder = external_dir(model)
    if folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(folder)
        )
    return options


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _initializers(sub)


def _attribute_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
        for sub in _subgraphs(node):
            yield from _attribute_tensors(sub.node)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model stores: initializers (subgraphs' too), then the tensors of node
    attributes (Constant values) in the graph, its subgraphs and the model's functions; the
    order onnx's own external-data helpers use."""
    yield from _initializers(model.graph)
    yield from _attribute_tensors(model.graph.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _copy_range(src: Path, offset: int, length: int, dst) -> None:
    with open(src, "rb") as fh:
        fh.seek(offset)
        left = length
        while left:
            chunk = fh.read(min(COPY_CHUNK, left))
            if not chunk:
                raise ModelError(f"{src}: ends before byte {offset + length}")
            dst.write(chunk)
            left -= len(chunk)


def write_streamed(model: onnx.ModelProto, model_path: Path, data_path: Path) -> None:
    """Write ``model`` to ``model_path`` with every tensor of at least ``INLINE_LIMIT`` bytes in
    ``data_path`` (named relative to the model), one tensor at a time: external tensors are
    copied from their files, inline ones from the proto. ``model`` itself is left unchanged."""
    folder = external_dir(model)
    # A copy whose large inline payloads are stubs: they are written straight from ``model``.
    out, originals = split_large_initializers(model, INLINE_LIMIT)
    unmark(out)
    location = os.path.relpath(data_path, model_path.parent)
    with open(data_path, "wb") as fh:
        for src, dst in zip(all_tensors(model), all_tensors(out), strict=True):
            external = is_external(src)
            if not external and not (src.HasField("raw_data") and src.ByteSize() >= INLINE_LIMIT):
                if src.name in originals:
                    dst.CopyFrom(src)  # a stub of a tensor kept inline (typed fields, not raw)
                continue
            fh.write(b"\0" * (-fh.tell() % ALIGNMENT))
            offset = fh.tell()
            if external:
                path, start, length = _location(src, folder)
                _copy_range(path, start, length, fh)
            else:
                raw = src.raw_data
                fh.write(raw)
                length = len(raw)
                del raw
            dst.ClearField("raw_data")
            del dst.external_data[:]
            dst.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (
                ("location", location),
                ("offset", str(offset)),
                ("length", str(length)),
            ):
                dst.external_data.add(key=key, value=value)
        fh.flush()
        os.fsync(fh.fileno())
    with open(model_path, "wb") as fh:
        fh.write(out.SerializeToString())


def in_model_folder(tensor: onnx.TensorProto) -> bool:
    """Whether an external tensor's file lies in its model's folder (where onnxruntime maps it)."""
    location = {e.key: e.value for e in tensor.external_data}.get("location", "")
    return ".." not in Path(location).parts and not Path(location).is_absolute()


class FactorFile:
    """The factor tensors of a large model's rewrite, written to one data file as they are made,
    so that none is held in memory; the rewritten model refers to them relative to the source
    model's folder (sessions feed them, see :func:`flarc.core.sessions.fed_session`)."""

    def __init__(self, folder: Path, model_folder: Path) -> None:
        self.path = folder / "factors.data"
        self.location = os.path.relpath(self.path, model_folder)
        self._fh = open(self.path, "wb")

    def put(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Append ``array`` (little-endian, at an offset aligned to :data:`ALIGNMENT`) and return an
        external tensor named ``name`` that refers to it."""
        array = np.ascontiguousarray(array)
        self._fh.write(b"\0" * (-self._fh.tell() % ALIGNMENT))
        offset = self._fh.tell()
        self._fh.write(
            memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False)).cast("B")
        )
        self._fh.flush()
        tensor = onnx.TensorProto(
            name=name,
            data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
            dims=array.shape,
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for key, value in (
            ("location", self.location),
            ("offset", str(offset)),
            ("length", str(array.nbytes)),
        ):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        """Close the data file; the tensors written stay in it."""
        self._fh.close()


def declared_nbytes(tensor: onnx.TensorProto, where: str) -> int | None:
    """Bytes the tensor's shape and type need, or None for types without a fixed width."""
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{where}: negative dimension in shape {list(tensor.dims)}")
    count = int(np.prod(tensor.dims, dtype=np.float64)) if tensor.dims else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise ModelError(f"{where}: absurd shape {list(tensor.dims)} ({count} elements); refused")
    if tensor.data_type not in onnx.TensorProto.DataType.values():
        raise ModelError(f"{where}: unknown element type {tensor.data_type}")
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


# Inline initializers at least this large are never copied as protos for an onnxruntime session:
# graphs built for sessions carry a data-less stub instead, and the session is fed the tensor as
# an input at every run (onnxruntime does not copy a fed numpy array; it copies initializers, and
# ``add_external_initializers`` copies too). Small models are untouched, so tests see no change.
LARGE_INITIALIZER_BYTES = 16 << 20


def _copy_fields(dst, src, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def split_large_initializers(
    model: onnx.ModelProto, min_bytes: int = LARGE_INITIALIZER_BYTES
) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` whose large inline initializers are data-less stubs (name, type and
    dims only), and the original tensors by name (not copied). The copy is for building session
    graphs (:func:`fed_session` turns its stubs into fed inputs), never for saving."""
    light = onnx.ModelProto()
    _copy_fields(light, model, "graph")
    _copy_fields(light.graph, model.graph, "initializer")
    originals: dict[str, onnx.TensorProto] = {}
    for tensor in model.graph.initializer:
        nbytes = declared_nbytes(tensor, tensor.name) or 0
        if tensor.data_location != onnx.TensorProto.EXTERNAL and nbytes >= min_bytes:
            originals[tensor.name] = tensor
            light.graph.initializer.add(
                name=tensor.name, data_type=tensor.data_type, dims=tensor.dims
            )
        else:
            light.graph.initializer.append(tensor)
    return light, originals
