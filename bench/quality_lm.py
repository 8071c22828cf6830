"""Held-out perplexity of Qwen2.5-Coder-0.5B-Instruct against the baselines (not CI).

Same calibration data, same held-out data and same targets (every Linear projection of the
decoder layers; ``find_targets(model, exclude="lm_head")``) for every method of
bench/quality.py's METHODS table. Perplexity is computed with onnxruntime on the ONNX model
(``flarc export-hf``, KV-cache layout) with an empty KV cache: prefill of 256-token windows,
next-token NLL over every real token.

Text: ``pydoc_data.topics`` (all topics in key order, tokenized once). Calibration = the first
``--calib-seqs`` x ``--seq-len`` tokens; the analysis' comparison batch comes from the 40-45%
mark; the in-domain held-out windows from the last 25%; out-of-domain = the licence texts in
/usr/share/common-licenses. Nothing evaluated is ever calibrated on.

Setup (see docs/models.md): the HF folder under ~/.cache/flarc/qwen2.5-0.5b/hf, then
``flarc export-hf ~/.cache/flarc/qwen2.5-0.5b/hf -o ~/.cache/flarc/qwen2.5-0.5b/model.onnx``
(the same file bench/progressive_decoding.py uses).

    python bench/quality_lm.py --methods "SVD-LLM" "flarc global" --budgets 0.8
    python bench/quality_lm.py --report          # only rebuild the tables from finished rows

The calibration statistics are collected once (``flarc.pipeline.analyze`` with its store in the
work folder: a later run resumes them, complete) and every other analysis setting of the table
(plain SVD, ASVD, SVD-LLM's unshrunk Cholesky, FLRC's Fisher importances) is the same statistics
whitened again (``flarc.pipeline.rewhiten``), its spectra kept in the same store.
Every finished (method, budget) row is written at once to the work folder, so a crash or a
partial run loses nothing; rows already there are skipped. The report merges these rows into
the committed bench/results/quality_qwen.json (a row of the work folder replaces the committed
one of the same method and budget), so a new machine keeps the earlier rows.

Writes bench/results/quality_qwen.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path.home() / ".cache" / "flarc"
HF = CACHE / "qwen2.5-0.5b" / "hf"
ONNX = CACHE / "qwen2.5-0.5b" / "model.onnx"
WORK = CACHE / "qwen2.5-0.5b" / "quality"
RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.8,)
# SVD-LLM without shrinkage needs a Cholesky of each raw Gram; with 32 x 128 = 4096 calibration
# rows, every down_proj Gram (4864 inputs) is singular, so flarc falls back to a full
# eigendecomposition per down_proj (about 2.5 min each on this machine). SVD-LLM's own code
# adds a small ridge to the diagonal when Cholesky fails; this row does that for every target.
EXTRA_METHODS = {
    "SVD-LLM (ridge 1e-6)": (dict(shrinkage_lambda=1e-6), lambda b: _ratio(b), False, False),
    # The shrinkage question alone: SVD-LLM's uniform ranks on Ledoit-Wolf-shrunk spectra.
    "uniform, Ledoit-Wolf": (dict(), lambda b: _ratio(b), False, False),
    # flarc's output-weighted allocation on the ridge-stabilised (SVD-LLM) spectra.
    "global, output-weighted (ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6),
        lambda b: _global_ow(b),
        False,
        False,
    ),
    # Issue 4 on this model: global allocation under a measured prefill-latency budget (the
    # targets' ort-cpu times at 128 tokens, bench/latency_curves.py's grid, align 32).
    "global, latency budget (prefill)": (dict(), None, False, False),
    # Output weights measured as the KL divergence of the next-token distribution (what
    # perplexity sees) instead of the squared error of the logits.
    "global, output-weighted KL (ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6),
        lambda b: _global_ow(b, "kl"),
        False,
        False,
    ),
    # FLRC's importances as weights of flarc's global allocation (same ridge spectra).
    "global, Fisher-weighted (ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6, fisher="auto"),
        lambda b: _global_fisher(b),
        False,
        False,
    ),
    # Issue 7's levers on top of the best open-loop row: closed-loop statistics, then also the
    # compensated factors (ranks from the open-loop output-weighted allocation).
    "output-weighted + closed loop (ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6),
        lambda b: _global_ow(b),
        True,
        False,
    ),
    "output-weighted + compensation (ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6),
        lambda b: _global_ow(b),
        True,
        True,
    ),
    # The default rule with one-sided whitening (before two-sided became the default).
    "flarc default, one-sided": (dict(two_sided=False), lambda b: _default(b), False, False),
    "flarc default (ridge 1e-6), one-sided": (
        dict(shrinkage_lambda=1e-6, two_sided=False),
        lambda b: _default(b),
        False,
        False,
    ),
    # The default rule (K-FAC-weighted global allocation) on the ridge-stabilised spectra.
    "flarc default (ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6),
        lambda b: _default(b),
        False,
        False,
    ),
    # The default rule's ranks, then closed-loop compensated factors (what --preset best runs).
    "flarc default + compensation": (dict(), lambda b: _default(b), True, True),
    # FLRC's allocation on the same ridge-stabilised spectra (its rewrite is SVD-LLM's).
    "FLRC (fisher, ridge 1e-6)": (
        dict(shrinkage_lambda=1e-6, fisher="auto"),
        lambda b: _fisher(b),
        False,
        False,
    ),
}


def _ratio(budget: float):
    from flarc.rewrite.policy import RankOptions

    return RankOptions(ratio=budget)


def prefill_latency(targets, threads: int):
    """A LatencyModel of the targets at a 128-token prefill on ort-cpu (cached measurements)."""
    from latency_curves import TIMING

    from flarc.latency.backend import get_backend
    from flarc.latency.cache import LatencyCache
    from flarc.latency.model import LatencyModel
    from flarc.latency.profile import LatencyProfile, profile_specs
    from flarc.latency.spec import LayerSpec

    backend = get_backend("ort-cpu", threads=threads, timing=TIMING)
    specs = {t.name: LayerSpec("linear", t.n, t.m, (128, t.n)) for t in targets}
    unique = list({sp.key: sp for sp in specs.values()}.values())
    shapes = profile_specs(unique, backend, 32, LatencyCache())
    profile = LatencyProfile(
        backend=backend.name, backend_version=backend.version(), device=backend.fingerprint(),
        threads=threads, dtype="fp32", align=32, input_shapes={}, shapes=shapes,
        targets={name: sp.key for name, sp in specs.items()},
    )  # fmt: skip
    return LatencyModel(profile, specs)


def _global_ow(budget: float, metric: str = "mse"):
    from flarc.rewrite.policy import RankOptions

    return RankOptions(allocate="global", budget=budget, output_weighted=True, output_metric=metric)


def _default(budget: float):
    from flarc.rewrite.policy import RankOptions

    return RankOptions(budget=budget)


def _global_fisher(budget: float):
    from flarc.rewrite.policy import RankOptions

    return RankOptions(allocate="global", budget=budget, fisher_weighted=True)


def _fisher(budget: float):
    from flarc.rewrite.policy import RankOptions

    return RankOptions(allocate="fisher", budget=budget)


def rss_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} rss {rss_gb():.1f} GB peak {peak_gb():.1f} GB] {msg}",
          flush=True)  # fmt: skip


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------- data


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(HF), local_files_only=True)


def pydoc_ids(tok) -> np.ndarray:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.asarray(tok(text)["input_ids"], dtype=np.int64)


def license_ids(tok) -> np.ndarray:
    text = ""
    for name in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic"):
        p = Path("/usr/share/common-licenses") / name
        if p.exists():
            text += p.read_text(errors="replace") + "\n\n"
    return np.asarray(tok(text)["input_ids"], dtype=np.int64)


def calibration_text(tokens: int = 32 * 128) -> Path:
    """The benchmark's calibration tokens (the first ``tokens`` of the text, line breaks and
    indentation kept) as a text file for ``flarc compress --text``; written once."""
    path = CACHE / "qwen2.5-0.5b" / f"calib_pydoc_{tokens}.txt"
    if not path.is_file():
        from flarc.core.files import write_text_atomic

        tok = tokenizer()
        write_text_atomic(path, tok.decode(pydoc_ids(tok)[:tokens]))
    return path


def windows(ids: np.ndarray, start: int, count: int, length: int, stop: int | None = None):
    """``count`` windows of ``length`` tokens, evenly spread over ``ids[start:stop]``."""
    stop = len(ids) if stop is None else stop
    span = stop - start - length
    if span < 0 or count < 1:
        raise SystemExit(f"not enough tokens for {count} windows of {length}")
    starts = np.linspace(start, start + span, count).astype(int) if count > 1 else [start]
    return np.stack([ids[s : s + length] for s in starts])


def feeds_of(seqs: np.ndarray, batch: int, layout) -> list[dict[str, np.ndarray]]:
    from flarc.export.hf import empty_cache

    out = []
    for i in range(0, len(seqs), batch):
        ids = seqs[i : i + batch]
        b, s = ids.shape
        out.append(
            {
                "input_ids": ids,
                "attention_mask": np.ones((b, s), dtype=np.int64),
                "position_ids": np.tile(np.arange(s, dtype=np.int64), (b, 1)),
                **empty_cache(layout, b),
            }
        )
    return out


# ---------------------------------------------------------------- perplexity


def perplexity(session, feeds: list[dict[str, np.ndarray]]) -> float:
    """exp(mean next-token NLL) over every predicted position of every window."""
    nll, count = 0.0, 0
    for feed in feeds:
        (logits,) = session.run(["logits"], feed)
        ids = feed["input_ids"]
        pred = logits[:, :-1].astype(np.float64)
        pred -= pred.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(pred).sum(axis=-1))
        picked = np.take_along_axis(pred, ids[:, 1:, None], axis=-1)[..., 0]
        nll += float((logz - picked).sum())
        count += picked.size
        del logits, pred
    return math.exp(nll / count)


def prefill_ms(session, feed: dict[str, np.ndarray], repeats: int = 7) -> float:
    """Median wall time of one prefill of the first sequence of ``feed`` (128 tokens)."""
    one = {k: v[:1, :128] if k in ("input_ids", "attention_mask", "position_ids") else v[:1]
           for k, v in feed.items()}  # fmt: skip
    session.run(["logits"], one)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(["logits"], one)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def evaluate_path(path: Path, evals: dict[str, list], threads: int) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = {label: perplexity(session, feeds) for label, feeds in evals.items()}
    out["prefill_ms"] = prefill_ms(session, evals["in_domain"][0])
    del session
    gc.collect()
    return out


def evaluate_model(model, evals: dict[str, list], threads: int) -> dict[str, float]:
    from flarc.core.modelio import save_model

    tmp = WORK / "eval"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_model(model, tmp / "model.onnx", external_data=True)
        return evaluate_path(tmp / "model.onnx", evals, threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- analyses


def timings() -> dict:
    path = WORK / "timing.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def note_time(key: str, seconds: float) -> None:
    data = timings()
    data[key] = seconds
    (WORK / "timing.json").write_text(json.dumps(data, indent=1))


def base_analysis(model, targets, calib, compare):
    """The default analysis (Ledoit-Wolf spectra) of the calibration tokens, kept in the work
    folder's store: the statistics are computed once (a later run resumes them, complete) and
    every other setting's spectra are derived from them and kept there too (``rewhiten``)."""
    from flarc.calib.data import CalibrationSet
    from flarc.pipeline import analyze

    data = CalibrationSet(calib, compare, "pydoc_data.topics")
    t0 = time.perf_counter()
    # Carried inputs kept: the compensated rows' closed loop reads them instead of re-running.
    analysis = analyze(
        model, targets, data, checkpoint=WORK / "store", resume=True, keep_inputs=True
    )
    if "statistics" not in timings():
        note_time("statistics", time.perf_counter() - t0)
    log(f"base analysis: {time.perf_counter() - t0:.1f}s")
    return analysis


