"""Do K-FAC sensitivities predict what a truncation does to the model's output? (issue 16; not CI)

For every target at the uniform rank of budget 0.8 (``ratio_rank(t, 0.8, 8)``; the largest
aligned rank below ``k_equiv`` where that rank would not save parameters, as
``rewrite.policy.output_sensitivity`` does), two numbers:

- the estimate: ``analysis.sensitivities()[t] * spectrum.error(k)`` (calib/sensitivity.py: one
  backward pass over the first ``sensitivity_batches`` calibration batches);
- the measurement: the end-output error with only that target replaced by its rank-k factors
  (``output_sensitivity`` x ``spectrum.error(k)``: one onnxruntime evaluation per target on the
  first two calibration batches, what ``--output-weighted`` runs), as normalised squared error
  (``mse``) and, where the model has logits, as the KL divergence of its softmax (``kl``).

The estimate is a loss and the measurement an error of another unit, so only their ranking and
their ratio up to one constant mean anything: Spearman's rho, Pearson's r of the logs, the top
five of each, and the targets whose ratio is more than 10x away from the median ratio. Also
Spearman's rho "per unit": the same with ``err(k)`` divided out of both, i.e. the global
allocation's K-FAC weights (``sensitivities()``) against ``--output-weighted``'s.

This is the one-sided estimator (spectra of ``A^1/2 W``, sensitivity ``g2 x rows x sum s^2``:
the default rule of 51998b1). Since 442d745 the default whitens two-sided (``A^1/2 W D^1/2``,
``D`` from the same pass) and its sensitivities are ``rows x sum s^2`` of those spectra; that
estimator, whose spectra change with the batches, is not measured here.

Then the same with ``sensitivity_batches`` 1, 2 (the default; 4 until 2026-12-03), 4, 8 and all calibration
batches: the time of the pass, the correlation, and the quality of the default rule at budget
0.8 (bench/quality.py's metric; next to it the unweighted global allocation and the allocation
weighted by the measured sensitivities, i.e. ``--output-weighted``).

Models: MiniLM and the ViT of bench/quality.py (same data), and a random tiny Qwen2 (tests/
_models.py ``save_tiny_qwen2``, 2 layers, exported with ``export_hf``) on random tokens: it
checks the sampled-label path and the KL metric, not the sensitivity structure of a trained
language model.

    python bench/sensitivity.py                         # all three models
    python bench/sensitivity.py --models vit            # one; merged into the existing results

Writes bench/results/sensitivity.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import minilm_setup, vit_setup

from flarc.calib.data import CalibrationSet
from flarc.core.modelio import load_model
from flarc.core.sessions import open_session
from flarc.core.targets import find_targets
from flarc.pipeline import AnalysisOptions, analyze, compress, output_sensitivities
from flarc.rewrite.policy import RankOptions, output_sensitivity
from flarc.rewrite.ranks import ratio_rank
from flarc.rewrite.search import rank_grid

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET = 0.8
ALIGN = 8
BATCHES = ("1", "2", "4", "8", "all")
DEFAULT_BATCHES = "2"  # AnalysisOptions.sensitivity_batches


def tiny_qwen2_setup(folder: Path):
    """A random tiny Qwen2 (hidden 128, 2 layers, vocab 1024) exported with ``export_hf``;
    8 calibration and 2 held-out batches of 4 x 32 random tokens (empty KV cache)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from flarc.export.buckets import calibration_for_lm
    from flarc.export.hf import export_hf, layout_from_onnx

    from _models import lm_token_batches, save_tiny_qwen2

    vocab = 1024
    save_tiny_qwen2(folder / "hf", hidden=128, inter=384, vocab=vocab)
    export_hf(folder / "hf", folder / "lm.onnx")
    layout = layout_from_onnx(load_model(folder / "lm.onnx"))
    data = CalibrationSet(
        lm_token_batches(8, vocab, batch=4, seq=32, seed=0),
        lm_token_batches(2, vocab, batch=4, seq=32, seed=1),
        "random tokens",
    )
    data = calibration_for_lm(data, layout)

    def evaluate(session, reference) -> dict:
        from flarc.rewrite.output_error import kl_rows

        total, rows = 0.0, 0
        for f in data.heldout:
            a = reference.run(["logits"], f)[0]
            b = session.run(["logits"], f)[0]
            s, n = kl_rows(a, b)
            total, rows = total + s, rows + n
        return {"held_out_kl": total / rows}

    return folder / "lm.onnx", data, evaluate, "next-token KL (lower is better)"


