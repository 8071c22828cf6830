"""``flarc``: the command line, a thin layer over :mod:`flarc.pipeline`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flarc import __version__
from flarc.core.errors import DataError, FlarcError
from flarc.core.progress import RichProgress

log = logging.getLogger("flarc")

RATIO_HELP = (
    "keep a fraction R of each target's parameters (SVD-LLM's convention: rank k with "
    "k(n+m) ~ R*n*m, rounded up to --align; 0.8 removes about 20%%). Default when no rank "
    "option is given: 0.8"
)


def console():
    """The CLI's console: stdout, wide enough for tables when stdout is not a terminal."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``name:1x128`` (or ``name:1,128``) -> {name: (1, 128)}."""
    shapes = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.replace(",", "x").split("x") if d)
        except ValueError:
            raise DataError(f"--shape '{item}': expected name:DIMxDIM...") from None
        if not sep or not name:
            raise DataError(f"--shape '{item}': expected name:DIMxDIM...")
    return shapes


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", metavar="REGEX", help="only targets whose node name matches")
    p.add_argument("--exclude", metavar="REGEX", help="skip targets whose node name matches")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument(
        "--calib",
        metavar="DATA",
        help="a .npz (arrays keyed by input name, first axis = samples), a folder of them, or a "
        "data loader script 'file.py:function' yielding feed dicts (user code: it is executed)",
    )
    g.add_argument("--text", metavar="FILE", help="a text file, tokenized with --tokenizer")
    g.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for --text (128)")
    g.add_argument(
        "--synthetic", type=int, metavar="N", help="N random batches from the declared shapes"
    )
    g.add_argument(
        "--shape",
        action="append",
        metavar="NAME:DIMS",
        help="input shape for --synthetic, e.g. x:1x3x224x224",
    )
    g.add_argument("--batch-size", type=int, default=8, help="samples per batch (8)")
    g.add_argument("--max-batches", type=int, help="use at most this many batches")
    g.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        help="fraction of batches held out for validation (0.25)",
    )
    g.add_argument(
        "--mask-input",
        metavar="NAME",
        help="attention mask input (default: found by name 'attention_mask')",
    )
    g.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="save the running calibration sums in DIR every --checkpoint-every batches",
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=8, metavar="N", help="batches per checkpoint (8)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint DIR (same model, options and data); "
        "the statistics are bit-identical to an uninterrupted run",
    )


def add_analysis_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("whitening")
    g.add_argument(
        "--shrinkage",
        choices=("ledoit-wolf", "oas", "none"),
        default="ledoit-wolf",
        help="shrinkage of the input statistic (ledoit-wolf)",
    )
    g.add_argument(
        "--shrinkage-lambda",
        type=float,
        metavar="X",
        help="fix the shrinkage intensity at X in [0, 1] instead of estimating it",
    )
    g.add_argument(
        "--centered",
        action="store_true",
        help="centre the statistic before shrinking (FLAR-SVD paper); default uncentred, which matches the output-error objective",
    )
    g.add_argument(
        "--whiten",
        choices=("cholesky", "eig", "diag", "none"),
        default="cholesky",
        help="whitening factor: cholesky (default; falls back to eig with a warning), eig; baselines: "
        "diag (ASVD-style per-channel RMS scaling), none (plain SVD of the weight)",
    )
    g.add_argument(
        "--stats-precision",
        choices=("float64", "float32"),
        default="float64",
        help="accumulation type of the in-graph statistics (float64)",
    )


def load_data(args, model):
    from flarc.calib.data import (
        CalibrationSet,
        load_calibration,
        load_text_lines,
        split_holdout,
        synthetic_feeds,
        tokenize,
    )
    from flarc.core.inputs import model_inputs

    specs = model_inputs(model)
    sources = [x for x in (args.calib, args.text, args.synthetic) if x]
    if len(sources) != 1:
        raise DataError("give exactly one of --calib, --text (with --tokenizer) or --synthetic N")
    if args.text:
        if not args.tokenizer:
            raise DataError("--text needs --tokenizer DIR")
        texts = load_text_lines(Path(args.text))
        feeds = tokenize(texts, args.tokenizer, specs, args.seq_len, args.batch_size)
        if args.max_batches:
            feeds = feeds[: args.max_batches]
        return load_calibration(feeds, specs, holdout=args.holdout)
    if args.synthetic:
        feeds = synthetic_feeds(specs, args.synthetic, parse_shapes(args.shape))
        calib, held = split_holdout(feeds, args.holdout)
        return CalibrationSet(calib, held, "synthetic")
    return load_calibration(args.calib, specs, args.batch_size, args.holdout, args.max_batches)


