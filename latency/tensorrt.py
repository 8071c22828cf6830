"""TensorRT on an NVIDIA GPU: each layer is built as a small network through polygraphy's loaders
and timed the way trtexec reports "GPU Compute Time": inputs copied to the device once (transfers
excluded), the enqueue captured in a CUDA graph and replayed back to back between CUDA events,
median over samples. When graph capture fails, plain ``execute_async_v3`` launches are timed.

CUDA events and graphs are called through the CUDA runtime library that polygraphy already
loads (``polygraphy.cuda.wrapper().handle``), so neither torch nor cuda-python is needed.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess

import numpy as np
import onnx

from flarc.core.errors import BackendError
from flarc.core.modelio import prepare_for_save
from flarc.latency.backend import Backend
from flarc.latency.layers import layer_model, random_input
from flarc.latency.spec import LayerSpec
from flarc.latency.timing import Stats, measure

log = logging.getLogger(__name__)

CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal
ATTR_CC_MAJOR, ATTR_CC_MINOR, ATTR_SM_COUNT = 75, 76, 16  # cudaDeviceAttr values


def require_tensorrt():
    """The ``tensorrt`` module and polygraphy's CUDA wrapper, or BackendError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            "tensorrt: Python module 'tensorrt' is not installed (needs an NVIDIA GPU; "
            "pip install tensorrt)"
        ) from None
    try:
        from polygraphy import cuda

        cudart = cuda.wrapper()
    except Exception as exc:  # polygraphy raises its own exception when libcudart is absent
        raise BackendError(f"tensorrt: CUDA runtime library not loadable ({exc})") from None
    return trt, cudart


class _Cudart:
    """The few CUDA runtime calls polygraphy's wrapper does not expose (events, graphs)."""

    def __init__(self, wrapper) -> None:
        self.lib = wrapper.handle

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise BackendError(f"tensorrt: {what} failed with CUDA error {status}")

    def event(self) -> ctypes.c_void_p:
        ev = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(ev)), "cudaEventCreate")
        return ev

    def elapsed_s(self, start: ctypes.c_void_p, end: ctypes.c_void_p) -> float:
        ms = ctypes.c_float()
        self.check(self.lib.cudaEventSynchronize(end), "cudaEventSynchronize")
        self.check(
            self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime"
        )
        return ms.value / 1000.0

    def device_attribute(self, attr: int) -> int:
        value, device = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaGetDevice(ctypes.byref(device)), "cudaGetDevice")
        self.check(
            self.lib.cudaDeviceGetAttribute(ctypes.byref(value), attr, device.value),
            "cudaDeviceGetAttribute",
        )
        return value.value