MODELS = {
    "minilm": (lambda _: minilm_setup(), ("mse",)),
    "vit": (lambda _: vit_setup(), ("mse",)),
    "qwen2-tiny": (tiny_qwen2_setup, ("mse", "kl")),
}


def uniform_rank(target) -> int | None:
    """The rank ``output_sensitivity`` measures a target at (None: no aligned rank saves)."""
    grid = rank_grid(target, ALIGN)
    if not grid:
        return None
    return ratio_rank(target, BUDGET, ALIGN).rank or grid[-1]


def correlation(estimate: dict[str, float], measured: dict[str, float]) -> dict:
    """Spearman's rho and Pearson's r of the logs over the targets both have positive."""
    names = [n for n in estimate if estimate[n] > 0 and measured.get(n, 0) > 0]
    e = np.array([estimate[n] for n in names])
    m = np.array([measured[n] for n in names])
    log_ratio = np.log(m) - np.log(e)
    off = log_ratio - np.median(log_ratio)
    return {
        "targets": len(names),
        "spearman": float(stats.spearmanr(e, m).statistic),
        "pearson_log": float(stats.pearsonr(np.log(e), np.log(m)).statistic),
        "median_log10_ratio": float(np.median(log_ratio) / math.log(10)),
        "spread_log10_ratio": float(np.std(log_ratio) / math.log(10)),
        "over_10x": {
            n: float(o / math.log(10))
            for n, o in zip(names, off, strict=True)
            if abs(o) > math.log(10)
        },
    }


def top(values: dict[str, float], count: int = 5) -> list[str]:
    return sorted(values, key=values.get, reverse=True)[:count]


