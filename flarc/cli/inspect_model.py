"""``flarc inspect``: a model's targets, their shapes and k_equiv, and why other nodes are skipped."""

from __future__ import annotations

import argparse
import json
import sys

from flarc.cli.args import ModelArgs, TargetArgs
from flarc.cli.command import Command
from flarc.cli.display import console


class Inspect(Command):
    """``flarc inspect``: a model's targets, and the skipped nodes with their reasons (tables or
    JSON)."""

    name = "inspect"
    help = "list the targets of a model and why others are skipped"
    groups = (ModelArgs(), TargetArgs())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(self, args: argparse.Namespace) -> int:
        from flarc.core.modelio import load_model
        from flarc.core.targets import find_targets
        from flarc.report import targets_table

        model = load_model(args.model)
        ts = find_targets(model, args.include, args.exclude)
        if args.json:  # machine-readable: plain JSON on stdout, never wrapped
            data = {
                "targets": [t.to_dict() for t in ts.targets],
                "skipped": [s.__dict__ for s in ts.skipped],
            }
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
            return 0
        con = console()
        t1, t2 = targets_table(ts.targets, ts.skipped, f"{args.model}: {len(ts.targets)} targets")
        con.print(t1)
        if ts.skipped:
            con.print(t2)
        return 0
