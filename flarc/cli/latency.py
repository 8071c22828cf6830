"""``flarc latency profile|show``: per-rank layer latency on a backend, and its tables and plots."""

from __future__ import annotations

import argparse

from flarc.cli.args import ModelArgs, OutputArgs, ShapeArgs, TargetArgs, positive_int
from flarc.cli.command import Command, CommandGroup
from flarc.cli.display import CliProgress, console
from flarc.latency.backend import BACKENDS, DTYPES
from flarc.latency.timing import TimingConfig

SHAPES = ShapeArgs(
    "input shape such as input_ids:1x128 (repeatable); unset symbolic dims: first axis 1, "
    "others 128"
)


class Profile(Command):
    """``flarc latency profile``: time every target shape's dense layer and factor pairs on a
    backend, through the cache, and write latency.json."""

    name = "profile"
    help = "time every target's dense node and factor pairs"
    groups = (ModelArgs("ONNX model"), OutputArgs("latency.json to write"), SHAPES, TargetArgs())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backend", choices=list(BACKENDS), default="ort-cpu")
        parser.add_argument(
            "--threads", type=positive_int, default=None, help="intra-op threads (ort-cpu)"
        )
        parser.add_argument("--dtype", choices=DTYPES, default="fp32")
        parser.add_argument(
            "--align", type=positive_int, default=8, help="rank grid step (default 8)"
        )
        parser.add_argument("--max-repeats", type=positive_int, default=TimingConfig.max_repeats)
        parser.add_argument(
            "--max-seconds",
            type=float,
            default=TimingConfig.max_seconds,
            help="time cap per layer",
        )
        parser.add_argument(
            "--cache-dir",
            default=None,
            help="default $FLARC_CACHE_DIR/latency or ~/.cache/flarc/latency",
        )
        parser.add_argument("--no-cache", action="store_true", help="measure everything again")

    def run(self, args: argparse.Namespace) -> int:
        from flarc.core.files import check_output_path
        from flarc.core.modelio import load_model
        from flarc.latency.backend import get_backend
        from flarc.latency.cache import LatencyCache
        from flarc.latency.profile import profile_model
        from flarc.latency.show import summary_table

        out = check_output_path(args.output, [args.model])
        shapes = SHAPES.parse(args)
        model = load_model(args.model)
        found = TargetArgs().parse(args, model, args.model)
        timing = TimingConfig(max_repeats=args.max_repeats, max_seconds=args.max_seconds)
        backend = get_backend(args.backend, threads=args.threads, dtype=args.dtype, timing=timing)
        cache = LatencyCache(args.cache_dir, enabled=not args.no_cache)
        profile = profile_model(
            model, found.targets, backend, shapes, args.align, cache, CliProgress()
        )
        profile.save(out)
        con = console()
        con.print(summary_table(profile))
        con.print(
            f"{len(found.targets)} targets, {len(profile.shapes)} shapes at "
            f"{profile.input_shapes}; cache {cache.hits} hits, {cache.misses} measured -> {out}"
        )
        return 0


class Show(Command):
    """``flarc latency show``: a latency.json as a table, and as a plot when an output is given."""

    name = "show"
    help = "print a latency.json as a table, optionally plot it"
    groups = (
        ModelArgs("latency.json from 'flarc latency profile'", name="latency"),
        OutputArgs("PNG plot to write", required=False),
    )

    def run(self, args: argparse.Namespace) -> int:
        from flarc.core.files import check_output_path
        from flarc.latency.profile import LatencyProfile
        from flarc.latency.show import plot_profiles, summary_table

        profile = LatencyProfile.load(args.latency)
        con = console()
        con.print(summary_table(profile))
        con.print(f"device: {profile.device}")
        if args.output:
            out = check_output_path(args.output, [args.latency])
            plot_profiles({"": profile}, out)
            con.print(f"plot -> {out}")
        return 0


LATENCY = CommandGroup("latency", "measure and show per-rank layer latency", [Profile(), Show()])