def run_model(name: str, work: Path, batch_counts: list[str]) -> dict:
    setup, metrics = MODELS[name]
    path, data, evaluate, quality_metric = setup(work)
    model = load_model(path)
    targets = find_targets(model)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    t0 = time.perf_counter()
    # One-sided spectra (A^1/2 W), with the g2 of each sweep point put in afterwards.
    analysis = analyze(model, targets, data, AnalysisOptions(sensitivity=False, two_sided=False))
    analysis_s = time.perf_counter() - t0
    print(f"{name}: {len(analysis.targets)} targets, analysis {analysis_s:.1f}s", flush=True)

    ranks = {t.name: uniform_rank(t) for t in analysis.targets}
    err = {
        t.name: analysis.entries[t.name].spectrum.error(ranks[t.name])
        for t in analysis.targets
        if ranks[t.name] is not None
    }

    measured: dict[str, dict[str, float]] = {}
    measure_s: dict[str, float] = {}
    ratios = {}
    for metric in metrics:
        opts = RankOptions(output_metric=metric)
        t0 = time.perf_counter()
        ratios[metric] = output_sensitivity(analysis, model, analysis.probe_feeds, BUDGET, opts)
        measure_s[metric] = time.perf_counter() - t0
        measured[metric] = {n: ratios[metric][n] * e for n, e in err.items()}
        print(f"  measured ({metric}): {measure_s[metric]:.1f}s", flush=True)

    def quality(a, opts: RankOptions) -> dict:
        result = compress(model, a, opts)
        return {
            **evaluate(open_session(result.model), reference),
            "kept": result.params_after / result.params_before,
        }

    sweeps = []
    estimates = {}
    calib = len(data.calibration)
    for label in batch_counts:
        n = calib if label == "all" else int(label)
        if n > calib:
            continue
        if label != "all" and n == calib and "all" in batch_counts:
            continue  # the same pass as "all"
        t0 = time.perf_counter()
        g2 = output_sensitivities(
            model, analysis.targets, data, AnalysisOptions(sensitivity_batches=n, two_sided=False)
        )
        seconds = time.perf_counter() - t0
        weighted = dataclasses.replace(analysis, output_g2=g2.g2, sensitivity_loss=g2.loss)
        sens = weighted.sensitivities()
        estimates[label] = {n_: sens[n_] * e for n_, e in err.items()}
        row = {
            "batches": label,
            "calibration_batches": n,
            "seconds": seconds,
            "loss": g2.loss,
            "correlation": {m: correlation(estimates[label], measured[m]) for m in metrics},
            # The allocation's weights themselves: loss per unit of relative whitened error
            # against output error per unit (--output-weighted's weights), err(k) divided out.
            "correlation_per_unit": {
                m: correlation({n_: sens[n_] for n_ in err}, {n_: ratios[m][n_] for n_ in err})
                for m in metrics
            },
            "quality": quality(weighted, RankOptions(budget=BUDGET)),
        }
        sweeps.append(row)
        print(
            f"  batches {label}: {seconds:.1f}s "
            + " ".join(
                f"{m} rho {c['spearman']:.3f} r_log {c['pearson_log']:.3f}"
                for m, c in row["correlation"].items()
            )
            + f" quality {row['quality']}",
            flush=True,
        )

    # Reference allocations at the same budget: targets alike, and weighted by the measured
    # sensitivities (--output-weighted, here through output_g2 so that no evaluation is repeated).
    unweighted = quality(
        analysis, RankOptions(allocate="global", budget=BUDGET, kfac_weighted=False)
    )
    sums = {
        t.name: analysis.entries[t.name].rows
        * float(np.square(analysis.entries[t.name].spectrum.sigma).sum())
        for t in analysis.targets
    }
    output_weighted = {
        m: quality(
            dataclasses.replace(
                analysis, output_g2={n: ratios[m][n] / max(v, 1e-300) for n, v in sums.items()}
            ),
            RankOptions(budget=BUDGET),
        )
        for m in metrics
    }

    default = estimates.get(DEFAULT_BATCHES) or next(iter(estimates.values()))
    per_target = [
        {
            "target": n,
            "op": next(t.op_type for t in analysis.targets if t.name == n),
            "rank": ranks[n],
            "whitened_error": err[n],
            "estimate": default[n],
            **{f"measured_{m}": measured[m][n] for m in metrics},
        }
        for n in err
    ]
    return {
        "model": name,
        "targets": len(analysis.targets),
        "measured_targets": len(err),
        "calibration_batches": calib,
        "probe_batches": min(2, len(analysis.probe_feeds)),
        "metrics": list(metrics),
        "quality_metric": quality_metric,
        "analysis_seconds_without_sensitivity": analysis_s,
        "measure_seconds": measure_s,
        "top5_estimate": top(default),
        "top5_measured": {m: top(measured[m]) for m in metrics},
        "sweep": sweeps,
        "quality_unweighted": unweighted,
        "quality_output_weighted": output_weighted,
        "per_target": per_target,
    }


def short(name: str) -> str:
    """A target's node name without the exporter's path noise."""
    name = name.strip("/").removesuffix("/MatMul")
    for prefix in ("bert/encoder/", "backbone/encoder/", "backbone/", "model/"):
        name = name.removeprefix(prefix)
    return name


