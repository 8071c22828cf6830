"""Where `flarc compress` spends its time on Qwen2.5-Coder-0.5B (not CI; see docs/models.md).

Runs the README's command in a child process, its progress redirected to a log (one timed line
per stage), and reports per preset: wall time, peak RSS (the child's), the time of each stage
read from the log lines (a stage's ``started`` to its ``done``; the 24 statistics groups summed),
what falls between stages (the rest), and the held-out perplexities of the written model in
and out of domain (`bench/quality_lm.py`'s windows). Needs the cache `bench/quality_lm.py`
builds (the ONNX export and `calib_pydoc_4096.txt`).

    python bench/compress_time.py [--presets best fast] [--budget 0.8]

Writes bench/results/compress_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_lm as q
from calibration_bound import gemm_rate

RESULTS = Path(__file__).resolve().parent / "results"
LINE = re.compile(
    r"^\[(\d+):(\d\d):(\d\d)\] (.+): (started.*|\d+/\d+ \(100%\).*done|\d+ done in .*)$"
)
GROUP = re.compile(r" \(\d+/\d+\)$")


def seconds(h: str, m: str, s: str) -> int:
    return int(h) * 3600 + int(m) * 60 + int(s)


def stage_times(log: str) -> dict[str, int]:
    """Seconds per stage from the CLI's timed lines, a stage's ``started`` to its ``done``. The
    groups of one stage (``name (k/n)``: the calibration statistics' 24, the held-out ones'
    few) count as ``name (grouped)``, from the first group's start to the last group's end."""
    begun: dict[str, int] = {}
    out: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
    for line in log.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        t, name, what = seconds(*m.groups()[:3]), m.group(4), m.group(5)
        if GROUP.search(name):
            groups.setdefault(GROUP.sub("", name) + " (grouped)", []).append(t)
        elif what.startswith("started"):
            begun[name] = t
        elif name in begun:
            out[name] = out.get(name, 0) + t - begun.pop(name)
    out.update({name: max(ts) - min(ts) for name, ts in groups.items()})
    return dict(sorted(out.items(), key=lambda kv: _first(log, kv[0])))


def _first(log: str, name: str) -> int:
    """Where a stage first appears in the log (stages in the order they ran)."""
    at = log.find(f"] {name.removesuffix(' (grouped)')}")
    return at if at >= 0 else len(log)


def run_preset(preset: str, budget: float, work: Path) -> dict:
    calib = work / "calib.txt"
    shutil.copyfile(q.calibration_text(), calib)
    out = work / f"{preset}.onnx"
    cmd = [
        "flarc", "compress", str(q.ONNX), "--text", str(calib), "--tokenizer", str(q.HF),
        "--seq-len", "128", "--batch-size", "4", "--max-batches", "8", "--exclude", "lm_head",
        "--budget", str(budget), "--preset", preset, "-o", str(out),
    ]  # fmt: skip
    log = work / f"{preset}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - t0
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    stages = stage_times(text)
    return {"preset": preset, "budget": budget, "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2),
            "stages_s": stages, "other_s": round(wall - sum(stages.values()), 1), "output": out}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["best", "fast"])
    ap.add_argument("--budget", type=float, default=0.8)
    args = ap.parse_args()
    from flarc.core.modelio import load_model
    from flarc.export.hf import layout_from_onnx

    layout = layout_from_onnx(load_model(q.ONNX))
    tok = q.tokenizer()
    ids, ood = q.pydoc_ids(tok), q.license_ids(tok)
    evals = {
        "in_domain": q.feeds_of(q.windows(ids, int(len(ids) * 0.75), 16, 256), 4, layout),
        "out_of_domain": q.feeds_of(q.windows(ood, 0, 16, 256), 4, layout),
    }
    file_gib = sum(f.stat().st_size for f in q.ONNX.parent.glob(q.ONNX.name + "*")) / 2**30
    rows, outputs = [], []
    with tempfile.TemporaryDirectory(prefix="flarc-compress-time-") as tmp:
        # Every compress child first: a child's peak RSS counts this process's size when it was
        # forked (ru_maxrss survives exec), and scoring grows this process by gigabytes.
        for preset in args.presets:
            row = run_preset(preset, args.budget, Path(tmp))
            outputs.append(row.pop("output"))
            rows.append(row)
        # The machine, to compare runs across machines; measured after the children ran, so that
        # its arrays are not in their peak RSS.
        gemm = {d.__name__: round(gemm_rate(d) / 1e9) for d in (np.float32, np.float64)}
        for row, output in zip(rows, outputs, strict=True):
            scores = q.evaluate_path(output, evals, 2)
            row["ppl_in"] = round(scores["in_domain"], 2)
            row["ppl_out"] = round(scores["out_of_domain"], 2)
            print(json.dumps(row), flush=True)
    from flarc.core.files import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    result = {"date": date.today().isoformat(), "model": "Qwen2.5-Coder-0.5B",
              "model_file_gib": round(file_gib, 2), "gemm_gflops": gemm, "rows": rows}  # fmt: skip
    write_text_atomic(RESULTS / "compress_time.json", json.dumps(result, indent=1) + "\n")
    stages = list(dict.fromkeys(s for r in rows for s in r["stages_s"]))
    lines = [
        f"# `flarc compress` time by stage: Qwen2.5-Coder-0.5B, {result['date']}",
        "",
        "`python bench/compress_time.py`: the README's command (`--seq-len 128 --batch-size 4 "
        "--max-batches 8 --exclude lm_head`), one child process per preset, on 2 cores. Stage "
        "seconds come from the CLI's timed log lines; 'other' is the wall time outside them "
        "(start-up, removing temporary stores). This machine: numpy's 3072^2 GEMM "
        f"{gemm['float32']} / {gemm['float64']} GFLOP/s float32 / float64; the model's files "
        f"{file_gib:.2f} GiB.",
        "",
        "| | " + " | ".join(f"`--preset {r['preset']}`" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| wall s | " + " | ".join(str(r["wall_s"]) for r in rows) + " |",
        "| peak RSS GiB (/ model files) | "
        + " | ".join(f"{r['peak_rss_gib']} ({r['peak_rss_gib'] / file_gib:.2f}x)" for r in rows) + " |",
        "| perplexity in / out of domain | "
        + " | ".join(f"{r['ppl_in']} / {r['ppl_out']}" for r in rows) + " |",
    ]  # fmt: skip
    for s in stages:
        lines.append(
            f"| {s} s | " + " | ".join(str(r["stages_s"].get(s, "-")) for r in rows) + " |"
        )
    lines.append("| other s | " + " | ".join(str(r["other_s"]) for r in rows) + " |")
    write_text_atomic(RESULTS / "compress_time.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
