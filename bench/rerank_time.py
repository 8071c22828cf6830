"""How long re-ranking a stored analysis takes: MiniLM (issue 16's goal: under 5 s).

Analyses MiniLM once on the demo's English sentences (`flarc analyze --text`, as README shows),
then runs `flarc compress --analysis` several times, each in a child process: wall time and
peak RSS per run. One more run in this process, through the Python API, says where the time
goes: loading the model and the analysis, each stage of `compress` (its progress), and saving;
the children's wall time less that is the interpreter's start, the imports and the CLI's
own work (its tables).

    python bench/rerank_time.py [--runs 5] [--budget 0.7] [--sentences 768]

Writes bench/results/rerank_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration_bound import gemm_rate

RESULTS = Path(__file__).resolve().parent / "results"


def child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, its peak RSS in MiB). Raises SystemExit when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


class StageClock:
    """A progress that records each stage's wall time (its ``track`` from start to end)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def track(self, iterable, total=None, description=""):
        t0 = time.perf_counter()
        yield from iterable
        self.seconds[description] = self.seconds.get(description, 0.0) + time.perf_counter() - t0


def split(model_path: Path, analysis: Path, budget: float, out: Path) -> dict[str, float]:
    """Where one re-rank's time goes, in this process (imports already done)."""
    from flarc.core.modelio import load_model, save_model
    from flarc.pipeline import compress
    from flarc.rewrite.analysis_file import load_analysis
    from flarc.rewrite.policy import RankOptions

    clock = StageClock()
    t0 = time.perf_counter()
    model = load_model(model_path)
    loaded = load_analysis(analysis)
    t1 = time.perf_counter()
    result = compress(model, loaded, RankOptions(budget=budget), progress=clock)
    t2 = time.perf_counter()
    save_model(result.model, out)
    t3 = time.perf_counter()
    loaded.close()
    staged = sum(clock.seconds.values())
    return {
        "load model and analysis": t1 - t0,
        **clock.seconds,
        "ranks, rewrite, checks (between stages)": t2 - t1 - staged,
        "save": t3 - t2,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.7)
    ap.add_argument("--sentences", type=int, default=768)
    args = ap.parse_args()
    from flarc.demo import english_sentences, minilm_folder, minilm_onnx

    model = minilm_onnx()
    with tempfile.TemporaryDirectory(prefix="flarc-rerank-") as tmp:
        work = Path(tmp)
        text = work / "sentences.txt"
        text.write_text("\n".join(english_sentences()[: args.sentences]) + "\n")
        analysis = work / "m.analysis"
        analyze = ["flarc", "analyze", str(model), "--text", str(text), "--tokenizer",
                   str(minilm_folder()), "--no-pack", "--seq-len", "128", "--batch-size", "16",
                   "-o", str(analysis)]  # fmt: skip
        analyze_s, _ = child(analyze)
        cmd = ["flarc", "compress", str(model), "--analysis", str(analysis), "--budget",
               str(args.budget), "-o", str(work / "small.onnx")]  # fmt: skip
        runs = [child(cmd) for _ in range(args.runs)]
        stages = split(model, analysis, args.budget, work / "small_api.onnx")
    gemm = {d.__name__: round(gemm_rate(d) / 1e9) for d in (np.float32, np.float64)}
    walls = [w for w, _ in runs]
    result = {
        "date": date.today().isoformat(),
        "model": "all-MiniLM-L6-v2",
        "sentences": args.sentences,
        "budget": args.budget,
        "gemm_gflops": gemm,
        "analyze_s": round(analyze_s, 1),
        "rerank_wall_s": [round(w, 2) for w in walls],
        "rerank_peak_rss_mib": [round(r) for _, r in runs],
        "in_process_s": {k: round(v, 3) for k, v in stages.items()},
        "start_and_imports_s": round(float(np.median(walls)) - sum(stages.values()), 2),
    }
    from flarc.core.files import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / "rerank_time.json", json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Re-rank of a stored analysis: MiniLM, {result['date']}",
        "",
        f"`flarc analyze` on {args.sentences} sentences (`--no-pack --seq-len 128 --batch-size "
        f"16`): {result['analyze_s']} s; then `flarc compress --analysis --budget {args.budget}`,"
        f" {args.runs} runs. GEMM {gemm['float32']} / {gemm['float64']} GFLOP/s float32 / "
        "float64 (numpy 3072^2 products).",
        "",
        f"Wall: {', '.join(f'{w:.2f}' for w in walls)} s (median {np.median(walls):.2f} s); "
        f"peak RSS {min(result['rerank_peak_rss_mib'])}-{max(result['rerank_peak_rss_mib'])} MiB.",
        "",
        "| where (one run in-process) | s |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in stages.items()),
        f"| interpreter start, imports, the CLI's tables (median wall less the above) | "
        f"{result['start_and_imports_s']:.2f} |",
    ]
    write_text_atomic(RESULTS / "rerank_time.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