def fisher_alpha(model, targets, calib, mask_input, dtype: str) -> dict:
    """FLRC importances (loss 'lm'), cached: ONNX-graph gradients in ``dtype``."""
    from flarc.calib.fisher import fisher_importance

    path = WORK / f"fisher_{dtype}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    res = fisher_importance(model, targets.targets, calib, dtype, loss="lm", mask_input=mask_input)
    out = {
        "alpha": res.alpha,
        "description": res.description,
        "seconds": time.perf_counter() - t0,
        "dtype": dtype,
    }
    path.write_text(json.dumps(out))
    log(f"Fisher ({dtype}): {out['seconds']:.1f}s")
    return out


def setting_analysis(model, base, a_opts: dict, fisher=None):
    """The analysis of one setting of the methods table: the base statistics whitened with its
    options (spectra read from the store when a run already derived them), its importances."""
    from flarc.pipeline import rewhiten
    from flarc.rewrite.analysis import AnalysisOptions

    options = AnalysisOptions(**{k: v for k, v in a_opts.items() if k != "fisher"})
    t0 = time.perf_counter()
    analysis = rewhiten(model, base, options)
    key = f"spectra {options.spectra_key()}"
    if key not in timings():
        note_time(key, time.perf_counter() - t0)
    if fisher:
        analysis = dataclasses.replace(
            analysis, fisher=fisher["alpha"], fisher_loss=fisher["description"]
        )
    log(f"analysis {json.dumps(a_opts, sort_keys=True)}: {time.perf_counter() - t0:.1f}s")
    return analysis, timings()[key]


