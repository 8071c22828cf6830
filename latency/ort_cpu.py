"""onnxruntime on the CPU: each layer is a tiny ONNX model run in its own session.

Graph optimizations are on (as in deployment) and ``intra_op_num_threads`` is the requested
thread count; inputs and outputs are bound once through IOBinding so that a timed call is the
runtime's own work, not Python allocating arrays.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from flarc.core.errors import BackendError
from flarc.core.sessions import open_session, session_options
from flarc.latency.backend import Backend, cpu_fingerprint
from flarc.latency.layers import NP_DTYPES, layer_model, random_input
from flarc.latency.spec import LayerSpec
from flarc.latency.timing import Stats, measure


class OrtCpuBackend(Backend):
    """onnxruntime on the CPU: each layer a tiny ONNX model in its own session, inputs and outputs
    bound once."""

    name = "ort-cpu"

    def version(self) -> str:
        return ort.__version__

    def fingerprint(self) -> str:
        return f"cpu: {cpu_fingerprint()}"

    def _session(
        self, model: onnx.ModelProto, what: str, workdir: Path | None = None
    ) -> ort.InferenceSession:
        """A timing session as deployed (all graph optimizations, sequential execution); a
        model whose factors live in a spill file goes through a file in ``workdir``."""
        options = session_options(self.threads, optimization="all", sequential=True)
        label = f"{self.name}: onnxruntime {ort.__version__} running {what} in {self.dtype}"
        return open_session(model, options, label, workdir, error=BackendError)

    def _time_layer(self, spec: LayerSpec, k: int | None) -> Stats:
        what = f"{spec.key} {'dense' if k is None else f'rank {k}'}"
        model = layer_model(spec, k, self.dtype, prefix_rows=self.prefix_rows)
        sess = self._session(model, what)
        x = random_input(spec, self.dtype)
        out_shape = sess.get_outputs()[0].shape
        y = np.empty(out_shape, dtype=NP_DTYPES[self.dtype])
        binding = sess.io_binding()
        binding.bind_cpu_input("X", x)
        binding.bind_output("Y", "cpu", 0, y.dtype, list(y.shape), y.ctypes.data)

        def run(number: int) -> float:
            start = time.perf_counter()
            for _ in range(number):
                sess.run_with_iobinding(binding)
            return time.perf_counter() - start

        return measure(run, self.timing)

    def time_dense(self, spec: LayerSpec) -> Stats:
        return self._time_layer(spec, None)

    def time_pair(self, spec: LayerSpec, k: int) -> Stats:
        return self._time_layer(spec, k)

    def time_model(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Stats:
        # The session may map files in ``tmp``: it is timed and closed before they go.
        with tempfile.TemporaryDirectory(prefix="flarc-time-") as tmp:
            sess = self._session(model, f"model '{model.graph.name}'", Path(tmp))
            outputs = [o.name for o in sess.get_outputs()]

            def run(number: int) -> float:
                start = time.perf_counter()
                for _ in range(number):
                    sess.run(outputs, feeds)
                return time.perf_counter() - start

            stats = measure(run, self.timing)
            sess = None  # closes the session before its files go
        return stats
