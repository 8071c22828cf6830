"""Large-model benchmark (not CI): ``flarc compress`` on a model with > 2 GB of external data.

Builds a stack of wide fp32 MatMuls (``[..., n] @ W[n, m]``, then a ReduceMean folds the m
outputs back to n so layers chain) straight into one external-data file, layer by layer, so
the builder never holds the model in memory. Then runs ``flarc compress`` in a child process
and reports its peak RSS (``ru_maxrss`` of the child) and wall time against the size on disk,
checks the output (external data when it is over 2 GB) loads in onnxruntime in another child,
writes ``bench/results/large_model.json`` and deletes the models.

The layers are fan-out shaped (n small, m large) on purpose: flarc keeps one float64 ``n x n``
Gram per distinct target input (twice: calibration and held-out), which for square or
fan-in layers is larger than the weights themselves; that cost is inherent to the method and
reported separately (``gram_bytes``), so the measured peak shows the copies of the model.

    python bench/large_model.py [--layers 36] [--n 512] [--m 32768] [--ratio 0.95]
    python bench/large_model.py --qwen     # the real 2.5 GB model instead (see quality_lm.py)

With ``--qwen``: Qwen2.5-Coder-0.5B in fp32 (``~/.cache/flarc/qwen2.5-0.5b/model.onnx``, 2.5 GB
of external data), compressed by the CLI on the quality benchmark's calibration text (``--text``,
8 batches of 4 x 128 tokens, ``--exclude lm_head --ratio 0.8``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

RESULTS = Path(__file__).parent / "results" / "large_model.json"


def build(folder: Path, layers: int, n: int, m: int, tokens: int) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` one layer at a time."""
    rng = np.random.default_rng(0)
    data_name = "model.onnx.data"
    inits, nodes = [], []
    x = "x"
    offset = 0
    with open(folder / data_name, "wb") as fh:
        for i in range(layers):
            # Decaying spectrum, so low ranks mean something (random Gaussian weights are flat).
            u = rng.standard_normal((n, n)).astype(np.float32)
            w = (u * (0.9 ** np.arange(n, dtype=np.float32) / np.sqrt(n))) @ rng.standard_normal(
                (n, m), dtype=np.float32
            )
            raw = np.ascontiguousarray(w, dtype=np.float32).tobytes()
            fh.write(raw)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[n, m])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", offset), ("length", len(raw))):
                t.external_data.add(key=k, value=str(v))
            inits.append(t)
            offset += len(raw)
            del w, raw, u
            h = f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [h], name=f"fc{i}"))
            nodes.append(helper.make_node("Reshape", [h, "fold"], [f"r{i}"], name=f"fold{i}"))
            x = f"y{i}"
            nodes.append(
                helper.make_node(
                    "ReduceMean", [f"r{i}"], [x], name=f"mean{i}", axes=[2], keepdims=0
                )
            )
    inits.append(helper.make_tensor("fold", TensorProto.INT64, [4], [1, tokens, m // n, n]))
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, n])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, tokens, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def child(argv: list[str]) -> dict:
    """Run a command; its wall time and peak RSS (this process's only child at that moment)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb < before:
        raise RuntimeError("ru_maxrss went down")
    return {
        "argv": argv[1:],
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        # ru_maxrss is the largest child so far: run the largest-expected child first.
        "peak_rss_bytes": peak_kb * 1024,
        "stderr_tail": proc.stderr[-2000:],
        "stdout_tail": proc.stdout[-3000:],
    }


QWEN = Path.home() / ".cache" / "flarc" / "qwen2.5-0.5b"
SESSION_CHECK = """
import sys, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print("loaded", len(s.get_inputs()), "inputs")
"""
LOAD_CHECK = """
import sys, onnxruntime as ort, numpy as np
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
y = s.run(None, {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
print("loaded", [o.shape for o in y])
"""


def record(result: dict) -> None:
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*old, result], indent=2) + "\n")


def qwen(args) -> int:
    from quality_lm import calibration_text

    model = QWEN / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"{model}: see bench/quality_lm.py for the export")
    size = model.stat().st_size + sum(p.stat().st_size for p in QWEN.glob("model.onnx.data"))
    folder = Path(tempfile.mkdtemp(prefix="flarc-large-", dir=args.workdir))
    try:
        out = folder / "small.onnx"
        run = child([sys.executable, "-m", "flarc.cli", "compress", str(model), "-o", str(out),
                     "--text", str(calibration_text()), "--tokenizer", str(QWEN / "hf"),
                     "--seq-len", "128", "--batch-size", "4", "--max-batches", "8",
                     "--exclude", "lm_head", "--ratio", "0.8",
                     "--report", str(folder / "report.json")])  # fmt: skip
        load = child([sys.executable, "-c", SESSION_CHECK, str(out)]) if out.exists() else None
        if run["returncode"] == 0:
            run["stderr_tail"] = run["stderr_tail"][-500:]
        record({
            "label": args.label or "Qwen2.5-Coder-0.5B fp32, flarc compress --ratio 0.8",
            "model": str(model),
            "model_bytes_on_disk": size,
            "compress": run,
            "peak_over_size": round(run["peak_rss_bytes"] / size, 3),
            "output_bytes": sum(p.stat().st_size for p in folder.glob("small.onnx*")),
            "output_external_data": (folder / "small.onnx.data").exists(),
            "output_load_check": None
            if load is None
            else {k: load[k] for k in ("returncode", "stdout_tail", "stderr_tail")},
        })  # fmt: skip
        return 0 if run["returncode"] == 0 else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def model_args(ap: argparse.ArgumentParser, layers: int) -> None:
    """The synthetic model's shape, the kept ratio and where it is built (shared with
    bench/memory_stages.py)."""
    ap.add_argument("--layers", type=int, default=layers)
    for name, default in (("--n", 512), ("--m", 32768), ("--tokens", 16)):
        ap.add_argument(name, type=int, default=default)
    ap.add_argument("--ratio", type=float, default=0.95, help="kept parameters (0.95: > 2 GB out)")
    ap.add_argument("--workdir", default=None, help="where to build (deleted afterwards)")
    ap.add_argument("--label", default="", help="a note stored with the result")


def described(args: argparse.Namespace, size: int) -> dict:
    """The fields a result row starts with: what was built, and how big it is on disk."""
    return {
        "label": args.label,
        "layers": args.layers,
        "shape": [args.n, args.m],
        "model_bytes_on_disk": size,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(ap, layers=36)
    ap.add_argument("--qwen", action="store_true", help="compress the real Qwen2.5-0.5B instead")
    args = ap.parse_args()
    if args.qwen:
        return qwen(args)
    folder = Path(tempfile.mkdtemp(prefix="flarc-large-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model = build(folder, args.layers, args.n, args.m, args.tokens)
        build_s = time.perf_counter() - t0
        size = model.stat().st_size + (folder / "model.onnx.data").stat().st_size
        out = folder / "small.onnx"
        run = child(
            [
                sys.executable,
                "-m",
                "flarc.cli",
                "compress",
                str(model),
                "-o",
                str(out),
                "--synthetic",
                "4",
                "--ratio",
                str(args.ratio),
                "--report",
                str(folder / "report.json"),
            ]
        )
        written = sorted(p.name for p in folder.iterdir())
        out_size = sum(p.stat().st_size for p in folder.glob("small.onnx*"))
        load = child([sys.executable, "-c", LOAD_CHECK, str(out)]) if out.exists() else None
        gram = 2 * args.layers * args.n * args.n * 8  # calibration + held-out, float64
        result = {
            **described(args, size),
            "build_s": round(build_s, 1),
            "compress": run,
            "peak_over_size": round(run["peak_rss_bytes"] / size, 3),
            "gram_bytes": gram,
            "output_files": written,
            "output_bytes": out_size,
            "output_external_data": (folder / "small.onnx.data").exists(),
            "output_load_check": None
            if load is None
            else {k: load[k] for k in ("returncode", "stdout_tail", "stderr_tail")},
        }
        for key in ("stderr_tail",):
            if run["returncode"] == 0:
                result["compress"][key] = run[key][-500:]
        record(result)
        return 0 if run["returncode"] == 0 else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
