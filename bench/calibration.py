"""Calibration cost on MiniLM: in-graph statistics versus plain inference of the same batches,
versus a straightforward baseline that returns activations to numpy; memory versus the number
of batches; and the wall time of a whole ``flarc compress``.

    python bench/calibration.py            # prints a table, writes bench/results/calibration.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def child(mode: str, batches: int, precision: str = "float64") -> dict:
    """Run one measurement in a fresh process so peak memory (VmHWM) is its own."""
    code = f"""
import json, time, numpy as np, onnx, onnxruntime as ort
from flarc.demo import english_sentences, minilm_feeds, minilm_onnx
from flarc.core.targets import find_targets
from flarc.calib.statistics import StatisticsSession
path = minilm_onnx(); model = onnx.load(str(path))
feeds = minilm_feeds(english_sentences()[: {batches} * 16], batch_size=16)
targets = find_targets(model).targets
def vmhwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'): return int(line.split()[1]) / 1024
base = vmhwm()
t0 = time.perf_counter()
if '{mode}' == 'plain':
    s = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    t0 = time.perf_counter()
    for f in feeds: s.run(None, f)
elif '{mode}' == 'ingraph':
    s = StatisticsSession(model, targets, feeds[0], precision='{precision}')
    t0 = time.perf_counter()
    s.collect(feeds)
else:
    inputs = sorted({{t.input for t in targets}})
    m = onnx.ModelProto(); m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in inputs)
    s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
    grams = {{}}
    t0 = time.perf_counter()
    for f in feeds:
        mask = f['attention_mask'].reshape(-1) > 0
        for name, x in zip(inputs, s.run(inputs, f)):
            rows = x.reshape(-1, x.shape[-1])[mask].astype(np.float64)
            grams[name] = grams.get(name, 0) + rows.T @ rows
elapsed = time.perf_counter() - t0
print(json.dumps({{'seconds': elapsed, 'peak_mb': vmhwm(), 'tokens': int(sum(f['attention_mask'].sum() for f in feeds)),
                  'padded_tokens': int(sum(f['attention_mask'].size for f in feeds))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compress_wall_time() -> dict:
    """``flarc compress`` end to end on MiniLM, calibration data from a folder of .npz batches."""
    from flarc.demo import english_sentences, minilm_feeds, minilm_onnx

    path = minilm_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        for i, feed in enumerate(minilm_feeds(english_sentences()[:640], batch_size=16)):
            np.savez(Path(tmp) / f"b{i:03d}.npz", **feed)
        out = Path(tmp) / "small.onnx"
        cmd = [
            sys.executable,
            "-m",
            "flarc.cli",
            "compress",
            str(path),
            "-o",
            str(out),
            "--calib",
            tmp,
            "--batch-size",
            "16",
            "--ratio",
            "0.8",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "COLUMNS": "200"})
        return {"seconds": time.perf_counter() - t0, "batches": 40, "command": " ".join(cmd[2:])}


def main() -> None:
    rows = []
    for batches in (8, 32):
        plain = child("plain", batches)
        ingraph = child("ingraph", batches)
        ingraph32 = child("ingraph", batches, "float32")
        numpy_base = child("numpy", batches)
        rows.append(
            {
                "batches": batches,
                "plain": plain,
                "ingraph_f64": ingraph,
                "ingraph_f32": ingraph32,
                "numpy_baseline": numpy_base,
            }
        )
    total = compress_wall_time()
    print(
        f"{'batches':>7} {'plain s':>8} {'in-graph f64':>13} {'in-graph f32':>13} {'numpy base':>11} | peak MB plain/ingraph/numpy"
    )
    for r in rows:
        p, g, g32, nb = r["plain"], r["ingraph_f64"], r["ingraph_f32"], r["numpy_baseline"]
        print(
            f"{r['batches']:>7} {p['seconds']:>8.2f} {g['seconds']:>6.2f} ({g['seconds'] / p['seconds']:.2f}x) "
            f"{g32['seconds']:>6.2f} ({g32['seconds'] / p['seconds']:.2f}x) {nb['seconds']:>6.2f} ({nb['seconds'] / p['seconds']:.2f}x)"
            f" | {p['peak_mb']:.0f} / {g['peak_mb']:.0f} / {nb['peak_mb']:.0f}"
        )
    print(f"flarc compress (40 batches of 16 sentences, ratio 0.8): {total['seconds']:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration.json").write_text(
        json.dumps({"rows": rows, "compress": total}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
