"""End to end on onnxruntime CPU (not CI): the original MiniLM, a uniform-ratio model, and
latency-aware models (global allocation under a measured-latency budget), each with its
measured and predicted speedup and its accuracy (sentence-embedding cosine on held-out text).

    python bench/end_to_end_latency.py [--threads 2] [--batch 1 8]

Writes bench/results/end_to_end_latency.{json,md}. Timings from a busy machine are noisy: the
spread (interquartile range / median) is printed beside every median.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from flarc.calib.data import CalibrationSet
from flarc.demo import english_sentences, minilm_feeds, minilm_onnx, sentence_embeddings
from flarc.latency.end_to_end import measure_end_to_end
from flarc.latency.model import load_latency_model
from flarc.modelio import load_model, session_bytes
from flarc.pipeline import analyze, compress
from flarc.policy import RankOptions
from flarc.targets import find_targets

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    path = minilm_onnx()
    model = load_model(path)
    sents = english_sentences()
    data = CalibrationSet(minilm_feeds(sents[:512]), minilm_feeds(sents[-256:]), "pydoc")
    analysis = analyze(model, find_targets(model), data)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    e0 = sentence_embeddings(reference, data.heldout)
    rows = []
    for batch in args.batch:
        feed = minilm_feeds(
            ["flarc " * (args.seq - 2)] * batch, batch_size=batch, seq_len=args.seq
        )[0]
        shapes = {k: list(v.shape) for k, v in feed.items()}
        latency = load_latency_model("ort-cpu", model, analysis.targets, shapes, args.threads)
        variants = {"uniform ratio 0.8": RankOptions(ratio=0.8)}
        for budget in (0.9, 0.8, 0.7, 0.6):
            variants[f"latency budget {budget}"] = RankOptions(
                allocate="global", latency=latency, latency_budget=budget
            )
        for name, opts in variants.items():
            result = compress(model, analysis, opts)
            session = ort.InferenceSession(
                session_bytes(result.model), providers=["CPUExecutionProvider"]
            )
            cosine = float(np.mean(np.sum(e0 * sentence_embeddings(session, data.heldout), axis=1)))
            timing = measure_end_to_end(model, result.model, feed, "ort-cpu", args.threads)
            row = {
                "batch": batch,
                "variant": name,
                "kept_params": result.params_after / result.params_before,
                "cosine": cosine,
                "original_ms": timing["original"]["median"] * 1e3,
                "original_spread": timing["original"]["spread"],
                "compressed_ms": timing["compressed"]["median"] * 1e3,
                "compressed_spread": timing["compressed"]["spread"],
                "speedup": timing["speedup"],
                "predicted_speedup": result.predicted_speedup(latency, timing),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "end_to_end_latency"
    out.with_suffix(".json").write_text(
        json.dumps({"threads": args.threads, "seq": args.seq, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "| batch x 128 | variant | kept params | cosine | original ms (spread) | compressed ms (spread) | speedup | predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['kept_params']:.2f} | {r['cosine']:.4f} | "
            f"{r['original_ms']:.1f} ({r['original_spread']:.0%}) | {r['compressed_ms']:.1f} ({r['compressed_spread']:.0%}) | "
            f"{r['speedup']:.2f}x | {r['predicted_speedup']:.2f}x |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
