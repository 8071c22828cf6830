"""Reading and writing ONNX models safely: hostile external data is refused before any byte
is read, and every output is written atomically (a temporary name, then one rename)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, numpy_helper

from flarc.errors import FlarcError, ModelError
from flarc.external import (
    all_tensors as _all_tensors,
)
from flarc.external import (
    external_dir,
    in_model_folder,
    is_external,
    mark_external_dir,
    session_options_for,
    tensor_array,
    write_streamed,
)

# onnxruntime 1.2x rejects the IR version that onnx 1.23 writes by default.
MAX_IR_VERSION = 10
MIN_OPSET = 13
# Protobuf cannot serialise a single message over 2 GiB; stay well under it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# A tensor that claims more elements than this is treated as hostile, whatever its data says.
MAX_TENSOR_ELEMENTS = 1 << 34
# A declared input/output/intermediate shape with more elements than this (8 GiB of float32 for
# one batch) cannot be calibrated on; refusing it up front beats an out-of-memory kill later
# (random --synthetic inputs are allocated from the declared shapes).
MAX_ACTIVATION_ELEMENTS = 1 << 31
# A model with at least this much external data is loaded lazily: its data stay in their files.
LAZY_MODEL_BYTES = 256 << 20


def is_logits_name(name: str) -> bool:
    """Whether an output's name says it holds logits (``logits``, ``output_logits``, ...)."""
    return "logit" in name.lower()


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def check_external_data(model: onnx.ModelProto, base_dir: Path, model_path: Path) -> None:
    """Refuse external-data references that leave the model's folder or do not fit their file."""
    root = base_dir.resolve()
    for tensor in _all_tensors(model):
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
        declared = _declared_nbytes(tensor, where)
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


def _declared_nbytes(tensor: onnx.TensorProto, where: str) -> int | None:
    """Bytes the tensor's shape and type need, or None for types without a fixed width."""
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{where}: negative dimension in shape {list(tensor.dims)}")
    count = int(np.prod(tensor.dims, dtype=np.float64)) if tensor.dims else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise ModelError(f"{where}: absurd shape {list(tensor.dims)} ({count} elements); refused")
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def check_inline_sizes(model: onnx.ModelProto, model_path: Path) -> None:
    """Raw tensor data whose length disagrees with the declared shape is refused."""
    for tensor in _all_tensors(model):
        where = f"{model_path}: tensor '{tensor.name}'"
        declared = _declared_nbytes(tensor, where)
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
    least ``LAZY_MODEL_BYTES`` of external data): then they stay in their files, the model is
    marked with their folder (:mod:`flarc.external`), and flarc reads, runs and writes it from
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
            lazy = external_nbytes(model) >= LAZY_MODEL_BYTES
        if lazy:
            mark_external_dir(model, path.parent)
        else:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def external_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors that live in external data files."""
    return sum(_declared_nbytes(t, t.name) or 0 for t in _all_tensors(model) if is_external(t))


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model))


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def tensor_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, in memory or in external data files."""
    return sum(_declared_nbytes(t, t.name) or 0 for t in model.graph.initializer)


def inline_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto itself (a serialised copy's payload)."""
    return sum(
        _declared_nbytes(t, t.name) or 0 for t in model.graph.initializer if not is_external(t)
    )


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Refuse an output that would overwrite an input or land in a folder we cannot write."""
    out = Path(output)
    for src in inputs:
        if out.resolve() == Path(src).resolve():
            raise FlarcError(f"{out}: output path is the input model; refusing to overwrite it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FlarcError(f"{out}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FlarcError(f"{out}: output folder '{folder}' is not writable")
    return out


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only on success."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(final, text.encode("utf-8"))


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
    for tensor in _all_tensors(model):
        if is_external(tensor) and folder is not None:
            source = (folder / _external_entries(tensor)["location"]).resolve()
            if source == target:
                raise FlarcError(
                    f"{data_path}: is the data file of the model being compressed "
                    f"(tensor '{tensor.name}'); choose another output name"
                )


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
    escaped = any(is_external(t) and not in_model_folder(t) for t in _all_tensors(model))
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
        nbytes = _declared_nbytes(tensor, tensor.name) or 0
        if tensor.data_location != onnx.TensorProto.EXTERNAL and nbytes >= min_bytes:
            originals[tensor.name] = tensor
            light.graph.initializer.add(
                name=tensor.name, data_type=tensor.data_type, dims=tensor.dims
            )
        else:
            light.graph.initializer.append(tensor)
    return light, originals


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


def release_free_memory() -> None:
    """Give memory freed by large arrays back to the system (glibc keeps freed heap pages for
    reuse, which shows as resident memory between the stages of a large model's run)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
