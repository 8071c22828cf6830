"""Where the bytes go (not CI): peak resident memory per stage of ``flarc compress``.

Builds the large-model benchmark's external-data model (:mod:`bench.large_model`), then runs
the compress path in this process with the library's stage functions wrapped: before a stage
the kernel's peak (``VmHWM``) is reset through ``/proc/self/clear_refs``, after it the peak
over the stage and the resident size are read from ``/proc/self/status``. Nested stages are
accounted in their parents too. Prints a table (MB and multiples of the size on disk) and,
with ``--json``, appends it to ``bench/results/memory_stages.json``.

    python bench/memory_stages.py [--layers 2] [--n 512] [--m 32768] [--ratio 0.95]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results" / "memory_stages.json"


def status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class Tracker:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.open: list[dict] = []

    def _fold(self) -> None:
        """Charge the peak since the last reset to every open stage."""
        peak = status()["VmHWM"]
        for frame in self.open:
            frame["peak"] = max(frame["peak"], peak)

    def wrap(self, owner, attr: str, label: str | None = None) -> None:
        fn = getattr(owner, attr)
        label = label or f"{getattr(owner, '__name__', owner)}.{attr}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._fold()
            reset_peak()
            before = status()["VmRSS"]
            frame = {"stage": label, "depth": len(self.open), "before": before, "peak": before}
            self.open.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._fold()
                self.open.pop()
                frame["after"] = status()["VmRSS"]
                frame["wall_s"] = round(time.perf_counter() - t0, 2)
                self.rows.append(frame)

        setattr(owner, attr, wrapper)


def instrument(tracker: Tracker) -> None:
    import onnx
    import onnxruntime as ort

    import flarc.calib.statistics as statistics
    import flarc.core.modelio as modelio
    import flarc.pipeline as pipeline
    import flarc.rewrite.analysis as analysis
    import flarc.rewrite.closed_loop as closed_loop
    import flarc.rewrite.output_error as output_error

    stages = [  # (owner, attribute, label); the label is the attribute when None
        (modelio, "load_model", None),
        (pipeline, "analyze", None),
        (statistics, "build_statistics_model", "build_statistics_model (graph)"),
        (statistics.StatisticsSession, "__init__", "StatisticsSession (graph + ort session)"),
        (statistics.StatisticsSession, "collect", "statistics collect"),
        (analysis, "analyze_target", "analyze_target (shrink, whiten, SVD)"),
        (pipeline, "compress", None),
        (pipeline, "choose_ranks", None),
        (pipeline, "factorize", "factorize (graph surgery)"),
        (onnx.checker, "check_model", "onnx.checker"),
        (pipeline, "output_guard", None),
        (output_error.OutputErrorProbe, "__init__", "OutputErrorProbe (graph + ort session)"),
        (pipeline, "compare_models", None),
        (pipeline, "target_rows", None),
        (closed_loop, "closed_loop_entries", None),
        (modelio, "save_model", None),
        (ort.InferenceSession, "__init__", "ort.InferenceSession"),
    ]
    for owner, attr, label in stages:
        tracker.wrap(owner, attr, label or attr)


def run(model_path: Path, out: Path, ratio: float, batches: int, closed: bool) -> None:
    import flarc.core.modelio as modelio
    import flarc.pipeline as pipeline
    from flarc.calib.data import CalibrationSet, split_holdout, synthetic_feeds
    from flarc.core.inputs import model_inputs
    from flarc.core.targets import find_targets
    from flarc.rewrite.analysis import AnalysisOptions
    from flarc.rewrite.policy import RankOptions

    model = modelio.load_model(model_path)
    targets = find_targets(model)
    specs = model_inputs(model)
    feeds = synthetic_feeds(specs, batches, {})
    calib, held = split_holdout(feeds, 0.25)
    data = CalibrationSet(calib, held, "synthetic")
    analysis = pipeline.analyze(model, targets, data, AnalysisOptions())
    result = pipeline.compress(
        model, analysis, RankOptions(ratio=ratio), closed_loop=calib if closed else None
    )
    modelio.save_model(result.model, out)


def main() -> int:
    from large_model import build, described, model_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(ap, layers=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--closed-loop", action="store_true")
    ap.add_argument("--json", action="store_true", help=f"append the result to {RESULTS}")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="flarc-mem-", dir=args.workdir))
    try:
        model = build(folder, args.layers, args.n, args.m, args.tokens)
        size = model.stat().st_size + (folder / "model.onnx.data").stat().st_size
        tracker = Tracker()
        instrument(tracker)
        reset_peak()
        start = status()["VmRSS"]
        t0 = time.perf_counter()
        run(model, folder / "small.onnx", args.ratio, args.batches, args.closed_loop)
        wall = time.perf_counter() - t0
        tracker._fold()
        mb = 1e6
        print(f"model {size / mb:.0f} MB on disk; process start {start / mb:.0f} MB; {wall:.1f} s")
        print(f"{'stage':<52} {'peak MB':>9} {'x size':>7} {'RSS after':>10} {'s':>7}")
        merged: dict[str, dict] = {}
        for r in tracker.rows:
            m = merged.setdefault(r["stage"], {**r, "calls": 0, "wall_s": 0.0})
            m["peak"] = max(m["peak"], r["peak"])
            m["after"] = r["after"]
            m["wall_s"] += r["wall_s"]
            m["calls"] += 1
        for m in sorted(merged.values(), key=lambda m: -m["peak"]):
            name = "  " * m["depth"] + m["stage"] + (f" x{m['calls']}" if m["calls"] > 1 else "")
            print(
                f"{name:<52} {m['peak'] / mb:>9.0f} {m['peak'] / size:>7.2f} "
                f"{m['after'] / mb:>10.0f} {m['wall_s']:>7.1f}"
            )
        if args.json:
            result = {
                **described(args, size),
                "wall_s": round(wall, 1),
                "peak_rss_bytes": max(m["peak"] for m in merged.values()),
                "stages": [
                    {k: m[k] for k in ("stage", "depth", "calls", "peak", "after", "wall_s")}
                    for m in merged.values()
                ],
            }
            old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
            RESULTS.write_text(json.dumps([*old, result], indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
