"""The TensorRT timing loop's CUDA-graph path, on stand-ins for the CUDA runtime (no GPU here):
a captured graph is launched, and its handles destroyed, with the right handles."""

from __future__ import annotations

import ctypes

import pytest

from flarc.latency import tensorrt


class FakeLib:
    """The CUDA runtime calls the backend makes, recorded; every call succeeds."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            if name == "cudaStreamEndCapture":
                args[1]._obj.value = 11  # the captured graph
            if name == "cudaGraphInstantiateWithFlags":
                args[0]._obj.value = 22  # its executable
            return 0

        return call


class FakeContext:
    def execute_async_v3(self, stream) -> bool:
        return True


def test_capture_returns_the_graph_and_its_executable():
    backend = object.__new__(tensorrt.TensorRTBackend)
    backend.cudart = type("Cudart", (), {"lib": FakeLib()})()
    stream = type("Stream", (), {"ptr": 5})()
    graphs = backend._capture(FakeContext(), stream)
    assert graphs is not None
    graph, exec_graph = graphs
    assert isinstance(graph, ctypes.c_void_p) and isinstance(exec_graph, ctypes.c_void_p)
    assert (graph.value, exec_graph.value) == (11, 22)


def test_backend_without_tensorrt_is_a_one_line_error():
    pytest.importorskip("polygraphy")
    try:
        import tensorrt as _  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="tensorrt"):
            tensorrt.TensorRTBackend()
