"""End to end on onnxruntime CPU (not CI): the original model, a uniform-ratio model, and
latency-aware models (global allocation under a measured-latency budget), each with its
measured and predicted speedup and its accuracy: MiniLM's sentence-embedding cosine on
held-out text, or the ViT's output cosine on held-out image crops (bench/quality.py's data).

    python bench/end_to_end_latency.py [--model minilm|vit] [--threads 2] [--batch 1 8]

Writes bench/results/end_to_end_latency[_vit].{json,md}. Timings from a busy machine are
noisy: the spread (interquartile range / median) is printed beside every median.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from flarc.calib.data import CalibrationSet
from flarc.core.modelio import load_model
from flarc.core.sessions import open_session
from flarc.core.targets import find_targets
from flarc.demo import english_sentences, minilm_feeds, minilm_onnx, sentence_embeddings
from flarc.latency.end_to_end import measure_end_to_end
from flarc.latency.model import load_latency_model
from flarc.pipeline import analyze, compress
from flarc.rewrite.policy import RankOptions

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))


def minilm(seq: int):
    """(model path, data, accuracy of a session, feed of ``batch`` inputs, label of a batch)."""
    path = minilm_onnx()
    sents = english_sentences()
    data = CalibrationSet(minilm_feeds(sents[:512]), minilm_feeds(sents[-256:]), "pydoc")
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    e0 = sentence_embeddings(reference, data.heldout)

    def accuracy(session) -> float:
        return float(np.mean(np.sum(e0 * sentence_embeddings(session, data.heldout), axis=1)))

    def feed(batch: int) -> dict:
        return minilm_feeds(["flarc " * (seq - 2)] * batch, batch_size=batch, seq_len=seq)[0]

    return path, data, accuracy, feed, f"batch x {seq} tokens"


def vit(seq: int):
    from quality import vit_setup

    path, data, evaluate, _ = vit_setup()
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = next(iter(data.calibration[0]))
    crops = np.concatenate([f[name] for f in data.heldout])

    def accuracy(session) -> float:
        return evaluate(session, reference)["held_out_images"]

    def feed(batch: int) -> dict:
        return {name: crops[np.arange(batch) % len(crops)]}

    return path, data, accuracy, feed, "batch x 224x224 images"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model", default="minilm", choices=("minilm", "vit"))
    args = parser.parse_args()
    path, data, accuracy, make_feed, batch_label = {"minilm": minilm, "vit": vit}[args.model](
        args.seq
    )
    model = load_model(path)
    analysis = analyze(model, find_targets(model), data)
    rows = []
    for batch in args.batch:
        feed = make_feed(batch)
        shapes = {k: list(v.shape) for k, v in feed.items()}
        latency = load_latency_model("ort-cpu", model, analysis.targets, shapes, args.threads)
        variants = {"uniform ratio 0.8": RankOptions(ratio=0.8)}
        for budget in (0.9, 0.8, 0.7, 0.6):
            variants[f"latency budget {budget}"] = RankOptions(
                allocate="global", latency=latency, latency_budget=budget
            )
        for name, opts in variants.items():
            result = compress(model, analysis, opts)
            session = open_session(result.model)
            cosine = accuracy(session)
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
    out = RESULTS / ("end_to_end_latency" + ("" if args.model == "minilm" else f"_{args.model}"))
    out.with_suffix(".json").write_text(
        json.dumps({"model": args.model, "threads": args.threads, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"| {batch_label} | variant | kept params | cosine | original ms (spread) | compressed ms (spread) | speedup | predicted |",
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
