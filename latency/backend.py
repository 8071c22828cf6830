"""The backend interface: time one layer (dense node, or its rank-k pair) on one device.

One small class per file implements it (``ort_cpu.py``, ``torch_cuda.py``, ``tensorrt.py``);
``BACKENDS`` maps a name to where that class lives, imported only when asked for, so listing
backends never imports torch or TensorRT. Constructors raise ``BackendError`` (one line naming
what is missing) when the backend cannot run here.
"""

from __future__ import annotations

import importlib
import os
import platform
from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import onnx

from flarc.core.errors import BackendError
from flarc.latency.spec import LayerSpec
from flarc.latency.timing import Stats, TimingConfig

# name -> "module:Class"; adding a backend adds its file and one line here.
BACKENDS = MappingProxyType(
    {
        "ort-cpu": "flarc.latency.ort_cpu:OrtCpuBackend",
        "torch-cuda": "flarc.latency.torch_cuda:TorchCudaBackend",
        "tensorrt": "flarc.latency.tensorrt:TensorRTBackend",
    }
)
DTYPES = ("fp32", "fp16")


class Backend(ABC):
    """Times layers at a fixed thread count and precision."""

    name: ClassVar[str]
    onnx_pairs: ClassVar[bool] = True  # times the writer's ONNX graphs (else its own ops)

    def __init__(
        self,
        threads: int | None = None,
        dtype: str = "fp32",
        timing: TimingConfig | None = None,
        prefix_rows: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise BackendError(f"{self.name}: dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        if threads is not None and threads < 1:
            raise BackendError(f"{self.name}: threads must be positive, got {threads}")
        self.threads = threads
        self.dtype = dtype
        self.timing = timing or TimingConfig()
        if prefix_rows and not self.onnx_pairs:
            raise BackendError(
                f"{self.name}: times its own ops, not ONNX graphs: no row-prefix form"
            )
        self.prefix_rows = prefix_rows  # time the pair as the rank buckets write it
        self.setup()

    def setup(self) -> None:  # noqa: B027 (most backends need nothing loaded)
        """Load what the backend needs (BackendError, naming what is missing, if it cannot)."""

    @abstractmethod
    def version(self) -> str:
        """The version of the runtime doing the work (part of every cache key)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """The device: results from another device are never reused."""

    @abstractmethod
    def time_dense(self, spec: LayerSpec) -> Stats:
        """Per-call seconds of the dense node at ``spec.input_shape``."""

    @abstractmethod
    def time_pair(self, spec: LayerSpec, k: int) -> Stats:
        """Per-call seconds of the rank-``k`` factor pair at ``spec.input_shape``."""

    def time_model(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Stats:
        """Per-call seconds of a whole model on ``feeds``."""
        raise BackendError(f"{self.name}: timing whole ONNX models is not supported")

    def cache_identity(self) -> dict:
        """What a cached result must match besides the layer and rank."""
        identity = {
            "device": self.fingerprint(),
            "backend": self.name,
            "backend_version": self.version(),
            "threads": self.threads if self.threads is not None else "default",
            "dtype": self.dtype,
        }
        if self.prefix_rows:
            identity["pair"] = "prefix-rows"
        return identity


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name`` in :data:`BACKENDS` (its module imported now);
    BackendError for an unknown name."""
    if name not in BACKENDS:
        raise BackendError(f"unknown latency backend '{name}' (choose from {', '.join(BACKENDS)})")
    module_name, cls_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def get_backend(
    name: str,
    threads: int | None = None,
    dtype: str = "fp32",
    timing: TimingConfig | None = None,
    prefix_rows: bool = False,
) -> Backend:
    """Construct the backend ``name``; BackendError if it cannot run here."""
    return backend_class(name)(threads=threads, dtype=dtype, timing=timing, prefix_rows=prefix_rows)


def cpu_fingerprint() -> str:
    """CPU model, logical core count, architecture and OS."""
    model = platform.processor() or "unknown-cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("model name", "Model", "Hardware")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cpus | {platform.machine()} | {platform.system()}"
