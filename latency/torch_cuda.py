"""torch on an NVIDIA GPU: the same GEMM / convolution pairs as torch ops, timed with CUDA events.

Each layer is captured once in a CUDA graph (after warm-up on a side stream, as torch's docs
require) and replayed back to back, so a sample is GPU time rather than Python launch overhead;
when capture fails the eager call is timed the same way. cuDNN autotuning is on for convolutions.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable

from flarc.core.errors import BackendError
from flarc.latency.backend import Backend
from flarc.latency.spec import LayerSpec
from flarc.latency.timing import Stats, measure

log = logging.getLogger(__name__)


def _require_cuda_torch():
    try:
        import torch
    except ImportError:
        raise BackendError("torch-cuda: Python module 'torch' is not installed") from None
    if torch.version.cuda is None:
        raise BackendError(f"torch-cuda: torch {torch.__version__} is a CPU-only build (no CUDA)")
    if not torch.cuda.is_available():
        raise BackendError(
            f"torch-cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
        )
    return torch


class TorchCudaBackend(Backend):
    """torch on an NVIDIA GPU (module docstring): each layer as torch ops on preallocated tensors,
    replayed from a CUDA graph and timed with CUDA events."""

    name = "torch-cuda"
    onnx_pairs = False

    def setup(self) -> None:
        self.torch = _require_cuda_torch()
        self.device = self.torch.device("cuda", self.torch.cuda.current_device())
        self.torch.backends.cudnn.benchmark = True
        self.tdtype = self.torch.float16 if self.dtype == "fp16" else self.torch.float32

    def version(self) -> str:
        return f"torch {self.torch.__version__} cuda {self.torch.version.cuda}"

    def fingerprint(self) -> str:
        props = self.torch.cuda.get_device_properties(self.device)
        driver = "unknown-driver"
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        return (
            f"cuda: {props.name} | sm_{props.major}{props.minor} | "
            f"{props.multi_processor_count} SMs | {props.total_memory >> 20} MiB | driver {driver}"
        )

    def _randn(self, *shape: int, scale: float = 1.0):
        return self.torch.randn(*shape, device=self.device, dtype=self.tdtype) * scale

    def _layer(self, spec: LayerSpec, k: int | None) -> Callable[[], object]:
        """A closure computing the layer on preallocated tensors."""
        torch = self.torch
        F = torch.nn.functional
        x = self._randn(*spec.input_shape)
        if spec.kind == "linear":
            if k is None:
                b = self._randn(spec.n, spec.m, scale=spec.n**-0.5)
                return lambda: torch.matmul(x, b)
            a = self._randn(spec.n, k, scale=spec.n**-0.5)
            c = self._randn(k, spec.m, scale=k**-0.5)
            return lambda: torch.matmul(torch.matmul(x, a), c)
        geo = spec.conv
        assert geo is not None
        nd = len(geo.kernel_shape)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
        if conv is None:
            raise BackendError(f"torch-cuda: {nd}-D convolution ({spec.key}) is not supported")
        pads = spec.pads
        begin, end = pads[:nd], pads[nd:]
        if begin == end:
            padding, pad_arg = tuple(begin), None
        else:
            # ONNX pads are [b1, b2, e1, e2]; F.pad wants (last-dim begin, last-dim end, ...).
            padding, pad_arg = (
                (0,) * nd,
                [p for i in reversed(range(nd)) for p in (begin[i], end[i])],
            )
        stride, dilation = tuple(geo.strides), tuple(geo.dilations)

        def padded():
            return F.pad(x, pad_arg) if pad_arg else x

        bias = torch.zeros(spec.m, device=self.device, dtype=self.tdtype)
        if k is None:
            w = self._randn(spec.m, spec.channels, *geo.kernel_shape, scale=spec.n**-0.5)
            return lambda: conv(padded(), w, bias, stride, padding, dilation)
        w1 = self._randn(k, spec.channels, *geo.kernel_shape, scale=spec.n**-0.5)
        w2 = self._randn(spec.m, k, *([1] * nd), scale=k**-0.5)
        return lambda: conv(conv(padded(), w1, None, stride, padding, dilation), w2, bias)

    def _time(self, fn: Callable[[], object]) -> Stats:
        torch = self.torch
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            call: Callable[[], object] = fn
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                call = graph.replay
            except RuntimeError as exc:
                log.debug("CUDA graph capture failed (%s); timing eager launches", exc)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)

            def run(number: int) -> float:
                start.record()
                for _ in range(number):
                    call()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000.0

            return measure(run, self.timing)

    def time_dense(self, spec: LayerSpec) -> Stats:
        return self._time(self._layer(spec, None))

    def time_pair(self, spec: LayerSpec, k: int) -> Stats:
        return self._time(self._layer(spec, k))
