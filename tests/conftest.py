import sys
from pathlib import Path

import pytest

from flarc.calib.data import CalibrationSet
from flarc.core.modelio import load_model
from flarc.core.targets import find_targets
from flarc.export.hf import export_hf
from flarc.pipeline import build_buckets

# Test helpers (tests/_*.py) import by module name.
sys.path.insert(0, str(Path(__file__).parent))

from _models import (
    build_kind,
    export_kind,
    export_tiny_encoder,
    lm_token_batches,
    save_tiny_qwen2,
)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(kind, exporter) -> (float32 torch module, exported ONNX model), exported once per run.

    Shared by every module that asks: copy the module before changing it, the model too."""
    cache: dict = {}

    def get(kind: str, exporter: str):
        if (kind, exporter) not in cache:
            module = build_kind(kind)
            path = tmp_path_factory.mktemp(f"{kind}_{exporter}") / "model.onnx"
            cache[kind, exporter] = (module, export_kind(module, kind, exporter, path))
        return cache[kind, exporter]

    return get


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """(**variant) -> _models.EncoderCase: an exported TinyEncoder and its calibration batches.

    A variant is the keyword arguments of ``_models.export_tiny_encoder`` (width, seed, batches);
    each is built once per run and shared by every module asking for it: copy before changing."""
    cache: dict = {}

    def get(**variant):
        key = tuple(sorted(variant.items()))
        if key not in cache:
            cache[key] = export_tiny_encoder(tmp_path_factory.mktemp("encoder"), **variant)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A random tiny Qwen2 exported with export_hf (checked against transformers), and its rank
    buckets at budgets 1.0, 0.8, 0.6, 0.4 (the default K-FAC-weighted nested allocation on two
    batches of 4 x 24 tokens).

    A dict: root (hf/ holds the Hugging Face model), onnx, model, targets, folder (the buckets),
    result (build_buckets'), summary (export_hf's). Copy the folder before changing it."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("lm")
    save_tiny_qwen2(root / "hf")
    summary = export_hf(root / "hf", root / "lm.onnx")
    model = load_model(root / "lm.onnx")
    targets = find_targets(model)
    budgets = [1.0, 0.8, 0.6, 0.4]
    data = CalibrationSet(lm_token_batches(2), [], "test")
    result = build_buckets(model, targets, data, budgets, root / "lm.buckets")
    return {
        "root": root,
        "onnx": root / "lm.onnx",
        "model": model,
        "targets": targets,
        "folder": root / "lm.buckets",
        "result": result,
        "summary": summary,
    }