# ---------------------------------------------------------------- main


def main() -> int:
    from quality import METHODS

    METHODS = {**METHODS, **EXTRA_METHODS}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=[m for m in METHODS if "lambda" not in m])
    ap.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS))
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per calibration batch")
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows per domain")
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--closed-loop-batches", type=int, default=None,
                    help="calibration batches the closed loop runs on (default: all)")  # fmt: skip
    ap.add_argument("--bisect-probe-seqs", type=int, default=1,
                    help="sequences of 128 tokens FLAR-SVD's output criterion runs on (1)")  # fmt: skip
    ap.add_argument("--fisher-dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only write the tables")
    args = ap.parse_args()
    (WORK / "rows").mkdir(parents=True, exist_ok=True)
    if args.report:
        return write_report()

    from flarc.core.modelio import load_model
    from flarc.core.targets import find_targets
    from flarc.export.hf import layout_from_onnx
    from flarc.pipeline import compress

    if not ONNX.is_file():
        raise SystemExit(f"{ONNX}: run flarc export-hf {HF} -o {ONNX} first")
    tok = tokenizer()
    ids = pydoc_ids(tok)
    ood_ids = license_ids(tok)
    n_calib = args.calib_seqs * args.seq_len
    held_start = int(len(ids) * 0.75)
    if n_calib > int(len(ids) * 0.4):
        raise SystemExit("calibration would run into the held-out parts")
    log(f"pydoc_data.topics: {len(ids)} tokens; licences: {len(ood_ids)} tokens")
    t0 = time.perf_counter()
    model = load_model(ONNX)
    log(f"load_model: {time.perf_counter() - t0:.1f}s")
    layout = layout_from_onnx(model)
    targets = find_targets(model, exclude="lm_head")
    log(
        f"{len(targets.targets)} targets, {sum(t.params for t in targets.targets) / 1e6:.1f}M params"
    )
    calib = feeds_of(ids[:n_calib].reshape(args.calib_seqs, args.seq_len), args.batch, layout)
    a0 = int(len(ids) * 0.4)
    compare = feeds_of(windows(ids, a0, 2, args.seq_len, int(len(ids) * 0.45)), 2, layout)
    evals = {
        "in_domain": feeds_of(
            windows(ids, held_start, args.eval_windows, args.eval_len), 4, layout
        ),
        "out_of_domain": feeds_of(windows(ood_ids, 0, args.eval_windows, args.eval_len), 4, layout),
    }
    setup = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (GGUF dequantized to fp32)",
        "targets": len(targets.targets),
        "target_params": sum(t.params for t in targets.targets),
        "calibration": f"{args.calib_seqs} x {args.seq_len} tokens, pydoc_data.topics[:{n_calib}]",
        "in_domain": f"{args.eval_windows} x {args.eval_len} tokens from the last 25% of "
        f"pydoc_data.topics ({len(ids)} tokens)",
        "out_of_domain": f"{args.eval_windows} x {args.eval_len} tokens of "
        "/usr/share/common-licenses (GPL-3, Apache-2.0, LGPL-3, MPL-2.0, Artistic)",
    }
    (WORK / "setup.json").write_text(json.dumps(setup, indent=1))

    orig_path = WORK / "rows" / "original.json"
    if orig_path.is_file() and "prefill_ms" not in json.loads(orig_path.read_text()):
        orig_path.unlink()  # measured before prefill timings were recorded: measure again
    if not orig_path.is_file():
        t0 = time.perf_counter()
        scores = evaluate_path(ONNX, evals, args.threads)
        row = {"method": "original", "budget": 1.0, "kept": 1.0, "seconds": 0.0, **scores,
               "eval_s": time.perf_counter() - t0, "peak_rss_gb": peak_gb()}  # fmt: skip
        orig_path.write_text(json.dumps(row, indent=1))
        log(f"original {scores} eval {row['eval_s']:.1f}s")

    base = base_analysis(model, targets, calib, compare)
    # Group by analysis setting so only one set of spectra is in memory at a time.
    groups: dict[str, list[str]] = {}
    for m in args.methods:
        groups.setdefault(json.dumps(METHODS[m][0], sort_keys=True), []).append(m)
    for key, methods in groups.items():
        todo = [
            (m, b)
            for m in methods
            for b in args.budgets
            if not (WORK / "rows" / f"{slug(m)}_{b:.2f}.json").is_file()
        ]
        if not todo:
            continue
        a_opts = json.loads(key)
        fisher = None
        if a_opts.get("fisher"):
            fisher = fisher_alpha(model, targets, calib, base.mask_input, args.fisher_dtype)
        analysis, derive_s = setting_analysis(model, base, a_opts, fisher)
        # Time of the analysis this setting needs: statistics (shared) + its spectra (+ Fisher).
        analysis_s = timings()["statistics"] + derive_s + (fisher["seconds"] if fisher else 0.0)
        for method, budget in todo:
            _, r_opts, closed, comp = METHODS[method]
            latency = None
            if r_opts is None:  # the latency-budget row
                from flarc.rewrite.policy import RankOptions

                latency = prefill_latency(targets.targets, args.threads)
                options = RankOptions(
                    allocate="global", latency=latency, latency_budget=budget, align=32
                )
            else:
                options = r_opts(budget)
            probe_feeds = analysis.probe_feeds
            if options.search == "bisect":
                # FLAR-SVD evaluates the whole model ~6 times per target (168 targets): its
                # output criterion runs on the first sequences of one calibration batch.
                options = dataclasses.replace(options, output_batches=1)
                analysis.probe_feeds = [
                    {k: v[: args.bisect_probe_seqs] for k, v in analysis.probe_feeds[0].items()}
                ]
            loop = calib if args.closed_loop_batches is None else calib[: args.closed_loop_batches]
            t1 = time.perf_counter()
            try:
                result = compress(
                    model, analysis, options, closed_loop=loop if closed else None,
                    compensate=comp,
                )  # fmt: skip
            except MemoryError as exc:
                log(f"{method} {budget}: MemoryError {exc}")
                continue
            finally:
                analysis.probe_feeds = probe_feeds
            compress_s = time.perf_counter() - t1
            log(f"{method} budget {budget}: compress {compress_s:.1f}s")
            t2 = time.perf_counter()
            scores = evaluate_model(result.model, evals, args.threads)
            row = {
                "method": method,
                "budget": budget,
                "kept": result.params_after / result.params_before,
                "seconds": compress_s + analysis_s,
                "compress_s": compress_s,
                "analysis_s": analysis_s,
                **scores,
                "eval_s": time.perf_counter() - t2,
                "model_params_after": result.model_params_after,
                "logits_cosine": next(
                    (c.cosine for c in result.comparison if c.name == "logits"), None
                ),
                "peak_rss_gb": peak_gb(),
                "closed_loop_batches": len(loop) if closed else 0,
                "bisect_probe_seqs": args.bisect_probe_seqs if options.search == "bisect" else None,
            }
            if latency is not None:
                # The original's prefill again, in this process and just after the compressed
                # one, so that both see the same machine.
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                sess = ort.InferenceSession(str(ONNX), so, providers=["CPUExecutionProvider"])
                row["original_prefill_ms"] = prefill_ms(sess, evals["in_domain"][0])
                del sess
                row["speedup"] = row["original_prefill_ms"] / row["prefill_ms"]
                timing = {"original": {"median": row["original_prefill_ms"] / 1e3}}
                row["predicted_speedup"] = result.predicted_speedup(latency, timing)
            (WORK / "rows" / f"{slug(method)}_{budget:.2f}.json").write_text(
                json.dumps(row, indent=1)
            )
            log(f"{method} budget {budget}: {scores}")
            del result
            gc.collect()
        del analysis
        gc.collect()
    return write_report()


