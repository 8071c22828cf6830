"""``flarc compare``: onnxruntime on a model against a TensorRT engine or another model, through
polygraphy's comparator."""

from __future__ import annotations

import argparse

from rich.table import Table

from flarc.cli.args import ModelArgs, ShapeArgs, positive_int
from flarc.cli.command import Command
from flarc.cli.display import console

SHAPES = ShapeArgs(
    "input shape such as input_ids:1x128 (repeatable); unset symbolic dims: first axis 1, "
    "others 128"
)


class Compare(Command):
    """``flarc compare``: a reference ONNX model against a TensorRT engine, ``.ort`` or ``.onnx``
    model on the same inputs; exit code 1 when an output is outside ``--atol``/``--rtol``."""

    name = "compare"
    help = "compare a model with its engine or another model"
    groups = (ModelArgs("reference ONNX model (run in onnxruntime)"), SHAPES)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("other", help="TensorRT engine, .ort or .onnx model")
        parser.add_argument("--atol", type=float, default=1e-4)
        parser.add_argument("--rtol", type=float, default=1e-3)
        parser.add_argument("--iterations", type=positive_int, default=2)

    def run(self, args: argparse.Namespace) -> int:
        from flarc.export.engines import compare

        result = compare(
            args.model,
            args.other,
            shapes=SHAPES.parse(args),
            atol=args.atol,
            rtol=args.rtol,
            iterations=args.iterations,
        )
        table = Table(title=f"{args.model} vs {args.other} (atol {args.atol}, rtol {args.rtol})")
        for col in ("output", "max abs", "max rel", "ok"):
            table.add_column(col, justify="left" if col == "output" else "right")
        for name, o in result["outputs"].items():
            table.add_row(
                name, f"{o['max_abs']:.3g}", f"{o['max_rel']:.3g}", "yes" if o["passed"] else "NO"
            )
        con = console()
        con.print(table)
        con.print("PASSED" if result["passed"] else "FAILED")
        return 0 if result["passed"] else 1
