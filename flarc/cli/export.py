"""``flarc export ort|trt|buckets``: deployable artifacts of a (compressed) model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from flarc.cli.args import (
    CalibrationArgs,
    ClosedLoopArgs,
    ComputeArgs,
    FisherLossArgs,
    ModelArgs,
    OutputArgs,
    ShapeArgs,
    TargetArgs,
    non_negative_float,
    positive_int,
)
from flarc.cli.command import Command, CommandGroup
from flarc.cli.display import CliProgress, console
from flarc.core.errors import FlarcError

BUDGETS_HELP = (
    "comma-separated bucket budgets in (0, 1] (0.9,0.8,0.7,0.6): the fraction of the targets' "
    "dense parameters each bucket keeps, as --budget everywhere. Below 1, the default rule's "
    "ranks (the global allocation weighted by sensitivities, which may keep a target dense; "
    "nested: a rank never grows towards smaller buckets, so factors are row prefixes; "
    "--allocate fisher: FLRC's), multiples of --align below k_equiv, so every bucket is smaller "
    "than the dense model; 1.0 is the dense model itself (its targets' original weights stored "
    "next to the factors: more memory for the set)"
)
SPARE_HELP = (
    "weights a bucket set may store twice (a target dense in a larger bucket, factorized in a "
    "smaller one), as a fraction of the largest bucket's target parameters (0.05; --allocate "
    "global): memory of all buckets about 1 + this times the largest's; 0: the dense targets of "
    "every bucket are the smallest bucket's"
)
SHAPES = ShapeArgs(
    "input shape such as input_ids:1x128 (repeatable); unset symbolic dims: first axis 1, "
    "others 128"
)


class ExportOrt(Command):
    """``flarc export ort``: an ONNX model in onnxruntime's ``.ort`` format."""

    name = "ort"
    help = "write an onnxruntime .ort model"
    groups = (ModelArgs("ONNX model"), OutputArgs(".ort file to write"))

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--optimization", choices=["disable", "basic", "extended", "all"], default="basic"
        )

    def run(self, args: argparse.Namespace) -> int:
        from flarc.export.engines import export_ort

        out = export_ort(args.model, args.output, args.optimization)
        console().print(f"onnxruntime model -> {out} ({Path(out).stat().st_size} bytes)")
        return 0


class ExportTrt(Command):
    """``flarc export trt``: build and save a TensorRT engine (needs a GPU)."""

    name = "trt"
    help = "build a TensorRT engine (needs a GPU)"
    groups = (ModelArgs("ONNX model"), OutputArgs("engine file to write"), SHAPES)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fp16", action="store_true", help="allow half-precision kernels")

    def run(self, args: argparse.Namespace) -> int:
        from flarc.export.engines import export_trt

        out = export_trt(args.model, args.output, fp16=args.fp16, shapes=SHAPES.parse(args))
        console().print(f"TensorRT engine -> {out} ({Path(out).stat().st_size} bytes)")
        return 0


class ExportBuckets(Command):
    """``flarc export buckets``: one analysis of a KV-cache language model, then a folder of rank
    buckets sharing one copy of the weights, sealed by its manifest."""

    name = "buckets"
    help = "rank buckets for progressive decoding: one analysis, weights stored once"
    calibration = CalibrationArgs(synthetic=False)
    groups = (
        ModelArgs("a KV-cache language model (.onnx, e.g. from flarc export-hf)"),
        OutputArgs("the bucket folder to write"),
        calibration,
        TargetArgs(),
        ComputeArgs(),
        # No preset: refitting the buckets closed loop measured no better than open loop
        # (bench/results/progressive_decoding_compensated.md), at twice the build time.
        ClosedLoopArgs(presets=False),
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--budgets", default="0.9,0.8,0.7,0.6", help=BUDGETS_HELP)
        parser.add_argument(
            "--align", type=positive_int, default=8, help="ranks are multiples of this (8)"
        )
        parser.add_argument("--spare", type=non_negative_float, default=0.05, help=SPARE_HELP)
        parser.add_argument(
            "--allocate",
            choices=("global", "fisher"),
            default="global",
            help="bucket ranks: global = compress's default rule (K-FAC-weighted global "
            "allocation), nested so each bucket is a row prefix of the larger ones; fisher = "
            "FLRC's Fisher allocation (gradients of --fisher-loss)",
        )
        FisherLossArgs().add_to(parser)
        parser.set_defaults(fisher_loss="lm")

    def run(self, args: argparse.Namespace) -> int:
        from flarc.core.files import file_sha256
        from flarc.core.modelio import load_model
        from flarc.core.version import __version__
        from flarc.export.buckets import parse_budgets
        from flarc.pipeline import build_buckets
        from flarc.rewrite.analysis import AnalysisOptions

        budgets = parse_budgets(args.budgets)
        out = Path(args.output)
        if out.resolve() == Path(args.model).resolve():
            raise FlarcError(f"{out}: output is the input model")
        t0 = time.perf_counter()
        model = load_model(args.model)
        targets = TargetArgs().parse(args, model, args.model)
        data = self.calibration.parse(args, model, tokens_only=True)
        closed, compensate = ClosedLoopArgs(presets=False).parse(args, model, True)
        provenance = {
            "source": {"model": str(args.model), "sha256": file_sha256(args.model)},
            "options": {
                "calibration": data.source if args.calib else str(args.text),
                "tokenizer": args.tokenizer,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "include": args.include,
                "exclude": args.exclude,
                "allocate": args.allocate,
                "fisher_loss": args.fisher_loss,
                "flarc_version": __version__,
            },
        }
        compute = ComputeArgs().parse(args)
        with compute.executor:
            result = build_buckets(
                model,
                targets,
                data,
                budgets,
                out,
                args.align,
                analysis_options=AnalysisOptions(mask_input=args.mask_input),
                fisher_loss=args.fisher_loss,
                provenance=provenance,
                progress=CliProgress(),
                allocate=args.allocate,
                compute=compute,
                closed_loop=closed,
                compensate=compensate,
                spare=args.spare,
            )
        table = Table(title=f"rank buckets in {out}")
        for col in ("budget", "total rank", "params", "weights MB", "file"):
            table.add_column(col, justify="left" if col == "file" else "right")
        for r in result.manifest.data["buckets"]:
            table.add_row(
                f"{r['budget']:g}",
                str(r["total_rank"]),
                f"{r['params']:,}",
                f"{r['weight_bytes'] / 1e6:.1f}",
                r["file"],
            )
        con = console()
        con.print(table)
        size = sum(e["bytes"] for e in result.manifest.data["files"].values())
        con.print(f"wrote {out} ({size / 1e6:.1f} MB on disk) in {time.perf_counter() - t0:.1f} s")
        return 0


EXPORT = CommandGroup(
    "export",
    "engines (.ort, TensorRT) and rank buckets",
    [ExportOrt(), ExportTrt(), ExportBuckets()],
)
