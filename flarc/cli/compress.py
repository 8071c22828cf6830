"""``flarc compress``: factorize a model's MatMul/Gemm/Conv weights, check the result against the
original, and report what changed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flarc.cli.analyze import ANALYSIS_GROUPS, CALIBRATION, analysis_for, brings_data
from flarc.cli.args import ClosedLoopArgs, LatencyArgs, ModelArgs, OutputArgs, RankArgs
from flarc.cli.command import Command
from flarc.cli.display import CliProgress, console
from flarc.core.errors import FlarcError, OptionError

RANKS = RankArgs()
LATENCY = LatencyArgs()
CLOSED_LOOP = ClosedLoopArgs()
OUTPUT_HELP = "the compressed model (.onnx)"


class Compress(Command):
    """``flarc compress``: choose ranks, factorize the targets and write the model, with the report
    tables (and optionally a JSON report, a rank plot and an end-to-end latency check)."""

    name = "compress"
    help = "factorize a model's MatMul/Gemm/Conv weights"
    groups = (ModelArgs(), OutputArgs(OUTPUT_HELP), *ANALYSIS_GROUPS, RANKS, LATENCY, CLOSED_LOOP)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--analysis", metavar="FILE", help="a 'flarc analyze' file: no new calibration, no SVD"
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="write the model even when the output guard refuses it",
        )
        parser.add_argument("--report", metavar="JSON", help="write the report as JSON")
        parser.add_argument("--plot", metavar="PNG", help="plot the rank allocation")

    def run(self, args: argparse.Namespace) -> int:
        from flarc.core.files import check_output_path, file_sha256, removing_meanwhile
        from flarc.core.modelio import load_model, save_model
        from flarc.core.progress import step
        from flarc.core.version import __version__
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

        for path in (args.output, args.report, args.plot):
            if path:
                check_output_path(path, [args.model])
        con = console()
        t0 = time.perf_counter()
        model = load_model(args.model)
        sha = file_sha256(args.model)
        progress = CliProgress()
        closed, compensate = CLOSED_LOOP.parse(args, model, brings_data(args))
        if args.validate_fits and not compensate:
            raise OptionError(
                "--validate-fits chooses between closed-loop fits: it needs the compensated "
                "closed loop (--preset best or --compensate) and calibration data"
            )
        floor = args.compensation_floor
        if floor is not None and not compensate:
            raise OptionError(
                "--compensation-floor shrinks compensated fits: it needs the compensated closed "
                "loop (--preset best or --compensate) and calibration data"
            )
        if floor is not None and not 0.0 <= floor <= 1.0:
            raise OptionError(f"--compensation-floor {floor} is outside [0, 1]")
        options = RANKS.parse(args)
        # The closed loop refits every factorized target: the open loop's directions go unread.
        directions = not closed or options.reads_factors
        analysis, data = analysis_for(args, model, sha, progress, compensate, directions)
        shapes = CALIBRATION.shapes.parse(args)
        options = LATENCY.parse(args, options, model, analysis, shapes, progress)
        loop = data.calibration if closed and data is not None else None
        result = compress(
            model,
            analysis,
            options,
            args.force,
            loop,
            compensate,
            progress,
            args.validate_fits,
            floor,
        )
        # The analysis' temporaries are dead now: removed while the model is written.
        with removing_meanwhile([analysis.close]):
            written = step(progress, "writing", lambda: save_model(result.model, args.output))
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
            "options": {k: v for k, v in vars(args).items() if not callable(v)},  # no hooks
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
