import sys
from pathlib import Path

import pytest

# Test helpers (tests/_*.py) import by module name.
sys.path.insert(0, str(Path(__file__).parent))

import _fisher_models as fm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, exporter) -> (float32 torch module, exported ONNX model), exported once per module."""
    cache: dict = {}

    def get(kind: str, exporter: str):
        if (kind, exporter) not in cache:
            module = fm.build(kind)
            path = tmp_path_factory.mktemp(f"{kind}_{exporter}") / "model.onnx"
            cache[kind, exporter] = (module, fm.export(module, kind, exporter, path))
        return cache[kind, exporter]

    return get
