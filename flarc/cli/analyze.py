"""``flarc analyze``: statistics, whitened spectra (and Fisher importances) computed once and
stored, so that ranks can be chosen again in seconds (``flarc compress --analysis``)."""

from __future__ import annotations

import argparse
import dataclasses
import time

from flarc.cli.args import (
    CalibrationArgs,
    CheckpointArgs,
    ComputeArgs,
    FisherLossArgs,
    ModelArgs,
    OutputArgs,
    RankArgs,
    TargetArgs,
    WhiteningArgs,
)
from flarc.cli.command import Command
from flarc.cli.display import CliProgress, console
from flarc.core.errors import DataError

CALIBRATION = CalibrationArgs()
TARGETS = TargetArgs()
WHITENING = WhiteningArgs()
CHECKPOINTS = CheckpointArgs()
COMPUTE = ComputeArgs()
OUTPUT_HELP = "the analysis folder (e.g. model.analysis)"
# The flags of an analysis: what analyze takes and compress takes too.
ANALYSIS_GROUPS = (CALIBRATION, CHECKPOINTS, WHITENING, TARGETS, COMPUTE)


def brings_data(args: argparse.Namespace) -> bool:
    """Whether :func:`analysis_for` gives calibration data: always with a new analysis, with a
    stored one (``--analysis``) only when a source is given too."""
    return not getattr(args, "analysis", None) or CALIBRATION.given(args)


def analysis_for(
    args: argparse.Namespace,
    model,
    sha: str,
    progress,
    keep_inputs: bool = False,
    directions: bool = True,
):
    """``(analysis, calibration data or None)``: the stored analysis of ``--analysis`` (with data
    only when a source is also given), or a new one from the calibration data (``keep_inputs``:
    :func:`flarc.pipeline.analyze`'s; without ``directions``, spectra of singular values only:
    :attr:`AnalysisOptions.directions`)."""
    from flarc.pipeline import analyze
    from flarc.rewrite.analysis_file import load_analysis

    fisher = RankArgs.fisher_loss(args)
    if getattr(args, "analysis", None):
        analysis = load_analysis(args.analysis, sha)
        if fisher and not analysis.fisher:
            raise DataError(
                f"{args.analysis}: has no Fisher importances; run 'flarc analyze --fisher'"
            )
        return analysis, CALIBRATION.parse(args, model) if brings_data(args) else None
    targets = TARGETS.parse(args, model, args.model)
    data = CALIBRATION.parse(args, model)
    options = dataclasses.replace(WHITENING.parse(args, fisher), directions=directions)
    compute = COMPUTE.parse(args)
    with compute.executor:
        analysis = analyze(
            model,
            targets,
            data,
            options,
            sha,
            progress,
            **CHECKPOINTS.parse(args),
            compute=compute,
            keep_inputs=keep_inputs,
        )
    return analysis, data


class Analyze(Command):
    """``flarc analyze``: calibrate once and save the analysis (statistics, whitened spectra and,
    with ``--fisher``, Fisher importances) for ``flarc compress --analysis``."""

    name = "analyze"
    help = "compute statistics, spectra (and Fisher importances) once"
    groups = (ModelArgs(), OutputArgs(OUTPUT_HELP), *ANALYSIS_GROUPS)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--fisher", action="store_true", help="also compute Fisher importances (gradients)"
        )
        FisherLossArgs().add_to(parser)

    def run(self, args: argparse.Namespace) -> int:
        from flarc.core.files import check_output_path, file_sha256
        from flarc.core.modelio import load_model
        from flarc.rewrite.analysis_file import save_analysis

        check_output_path(args.output, [args.model])
        t0 = time.perf_counter()
        model = load_model(args.model)
        analysis, _ = analysis_for(args, model, file_sha256(args.model), CliProgress())
        save_analysis(analysis, args.output)
        fisher = ", with Fisher importances" if analysis.fisher else ""
        console().print(
            f"analysed {len(analysis.targets)} targets ({len(analysis.skipped)} skipped){fisher} "
            f"in {time.perf_counter() - t0:.1f} s; wrote {args.output}"
        )
        return 0
