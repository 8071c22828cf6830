"""Scale benchmark (issue 18, not CI): calibration statistics and per-target factorizations of a
synthetic model with LLaMA-7B layer shapes, in this process vs on Ray with local workers (vs the
GPU when there is one), with wall time per stage and peak RSS per process.

The model: ``--layers`` blocks of hidden 4096 and MLP 11008 with random float32 weights in one
external data file (under ~/.cache/flarc/scale, never committed), each block
``q, k, v = x Wq, x Wk, x Wv`` (4096 x 4096, one shared input statistic), a cheap stand-in for
attention ``a = q * sigmoid(k) + v``, ``x += a Wo``, ``g, u = x Wg, x Wu`` (4096 x 11008, one
statistic), ``x += (silu(g) * u) Wd`` (11008 x 4096). Seven targets and four input statistics
per block, as in LLaMA. The model is over flarc's large-model size, so it is loaded lazily
(weights mapped from the data file, statistics gathered a group at a time).

Each variant runs in a child process: ``collect_moments`` (statistics) then ``derive_spectra``
(shrink, whiten, SVD per target; Ledoit-Wolf, Cholesky, one-sided), timed apart. A thread in
the child samples the RSS of the child and of every process below it (Ray's workers) every
0.2 s. Per-target job times (one BLAS thread each, as every executor runs them) are recorded
for the 7B/70B plan in README.md. Results: bench/results/scale.{json,md}.

    python bench/scale.py [--layers 2] [--batches 4] [--tokens 128] [--workers 2]
                          [--variants local,ray[,cuda]]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

HIDDEN, MLP = 4096, 11008
CACHE = Path.home() / ".cache" / "flarc" / "scale"
RESULTS = Path(__file__).parent / "results"


def build(folder: Path, layers: int) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` one weight at a time (random, fixed seed)."""
    path = folder / f"llama7b_shapes_{layers}l.onnx"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    data_name = path.name + ".data"
    inits, nodes = [], []
    offset = 0
    x = "x"
    with open(folder / data_name, "wb") as fh:

        def weight(name: str, n: int, m: int) -> str:
            nonlocal offset
            w = rng.standard_normal((n, m), dtype=np.float32) / np.float32(np.sqrt(n))
            raw = w.tobytes()
            fh.write(raw)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[n, m])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", offset), ("length", len(raw))):
                t.external_data.add(key=k, value=str(v))
            inits.append(t)
            offset += len(raw)
            return name

        def node(op: str, inputs: list[str], out: str) -> str:
            nodes.append(helper.make_node(op, inputs, [out], name=out))
            return out

        for i in range(layers):
            p = f"l{i}."
            q = node("MatMul", [x, weight(p + "wq", HIDDEN, HIDDEN)], p + "q")
            k = node("MatMul", [x, weight(p + "wk", HIDDEN, HIDDEN)], p + "k")
            v = node("MatMul", [x, weight(p + "wv", HIDDEN, HIDDEN)], p + "v")
            gate = node("Sigmoid", [k], p + "ks")
            a = node("Add", [node("Mul", [q, gate], p + "qk"), v], p + "a")
            o = node("MatMul", [a, weight(p + "wo", HIDDEN, HIDDEN)], p + "o")
            h = node("Add", [x, o], p + "h")
            g = node("MatMul", [h, weight(p + "wg", HIDDEN, MLP)], p + "g")
            u = node("MatMul", [h, weight(p + "wu", HIDDEN, MLP)], p + "u")
            silu = node("Mul", [g, node("Sigmoid", [g], p + "gs")], p + "silu")
            act = node("Mul", [silu, u], p + "act")
            d = node("MatMul", [act, weight(p + "wd", MLP, HIDDEN)], p + "d")
            x = node("Add", [h, d], p + "out")
    graph = helper.make_graph(
        nodes,
        "llama7b_shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "s", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.rename(path)
    return path


class RssSampler(threading.Thread):
    """Peak RSS of this process and of every process below it, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.2):
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:1]) if p.pid == me.pid else p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                old = self.peaks.get(p.pid, (name, 0))
                self.peaks[p.pid] = (name, max(old[1], rss))


def _timed(times: list, fn, *args):
    """``fn(*args)``, its target's shape and seconds appended to ``times`` (the job's own time)."""
    t0 = time.perf_counter()
    out = fn(*args)
    t = args[0]
    times.append({"target": t.name, "n": t.n, "m": t.m, "seconds": time.perf_counter() - t0})
    return out


def timed_local(workers: int):
    """A LocalExecutor that records each factorization job's own time (for the plan)."""
    from flarc.core.executor import LocalExecutor

    class TimedLocal(LocalExecutor):
        def __init__(self, workers: int) -> None:
            super().__init__(workers)
            self.times: list = []

        def map(self, fn, jobs, hints=None, gpus=0.0):
            return super().map(functools.partial(_timed, self.times, fn), jobs, hints, gpus)

    return TimedLocal(workers)


