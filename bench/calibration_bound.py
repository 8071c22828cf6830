"""Calibration statistics against their arithmetic bound (issue 16).

The bound is the arithmetic a statistics pass cannot avoid, at this machine's measured GEMM
rates: the targets' forward products (``2 n m`` per row, float32) plus the symmetric Gram of
every distinct statistic (``n (n + 1)`` per row, at the rate of the rows' type,
``--stats-precision``, float32 by default; the rows are the statistics' own counts, so masked
positions do not count). Attention and elementwise work are left out, so the
bound is optimistic. Measured: ``collect_moments`` as ``flarc analyze`` runs it (Gram groups
for a large model), wall time, against the bound of the calibration batches' rows; then, on
their own, the held-out sums of every statistic (computed on demand: compress asks for the
factorized targets' only). Until 2026-12-03 the held-out sums were asked for after the clock
stopped while the bound counted their rows too, which understated the ratio.

    python bench/calibration_bound.py                  # MiniLM (the demo's sentences)
    python bench/calibration_bound.py --model qwen     # Qwen2.5-0.5B (bench/quality_lm.py's cache)

Writes bench/results/calibration_bound_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QWEN = Path.home() / ".cache" / "flarc" / "qwen2.5-0.5b"


def gemm_rate(dtype: type, size: int = 3072, repeats: int = 3) -> float:
    """Best of ``repeats`` square products, FLOP/s (numpy's BLAS, every core)."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size)).astype(dtype)
    b = rng.random((size, size)).astype(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def load(name: str, batches: int):
    from flarc.calib.data import load_calibration, read_text_file, tokenize
    from flarc.core.inputs import is_past, model_inputs
    from flarc.core.modelio import load_model
    from flarc.core.targets import find_targets

    if name == "minilm":
        from flarc.demo import english_sentences, minilm_feeds, minilm_onnx

        model = load_model(minilm_onnx())
        feeds = minilm_feeds(english_sentences(), 16, 128)[:batches]
        specs = model_inputs(model)
        return model, find_targets(model), load_calibration(feeds, specs)
    from flarc.export.buckets import calibration_for_lm
    from flarc.export.hf import layout_from_onnx

    model = load_model(QWEN / "model.onnx")
    specs = [s for s in model_inputs(model) if not is_past(s)]
    from quality_lm import calibration_text

    text = read_text_file(calibration_text())  # as flarc compress --text packs it
    feeds = tokenize([text], QWEN / "hf", specs, 128, 4, pack=True, max_sequences=batches * 4)
    data = load_calibration(feeds, specs)
    data = calibration_for_lm(data, layout_from_onnx(model))
    return model, find_targets(model, exclude="lm_head"), data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("minilm", "qwen"), default="minilm")
    ap.add_argument("--batches", type=int, default=8, help="source batches (a quarter held out)")
    ap.add_argument("--stats-precision", choices=("float32", "float64"), default=None)
    args = ap.parse_args()
    from flarc.calib.checkpoint import Checkpoint
    from flarc.calib.statistics import PRECISION, collect_moments
    from flarc.core.modelio import is_large
    from flarc.core.store import Store

    precision = args.stats_precision or PRECISION
    rate32, rate64 = gemm_rate(np.float32), gemm_rate(np.float64)
    model, targets, data = load(args.model, args.batches)
    store = Store.for_model(is_large(model))
    t0 = time.perf_counter()
    stats, heldout, _, _ = collect_moments(
        model, targets.targets, data, Checkpoint(store, "statistics", {}), precision
    )
    seconds = time.perf_counter() - t0
    # The held-out sums come on demand (compress asks for the factorized targets' only; `flarc
    # analyze -o` for all, as here): timed and bounded on their own.
    t0 = time.perf_counter()
    heldout_raw = heldout.raw()
    heldout_seconds = time.perf_counter() - t0
    gram_rate = rate32 if precision == "float32" else rate64

    def flops(raw) -> tuple[float, float]:
        forward = sum(
            2.0 * t.n * t.m * raw[t.stat_key].count for t in targets.targets if t.stat_key in raw
        )
        return forward, sum(float(m.n) * (m.n + 1) * m.count for m in raw.values())

    forward, gram = flops(stats.raw())
    bound = forward / rate32 + gram / gram_rate
    heldout_forward, heldout_gram = flops(heldout_raw)
    heldout_bound = heldout_forward / rate32 + heldout_gram / gram_rate
    result = {
        "model": args.model,
        "stats_precision": precision,
        "targets": len(targets.targets),
        "calibration_batches": len(data.calibration),
        "heldout_batches": len(data.heldout),
        "gemm_gflops_float32": rate32 / 1e9,
        "gemm_gflops_float64": rate64 / 1e9,
        "forward_tflop": forward / 1e12,
        "gram_tflop": gram / 1e12,
        "bound_s": bound,
        "measured_s": seconds,
        "ratio": seconds / bound,
        "heldout_bound_s": heldout_bound,
        "heldout_measured_s": heldout_seconds,
        "heldout_ratio": heldout_seconds / heldout_bound,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from flarc.core.files import write_text_atomic

    stem = RESULTS / f"calibration_bound_{args.model}"
    write_text_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Calibration statistics against their arithmetic bound: {args.model}",
        "",
        f"{result['calibration_batches']} calibration + {result['heldout_batches']} held-out "
        f"batches, {result['targets']} targets, {precision} rows; GEMM {rate32 / 1e9:.0f} "
        f"GFLOP/s float32, {rate64 / 1e9:.0f} GFLOP/s float64 (numpy 3072^2 products).",
        "",
        "| batches | forward TFLOP | Gram TFLOP | bound s | measured s | ratio |",
        "|---|---|---|---|---|---|",
        f"| calibration | {forward / 1e12:.3f} | {gram / 1e12:.3f} | {bound:.1f} | "
        f"{seconds:.1f} | {seconds / bound:.2f} |",
        f"| held-out, every statistic | {heldout_forward / 1e12:.3f} | {heldout_gram / 1e12:.3f} "
        f"| {heldout_bound:.2f} | {heldout_seconds:.1f} | {heldout_seconds / heldout_bound:.1f} |",
    ]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