def analysis_options(args):
    from flarc.pipeline import AnalysisOptions

    return AnalysisOptions(
        shrinkage=args.shrinkage,
        centered=args.centered,
        shrinkage_lambda=args.shrinkage_lambda,
        whiten=args.whiten,
        precision=args.stats_precision,
        mask_input=args.mask_input,
    )


def cmd_inspect(args) -> int:
    import json

    from flarc.core.modelio import load_model
    from flarc.core.targets import find_targets
    from flarc.report import targets_table

    model = load_model(args.model)
    ts = find_targets(model, args.include, args.exclude)
    if args.json:
        print(
            json.dumps(
                {
                    "targets": [t.to_dict() for t in ts.targets],
                    "skipped": [s.__dict__ for s in ts.skipped],
                },
                indent=2,
            )
        )
        return 0
    con = console()
    t1, t2 = targets_table(ts.targets, ts.skipped, f"{args.model}: {len(ts.targets)} targets")
    con.print(t1)
    if ts.skipped:
        con.print(t2)
    return 0


def _prepare_output(args) -> None:
    from flarc.core.files import check_output_path

    check_output_path(args.output, [args.model])
    for opt in ("report", "plot"):
        if getattr(args, opt, None):
            check_output_path(getattr(args, opt), [args.model])


def _fisher_loss(args) -> str | None:
    """The loss to compute Fisher importances with, when the options need them."""
    wanted = (
        getattr(args, "allocate", None) == "fisher"
        or getattr(args, "fisher_weighted", False)
        or getattr(args, "fisher", False)
    )
    return args.fisher_loss if wanted else None


def _analysis_for(args, model, sha: str, progress):
    """A stored analysis (``--analysis``) or a new one from the calibration data."""
    from flarc.core.targets import find_targets, require_targets
    from flarc.pipeline import analyze
    from flarc.rewrite.analysis_file import load_analysis

    if getattr(args, "analysis", None):
        analysis = load_analysis(args.analysis, sha)
        if _fisher_loss(args) and not analysis.fisher:
            raise DataError(
                f"{args.analysis}: has no Fisher importances; run 'flarc analyze --fisher'"
            )
        has_data = any(getattr(args, k, None) for k in ("calib", "text", "synthetic"))
        return analysis, (load_data(args, model) if has_data else None)
    targets = find_targets(model, args.include, args.exclude)
    require_targets(targets, args.model)
    data = load_data(args, model)
    options = analysis_options(args)
    options.fisher = _fisher_loss(args)
    analysis = analyze(
        model,
        targets,
        data,
        options,
        sha,
        progress,
        checkpoint=args.checkpoint,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
    )
    return analysis, data


def rank_options(args, model, analysis):
    from flarc.rewrite.policy import RankOptions

    threshold = args.threshold
    if threshold not in (None, "auto"):
        try:
            threshold = float(threshold)
        except ValueError:
            raise DataError(f"--threshold '{threshold}': expected a number or 'auto'") from None
    if args.latency_budget is not None and (args.allocate != "global" or not args.latency):
        raise DataError("--latency-budget goes with --allocate global and --latency")
    opts = RankOptions(
        ratio=args.ratio,
        energy=args.energy,
        align=args.align,
        search=args.search,
        criterion=args.criterion,
        threshold=threshold,
        allocate=args.allocate,
        budget=args.budget,
        fisher_weighted=args.fisher_weighted,
        output_weighted=args.output_weighted,
        max_lat_recov=args.max_lat_recov,
        latency_budget=args.latency_budget,
        output_batches=args.output_batches,
        output_metric=args.output_metric,
    )
    if args.latency:
        from flarc.latency.model import load_latency_model

        opts.latency = load_latency_model(
            args.latency,
            model,
            analysis.targets,
            # The shapes the end-to-end check runs at, unless the user names others.
            {k: list(v) for k, v in parse_shapes(args.shape).items()}
            or {k: list(v.shape) for k, v in analysis.heldout_feeds[0].items()},
            args.threads,
            align=args.align,
            progress=RichProgress(),
        )
    return opts


def cmd_analyze(args) -> int:
    from flarc.core.files import check_output_path, file_sha256
    from flarc.core.modelio import load_model
    from flarc.rewrite.analysis_file import save_analysis

    check_output_path(args.output, [args.model])
    t0 = time.perf_counter()
    model = load_model(args.model)
    analysis, _ = _analysis_for(args, model, file_sha256(args.model), RichProgress())
    save_analysis(analysis, args.output)
    fisher = ", with Fisher importances" if analysis.fisher else ""
    console().print(
        f"analysed {len(analysis.targets)} targets ({len(analysis.skipped)} skipped){fisher} "
        f"in {time.perf_counter() - t0:.1f} s; wrote {args.output}"
    )
    return 0