def child(args: argparse.Namespace) -> dict:
    """One variant, in this (child) process: statistics, then spectra; timings and RSS."""
    from flarc.calib.checkpoint import Checkpoint
    from flarc.calib.data import CalibrationSet
    from flarc.calib.statistics import collect_moments
    from flarc.core.executor import RayExecutor
    from flarc.core.modelio import load_model
    from flarc.core.store import Store
    from flarc.core.targets import Weights, find_targets
    from flarc.rewrite.analysis import AnalysisOptions, derive_spectra

    sampler = RssSampler()
    sampler.start()
    rng = np.random.default_rng(1)
    feeds = [
        {"x": rng.standard_normal((1, args.tokens, HIDDEN), dtype=np.float32)}
        for _ in range(args.batches)
    ]
    data = CalibrationSet(feeds, feeds[:1], "synthetic")
    model = load_model(args.model)
    targets = find_targets(model).targets
    times: list = []
    device = "cuda" if args.child == "cuda" else "cpu"
    if args.child == "ray":
        executor = RayExecutor(workers=args.workers)
    else:
        executor = timed_local(args.workers)
        times = executor.times
    store = Store.temporary(prefix="flarc-scale-")
    out: dict = {"variant": args.child, "workers": args.workers, "targets": len(targets)}
    try:
        t0 = time.perf_counter()
        stats, _, _, _ = collect_moments(
            model, targets, data, Checkpoint(store, "statistics", {}), executor=executor
        )
        out["statistics_s"] = time.perf_counter() - t0
        options = AnalysisOptions(two_sided=False)
        t0 = time.perf_counter()
        entries = derive_spectra(
            targets, Weights(model), stats, options, store, executor=executor, device=device
        )
        out["spectra_s"] = time.perf_counter() - t0
        out["sigma_digest"] = float(sum(float(e.spectrum.sigma.sum()) for e in entries.values()))
    finally:
        executor.close()
        store.close()
        sampler.stop.set()
        sampler.join()
    out["driver_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    me = os.getpid()
    out["rss_peak_mb"] = {
        f"{name} [{pid}]" if pid != me else "driver": round(rss / 2**20)
        for pid, (name, rss) in sorted(sampler.peaks.items(), key=lambda kv: -kv[1][1])
        if rss > 50 * 2**20
    }
    out["job_times"] = times
    return out


def run_variant(variant: str, model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", str(model)]
    cmd += ["--batches", str(args.batches), "--tokens", str(args.tokens)]
    cmd += ["--workers", str(args.workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Per-block targets (n inputs, m outputs) of the models the plan is for; k and v of LLaMA-2-70B
# are 1024 wide (grouped-query attention).
PLAN_MODELS = {
    "LLaMA-7B": (32, [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]),
    "LLaMA-2-70B": (
        80,
        [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192)]
        + [(8192, 28672)] * 2
        + [(28672, 8192)],
    ),
}
PLAN_WORKERS = (1, 2, 16, 64, 256)
# On paper, not measured: float64 throughput a GPU's Cholesky/eigh/GEMM sustain (H100/H200 peak
# is 67 TFLOP/s float64 on tensor cores; eigh runs far below peak).
GPU_EFFECTIVE_FLOPS = 10e12


def job_cost(n: int, m: int) -> float:
    """The cost model of :meth:`flarc.rewrite.analysis.TargetJobs.hints` (flops, up to a factor)."""
    s = min(n, m)
    return n**3 / 3 + n * n * m + s * s * (n + m) + 4 * s**3


def plan(result: dict) -> dict:
    """Expected factorization times for 7B and 70B on N one-thread workers (largest job first):
    seconds per cost unit fitted to the measured jobs, the schedule simulated (LPT)."""
    jobs = result["variants"][0]["job_times"]
    costs = np.array([job_cost(j["n"], j["m"]) for j in jobs])
    seconds = np.array([j["seconds"] for j in jobs])
    rate = float(costs @ seconds / (costs @ costs))  # least squares through 0
    out: dict = {"seconds_per_unit": rate, "gpu_effective_flops": GPU_EFFECTIVE_FLOPS}
    for name, (layers, shapes) in PLAN_MODELS.items():
        times = sorted((rate * job_cost(n, m) for n, m in shapes * layers), reverse=True)
        row = {"jobs": len(times), "largest_job_s": times[0], "total_core_s": sum(times)}
        for w in PLAN_WORKERS:
            load = [0.0] * w
            for t in times:  # largest first onto the least loaded worker
                load[load.index(min(load))] += t
            row[f"workers_{w}_s"] = max(load)
        # 1 flop unit ~ 2 flops (multiply-add) is already inside ``rate``; on paper for the GPU.
        row["gpu_1_s_on_paper"] = (
            2 * sum(job_cost(n, m) for n, m in shapes * layers) / (GPU_EFFECTIVE_FLOPS)
        )
        out[name] = row
    return out


def plan_markdown(p: dict) -> list[str]:
    head = " | ".join(f"{w} workers" for w in PLAN_WORKERS)
    lines = [
        "",
        "Plan (on paper, from the jobs above): whitened SVDs of every target, one BLAS thread "
        f"per job, largest first; {p['seconds_per_unit'] * 1e12:.1f} s per 10^12 cost units "
        "fitted to the measured jobs. Hours:",
        "",
        f"| model | jobs | largest job (min) | {head} | 1 GPU at "
        f"{p['gpu_effective_flops'] / 1e12:.0f} TFLOP/s float64 (assumed) |",
        "|---|---|---|" + "---|" * (len(PLAN_WORKERS) + 1),
    ]
    for name in PLAN_MODELS:
        r = p[name]
        cells = " | ".join(f"{r[f'workers_{w}_s'] / 3600:.2f}" for w in PLAN_WORKERS)
        lines.append(
            f"| {name} | {r['jobs']} | {r['largest_job_s'] / 60:.1f} | {cells} | "
            f"{r['gpu_1_s_on_paper'] / 3600:.2f} |"
        )
    return lines


def markdown(result: dict) -> str:
    """The tables of bench/results/scale.md."""
    lines = [
        "# Scale: LLaMA-7B layer shapes, in-process vs Ray (bench/scale.py)",
        "",
        f"{result['layers']} blocks (hidden 4096, MLP 11008; {result['targets']} targets, "
        f"{result['model_gb']:.2f} GB float32 external data), {result['batches']} calibration "
        f"batches of 1 x {result['tokens']} tokens (+1 held out), {result['workers']} workers; "
        f"machine: {result['machine']}. Load average when it started: {result['load_before']}.",
        "",
        "| variant | statistics (s) | whitened SVDs (s) | total (s) | driver peak RSS (MB) "
        "| largest worker peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        workers = [v for k, v in r["rss_peak_mb"].items() if k.startswith("ray::")]
        lines.append(
            f"| {r['variant']} | {r['statistics_s']:.1f} | {r['spectra_s']:.1f} | "
            f"{r['statistics_s'] + r['spectra_s']:.1f} | {r['driver_maxrss_mb']:.0f} | "
            f"{max(workers) if workers else '-'} |"
        )
    lines += ["", "Per-target factorization jobs (one BLAS thread each; local run):", ""]
    lines += ["| shape n x m | jobs | mean s | min s | max s |", "|---|---|---|---|---|"]
    for shape, t in result["job_summary"].items():
        lines.append(
            f"| {shape} | {t['count']} | {t['mean']:.1f} | {t['min']:.1f} | {t['max']:.1f} |"
        )
    lines += ["", "Peak RSS per process (MB; RSS counts mapped model pages, shared):", ""]
    for r in result["variants"]:
        procs = ", ".join(f"{k}: {v}" for k, v in r["rss_peak_mb"].items())
        lines.append(f"- {r['variant']}: {procs}")
    if "plan" in result:
        lines += plan_markdown(result["plan"])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default="local,ray")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--plan-only", action="store_true", help="redo the plan from scale.json")
    args = ap.parse_args()
    if args.plan_only:
        result = json.loads((RESULTS / "scale.json").read_text())
        result["plan"] = plan(result)
        (RESULTS / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "scale.md").write_text(markdown(result))
        print(markdown(result))
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build(CACHE, args.layers)
    built = time.perf_counter() - t0
    load = os.getloadavg()
    variants = [run_variant(v, model, args) for v in args.variants.split(",")]
    digests = {r["variant"]: r["sigma_digest"] for r in variants}
    summary: dict = {}
    for j in variants[0]["job_times"]:
        summary.setdefault(f"{j['n']} x {j['m']}", []).append(j["seconds"])
    result = {
        "command": " ".join(["python bench/scale.py", *sys.argv[1:]]),
        "layers": args.layers,
        "targets": variants[0]["targets"],
        "batches": args.batches,
        "tokens": args.tokens,
        "workers": args.workers,
        "model_gb": sum(f.stat().st_size for f in CACHE.glob(model.name + "*")) / 1e9,
        "build_s": built,
        "machine": f"{os.cpu_count()} CPU cores, no GPU"
        if "cuda" not in args.variants
        else f"{os.cpu_count()} CPU cores + GPU",
        "load_before": [round(x, 2) for x in load],
        "same_spectra": len(set(digests.values())) == 1,
        "variants": variants,
        "job_summary": {
            k: {"count": len(v), "mean": float(np.mean(v)), "min": min(v), "max": max(v)}
            for k, v in summary.items()
        },
    }
    result["plan"] = plan(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "scale.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