def write_report() -> int:
    from quality import merged_rows

    out = RESULTS / "quality_qwen"
    # Rows of earlier runs stay in the committed results; rows of this cache replace them.
    published = out.with_suffix(".json")
    old = json.loads(published.read_text())["rows"] if published.is_file() else []
    rows = merged_rows(
        old, [json.loads(p.read_text()) for p in sorted((WORK / "rows").glob("*.json"))]
    )
    if not rows:
        return 0
    setup_path = WORK / "setup.json"
    setup = json.loads(setup_path.read_text()) if setup_path.is_file() else {}
    order = ["original", "plain SVD", "ASVD (diag)", "SVD-LLM", "SVD-LLM (ridge 1e-6)", "FLAR-SVD", "FLRC (fisher)",
             "FLRC (fisher, ridge 1e-6)", "uniform, Ledoit-Wolf",
             "global, output-weighted (ridge 1e-6)", "global, output-weighted KL (ridge 1e-6)",
             "output-weighted + closed loop (ridge 1e-6)",
             "output-weighted + compensation (ridge 1e-6)", "global, Fisher-weighted (ridge 1e-6)",
             "global, latency budget (prefill)",
             "flarc global", "global, output-weighted", "output-weighted + closed loop",
             "output-weighted + compensation", "global + closed loop",
             "global + compensation"]  # fmt: skip
    rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else 99,
                             -r["budget"]))  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    from flarc.core.files import write_text_atomic

    write_text_atomic(
        out.with_suffix(".json"),
        json.dumps({"metric": "perplexity", "setup": setup, "rows": rows}, indent=1) + "\n",
    )
    lines = [
        "# Qwen2.5-Coder-0.5B-Instruct: held-out perplexity (onnxruntime CPU)",
        "",
        *(f"- {k}: {v}" for k, v in setup.items()),
        "",
        "| method | budget | cut | ppl in-domain | ppl out-of-domain | logits cos | "
        "compress s | analysis s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # Prefill times stay in the JSON only: rows ran at different times beside other jobs.
    for r in rows:
        cos = r.get("logits_cosine")
        lines.append(
            f"| {r['method']} | {r['budget']:.1f} | {1 - r['kept']:.1%} | {r['in_domain']:.3f} | "
            f"{r['out_of_domain']:.3f} | {'' if cos is None else f'{cos:.4f}'} | "
            f"{r.get('compress_s', 0):.1f} | {r.get('analysis_s', 0):.1f} | "
            f"{r.get('peak_rss_gb', float('nan')):.1f} |"
        )
    notes = RESULTS / "quality_qwen_notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plot_rows(rows, out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def plot_rows(rows: list[dict], path: Path) -> None:
    """Held-out perplexity per method (in-domain and out-of-domain bars, log scale)."""
    from plots import axes

    labels = [f"{r['method']}\n{1 - r['kept']:.0%} cut" for r in rows]
    x = np.arange(len(rows))
    with axes(path, "", "held-out perplexity", (max(6, 1.6 * len(rows)), 4.5)) as ax:
        ax.bar(x - 0.2, [r["in_domain"] for r in rows], 0.4, label="in-domain (pydoc)")
        ax.bar(x + 0.2, [r["out_of_domain"] for r in rows], 0.4, label="out-of-domain (licences)")
        ax.set_yscale("log")
        ax.set_xticks(x, labels, fontsize="small")


if __name__ == "__main__":
    sys.exit(main())