def cmd_compress(args) -> int:
    from flarc.core.files import file_sha256
    from flarc.core.modelio import load_model, save_model
    from flarc.pipeline import compress
    from flarc.report import (
        comparison_table,
        latency_lines,
        plot_ranks,
        report_dict,
        rows_table,
        summary_lines,
        write_json,
    )

    _prepare_output(args)
    con = console()
    t0 = time.perf_counter()
    model = load_model(args.model)
    sha = file_sha256(args.model)
    progress = RichProgress()
    analysis, data = _analysis_for(args, model, sha, progress)
    options = rank_options(args, model, analysis)
    closed_loop = None
    if args.closed_loop or args.compensate:
        if data is None:
            raise DataError("--closed-loop needs calibration data (--calib, --text or --synthetic)")
        closed_loop = data.calibration
    result = compress(model, analysis, options, args.force, closed_loop, args.compensate, progress)
    written = save_model(result.model, args.output)
    elapsed = time.perf_counter() - t0
    con.print(rows_table(result.rows))
    con.print(comparison_table(result, analysis.heldout_label))
    for line in summary_lines(result):
        con.print(line)
    timing = None
    if options.latency is not None:
        from flarc.latency.end_to_end import measure_end_to_end

        timing = measure_end_to_end(
            model, result.model, analysis.heldout_feeds[0], args.latency_backend, args.threads
        )
        timing["predicted_speedup"] = result.predicted_speedup(options.latency, timing)
        for line in latency_lines(timing):
            con.print(line)
    con.print(f"wrote {', '.join(map(str, written))} in {elapsed:.1f} s")
    meta = {
        "model": str(args.model),
        "model_sha256": sha,
        "output": str(args.output),
        "flarc_version": __version__,
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "mask_input": analysis.mask_input,
        "fisher_loss": analysis.fisher_loss,
        "latency": timing,
    }
    if args.report:
        write_json(args.report, report_dict(result, meta))
    if args.plot:
        plot_ranks(result.rows, args.plot, f"{Path(args.model).name}: rank allocation")
    if timing is not None and timing["speedup"] < 1.0:
        con.print(
            f"[bold red]WARNING: the compressed model is SLOWER than the original on "
            f"{timing['backend']} ({timing['speedup']:.2f}x)[/]"
        )
        if args.require_speedup:
            raise FlarcError(
                f"{args.output}: the compressed model is slower ({timing['speedup']:.2f}x) "
                "and --require-speedup was given"
            )
    return 0


def cmd_demo(args) -> int:
    from flarc.demo import run_demo

    return run_demo(args)


def add_rank_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ranks")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--ratio", type=float, metavar="R", help=RATIO_HELP)
    x.add_argument(
        "--energy",
        type=float,
        metavar="E",
        help="smallest rank keeping a fraction E of the whitened energy",
    )
    g.add_argument("--align", type=int, default=8, help="ranks are multiples of this (8)")
    g.add_argument(
        "--search",
        choices=("bisect",),
        help="per-layer bisection (FLAR-SVD) over aligned ranks below k_equiv",
    )
    g.add_argument(
        "--criterion",
        choices=("whitened", "cosine", "output"),
        default="whitened",
        help="bisection criterion: whitened = closed-form relative output error of the layer (<= T); "
        "cosine = weight cosine similarity (>= T); output = normalised error of the model's final "
        "outputs with only that layer factorized (<= T; one onnxruntime session serves all candidates)",
    )
    g.add_argument(
        "--threshold",
        metavar="T",
        help="criterion threshold (defaults: whitened 0.05, cosine 0.95, output 1e-3), or 'auto' with "
        "--criterion output: FLAR-SVD's end-output error of the uniform model at the budget divided "
        "by the number of targets, then all ranks rescaled to land on the budget",
    )
    g.add_argument(
        "--output-batches",
        type=int,
        default=2,
        help="calibration batches the output criterion runs on (2)",
    )
    g.add_argument(
        "--output-metric",
        choices=("mse", "kl"),
        default="mse",
        help="end-output error of the output criterion and --output-weighted: mse = squared error "
        "of all float outputs over their energy; kl = mean KL divergence of the softmax of the "
        "outputs named *logits* from the original's (language models, classifiers)",
    )
    g.add_argument(
        "--allocate",
        choices=("fisher", "global"),
        help="fisher: ranks proportional to the Fisher importance alpha = sum_b sum (G_b * W)^2 under "
        "--budget (FLRC); global: minimise the total whitened error under --budget (or --latency-budget)",
    )
    g.add_argument(
        "--budget",
        type=float,
        metavar="P",
        help="fraction of the targets' parameters kept (0.8 = 20%% fewer)",
    )
    g.add_argument(
        "--fisher-weighted",
        action="store_true",
        help="global: weight each target's error by its Fisher importance",
    )
    g.add_argument(
        "--output-weighted",
        action="store_true",
        help="global: weight each target's whitened error by its measured end-output sensitivity "
        "(output error over whitened error with only that target at the uniform rank; one "
        "onnxruntime session, one evaluation per target)",
    )
    add_fisher_loss_arg(g)
    g = p.add_argument_group("latency")
    g.add_argument(
        "--latency",
        metavar="JSON|BACKEND",
        help="a 'flarc latency profile' file, or a backend to profile on the fly (ort-cpu, torch-cuda, "
        "tensorrt): ranks predicted slower than the dense layer are rejected, and the end-to-end "
        "speedup is measured",
    )
    g.add_argument(
        "--max-lat-recov",
        type=float,
        default=1.0,
        help="largest accepted t_pair(k) / t_dense (1.0)",
    )
    g.add_argument(
        "--latency-budget",
        type=float,
        metavar="L",
        help="global: predicted time of the targets at most L x their dense time",
    )
    g.add_argument(
        "--latency-backend", default="ort-cpu", help="backend of the end-to-end check (ort-cpu)"
    )
    g.add_argument("--threads", type=int, help="threads for latency measurements")
    g.add_argument(
        "--require-speedup",
        action="store_true",
        help="fail if the compressed model is slower than the original",
    )


