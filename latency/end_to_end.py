"""Whole-model timing: the original and the compressed model on the same feeds and backend."""

from __future__ import annotations

import numpy as np
import onnx

from flarc.latency.backend import get_backend
from flarc.latency.timing import TimingConfig


def measure_end_to_end(
    model_a: onnx.ModelProto,
    model_b: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    backend: str = "ort-cpu",
    threads: int | None = None,
    dtype: str = "fp32",
    timing: TimingConfig | None = None,
) -> dict:
    """Median and spread of both models, and ``speedup = original / compressed`` (medians)."""
    runner = get_backend(backend, threads=threads, dtype=dtype, timing=timing)
    original = runner.time_model(model_a, feeds)
    compressed = runner.time_model(model_b, feeds)
    return {
        "backend": runner.name,
        "backend_version": runner.version(),
        "device": runner.fingerprint(),
        "threads": threads,
        "feeds": {name: list(np.shape(v)) for name, v in feeds.items()},
        "original": {**original.to_dict(), "spread": original.spread},
        "compressed": {**compressed.to_dict(), "spread": compressed.spread},
        "speedup": original.median / compressed.median,
    }