def write_markdown(results: dict, path: Path, note: str = "") -> None:
    lines = [
        "# K-FAC sensitivities against measured per-target output error (issue 16)",
        "",
        "Generated by `python bench/sensitivity.py` (bench/sensitivity.py's docstring says what",
        "each number is). Seconds are wall time on 2 cores with other benchmarks running beside",
        "it: upper bounds, comparable only within a model.",
        "",
        *([note, ""] if note else []),
    ]
    for name, r in results.items():
        metrics = r["metrics"]
        default = next((s for s in r["sweep"] if s["batches"] == DEFAULT_BATCHES), r["sweep"][0])
        lines += [
            f"## {name}",
            "",
            f"{r['targets']} targets ({r['measured_targets']} with an aligned rank below "
            f"k_equiv, compared); {r['calibration_batches']} calibration batches; measurement on "
            f"{r['probe_batches']} of them. Analysis without the sensitivity pass: "
            f"{r['analysis_seconds_without_sensitivity']:.1f} s; whole model run "
            f"{r.get('total_seconds', float('nan')):.0f} s; flarc {r.get('commit', 'unknown')}.",
            "",
            "| sensitivity batches | pass s | "
            + " | ".join(
                f"Spearman ({m}) | Pearson log ({m}) | Spearman per unit ({m})" for m in metrics
            )
            + f" | default rule at {BUDGET:g}: {r['quality_metric']} |",
            "|" + "---|" * (3 + 3 * len(metrics)),
        ]
        for s in r["sweep"]:
            q = {k: v for k, v in s["quality"].items() if k != "kept"}
            lines.append(
                f"| {s['batches']} ({s['calibration_batches']}) | {s['seconds']:.1f} | "
                + " | ".join(
                    f"{s['correlation'][m]['spearman']:.3f} | {s['correlation'][m]['pearson_log']:.3f}"
                    f" | {s['correlation_per_unit'][m]['spearman']:.3f}"
                    for m in metrics
                )
                + " | "
                + ", ".join(f"{k} {v:.4f}" for k, v in q.items())
                + " |"
            )
        references = [("unweighted global", r["quality_unweighted"])] + [
            (f"measured ({m}), i.e. --output-weighted", q)
            for m, q in r["quality_output_weighted"].items()
        ]
        for label, q in references:
            body = ", ".join(f"{k} {v:.4f}" for k, v in q.items() if k != "kept")
            lines.append(
                f"| {label} | "
                + " | ".join("" for _ in range(1 + 3 * len(metrics)))
                + f" | {body} |"
            )
        measure = ", ".join(f"{m} {s:.1f} s" for m, s in r["measure_seconds"].items())
        lines += [
            "",
            f"Per-target measurement ({r['measured_targets']} evaluations): {measure}; "
            f"sensitivity pass on {DEFAULT_BATCHES} batches: {default['seconds']:.1f} s.",
            "",
            f"Top 5 by estimate ({default['batches']} batches): "
            + ", ".join(f"`{short(t)}`" for t in r["top5_estimate"]),
        ]
        for m in metrics:
            lines.append(
                f"Top 5 measured ({m}): "
                + ", ".join(f"`{short(t)}`" for t in r["top5_measured"][m])
            )
        for m in metrics:
            c = default["correlation"][m]
            off = c["over_10x"]
            lines += [
                "",
                f"{m}: median measured/estimate 10^{c['median_log10_ratio']:.2f}, spread "
                f"(std of log10) {c['spread_log10_ratio']:.2f}; more than 10x from the median: "
                + (
                    ", ".join(f"`{short(t)}` (10^{v:+.2f})" for t, v in sorted(off.items()))
                    if off
                    else "none"
                ),
            ]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def checkout_commit() -> str:
    """HEAD of the checkout this script is in, marked ``+dirty`` when the package has changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "flarc", "calib", "rewrite"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="*", default=list(BATCHES))
    parser.add_argument("--note", default=None, help="a line on the run for the markdown")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the markdown from the JSON"
    )
    parser.add_argument(
        "--commit", default=None, help="the flarc commit measured (default: this checkout's HEAD)"
    )
    args = parser.parse_args()
    commit = args.commit or checkout_commit()
    out = RESULTS / "sensitivity.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    results = saved.get("models", {})
    note = args.note if args.note is not None else saved.get("note", "")
    if args.report:
        write_markdown(results, out.with_suffix(".md"), note)
        return
    for name in args.models:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run_model(name, Path(tmp), args.batches)
        results[name]["total_seconds"] = time.perf_counter() - t0
        results[name]["commit"] = commit
        print(f"{name}: {results[name]['total_seconds']:.0f}s in all", flush=True)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(
            json.dumps({"budget": BUDGET, "note": note, "models": results}, indent=2) + "\n"
        )
        write_markdown(results, out.with_suffix(".md"), note)


if __name__ == "__main__":
    main()