def add_fisher_loss_arg(g) -> None:
    g.add_argument(
        "--fisher-loss",
        choices=("auto", "lm", "sampled", "projection"),
        default="auto",
        help="loss of the Fisher gradients: lm = next-token cross-entropy (logits [B,S,V] and input_ids; "
        "padding excluded); sampled = cross-entropy against labels sampled from the model's own output "
        "distribution (classifiers); projection = 0.5 ||R^T y||^2 with a seeded random Gaussian R "
        "(embeddings and anything else); auto picks lm, then sampled, then projection",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flarc",
        description="Low-rank factorization of deployed ONNX models (FLAR-SVD + FLRC).",
    )
    parser.add_argument("--version", action="version", version=f"flarc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the targets of a model and why others are skipped")
    p.add_argument("model")
    add_target_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("analyze", help="compute statistics, spectra (and Fisher importances) once")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the analysis file (e.g. model.analysis)")
    add_data_args(p)
    add_analysis_args(p)
    add_target_args(p)
    p.add_argument(
        "--fisher", action="store_true", help="also compute Fisher importances (gradients)"
    )
    add_fisher_loss_arg(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="factorize a model's MatMul/Gemm/Conv weights")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the compressed model (.onnx)")
    p.add_argument(
        "--analysis", metavar="FILE", help="a 'flarc analyze' file: no new calibration, no SVD"
    )
    add_data_args(p)
    add_analysis_args(p)
    add_target_args(p)
    add_rank_args(p)
    g = p.add_argument_group("closed loop")
    g.add_argument(
        "--closed-loop",
        action="store_true",
        help="refactorize targets level by level on the activations of the partly compressed model "
        "(ranks chosen first), so later layers correct for earlier errors",
    )
    g.add_argument(
        "--compensate",
        action="store_true",
        help="closed loop with error compensation: each target reproduces the original layer's "
        "output from the compressed activations (implies --closed-loop)",
    )
    p.add_argument(
        "--force", action="store_true", help="write the model even when the output guard refuses it"
    )
    p.add_argument("--report", metavar="JSON", help="write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="plot the rank allocation")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "demo", help="compress all-MiniLM-L6-v2 (the built-in default model) and show what changed"
    )
    p.add_argument(
        "--budget", type=float, default=0.8, help="fraction of the target parameters kept (0.8)"
    )
    p.add_argument(
        "--out-dir", default=None, help="where to write the models (default: the flarc cache)"
    )
    p.set_defaults(func=cmd_demo)

    from flarc.cli import export as export_cli
    from flarc.cli import latency as latency_cli

    latency_cli.register(sub)
    latency_cli.register_compare(sub)
    export = sub.add_parser("export", help="engines (.ort, TensorRT) and rank buckets")
    export_sub = export.add_subparsers(dest="export_command", required=True)
    latency_cli.register_export(export_sub)
    export_cli.register_buckets(export_sub)
    export_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except FlarcError as exc:
        print(f"flarc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:
        # Option values and file-system failures are user-facing too: one line, non-zero exit.
        print(f"flarc: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:
        # onnxruntime refusing the model (no kernel for an op or dtype, a custom domain, shapes
        # that do not fit) is bad input, not a flarc bug: one line naming the model.
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        where = getattr(args, "model", None)
        prefix = f"{where}: " if where else ""
        print(f"flarc: error: {prefix}onnxruntime: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flarc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