class TensorRTBackend(Backend):
    """TensorRT on an NVIDIA GPU (module docstring): layers and whole models built into engines
    through polygraphy and timed with CUDA events."""

    name = "tensorrt"

    def setup(self) -> None:
        self.trt, wrapper = require_tensorrt()
        self.cudart = _Cudart(wrapper)

    def version(self) -> str:
        return f"tensorrt {self.trt.__version__}"

    def fingerprint(self) -> str:
        name = "unknown-gpu"
        try:
            name = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=True,
                )
                .stdout.splitlines()[0]
                .strip()
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        cc = f"sm_{self.cudart.device_attribute(ATTR_CC_MAJOR)}{self.cudart.device_attribute(ATTR_CC_MINOR)}"
        return f"cuda: {name} | {cc} | {self.cudart.device_attribute(ATTR_SM_COUNT)} SMs"

    def build_engine(
        self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
    ):
        """A TensorRT engine for ``model`` (fp16 kernels allowed when the backend's dtype is fp16);
        ``shapes`` fixes named inputs' shapes in one optimization profile. BackendError when the
        build fails."""
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromNetwork,
            NetworkFromOnnxBytes,
            Profile,
        )

        profiles = None
        if shapes:
            profile = Profile()
            for name, shape in shapes.items():
                profile.add(name, min=shape, opt=shape, max=shape)
            profiles = [profile]
        # The ONNX graph stays fp32; fp16 lets TensorRT pick half-precision kernels, like trtexec --fp16.
        config = CreateConfig(fp16=self.dtype == "fp16", profiles=profiles)
        data = prepare_for_save(model).SerializeToString()
        try:
            return EngineFromNetwork(NetworkFromOnnxBytes(data), config=config)()
        except Exception as exc:  # polygraphy reports build failures as PolygraphyException
            raise BackendError(
                f"tensorrt: engine build failed for '{model.graph.name}' ({exc})"
            ) from None

    def time_engine(self, engine, feeds: dict[str, np.ndarray]) -> Stats:
        """Per-call seconds of ``engine`` on ``feeds`` (copied to the device once), between CUDA
        events around replays of a captured CUDA graph, or plain enqueues when capture fails."""
        from polygraphy import cuda

        trt = self.trt
        context = engine.create_execution_context()
        stream = cuda.Stream()
        buffers = []
        try:
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    host = np.ascontiguousarray(feeds[name])
                    context.set_input_shape(name, host.shape)
                    buf = cuda.DeviceArray(shape=host.shape, dtype=host.dtype)
                    buf.copy_from(host, stream=stream)
                else:
                    shape = tuple(context.get_tensor_shape(name))
                    buf = cuda.DeviceArray(
                        shape=shape, dtype=trt.nptype(engine.get_tensor_dtype(name))
                    )
                context.set_tensor_address(name, buf.ptr)
                buffers.append(buf)
            # The first enqueue after setting shapes does setup work that must not be captured.
            if not context.execute_async_v3(stream.ptr):
                raise BackendError("tensorrt: execute_async_v3 failed")
            stream.synchronize()
            lib, sptr = self.cudart.lib, ctypes.c_void_p(stream.ptr)
            graphs = self._capture(context, stream)
            if graphs is not None:
                exec_graph = graphs[1]

                def launch() -> None:
                    lib.cudaGraphLaunch(exec_graph, sptr)

            else:

                def launch() -> None:
                    context.execute_async_v3(stream.ptr)

            start, end = self.cudart.event(), self.cudart.event()

            def run(number: int) -> float:
                lib.cudaEventRecord(start, sptr)
                for _ in range(number):
                    launch()
                lib.cudaEventRecord(end, sptr)
                return self.cudart.elapsed_s(start, end)

            stats = measure(run, self.timing)
            lib.cudaEventDestroy(start)
            lib.cudaEventDestroy(end)
            if graphs is not None:
                lib.cudaGraphExecDestroy(graphs[1])
                lib.cudaGraphDestroy(graphs[0])
            return stats
        finally:
            stream.synchronize()
            for buf in buffers:
                buf.free()
            stream.free()

    def _capture(self, context, stream) -> tuple[ctypes.c_void_p, ctypes.c_void_p] | None:
        """(graph, executable graph) of one enqueue; None when the engine cannot be captured."""
        lib, sptr = self.cudart.lib, ctypes.c_void_p(stream.ptr)
        graph, exec_graph = ctypes.c_void_p(), ctypes.c_void_p()
        if lib.cudaStreamBeginCapture(sptr, CAPTURE_MODE_THREAD_LOCAL) != 0:
            return None
        ok = context.execute_async_v3(stream.ptr)
        status = lib.cudaStreamEndCapture(sptr, ctypes.byref(graph))
        if not ok or status != 0:
            log.debug("tensorrt: CUDA graph capture failed; timing plain enqueues")
            lib.cudaGetLastError()
            return None
        if lib.cudaGraphInstantiateWithFlags(
            ctypes.byref(exec_graph), graph, ctypes.c_ulonglong(0)
        ):
            lib.cudaGetLastError()
            return None
        return graph, exec_graph

    def _time_layer(self, spec: LayerSpec, k: int | None) -> Stats:
        engine = self.build_engine(layer_model(spec, k, "fp32", prefix_rows=self.prefix_rows))
        return self.time_engine(engine, {"X": random_input(spec, "fp32")})

    def time_dense(self, spec: LayerSpec) -> Stats:
        return self._time_layer(spec, None)

    def time_pair(self, spec: LayerSpec, k: int) -> Stats:
        return self._time_layer(spec, k)

    def time_model(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Stats:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        engine = self.build_engine(copy, {k: tuple(v.shape) for k, v in feeds.items()})
        return self.time_engine(engine, feeds)
