"""argparse registration for ``flarc latency profile|show``, ``flarc export ort|trt`` and
``flarc compare``; the main CLI owns the top-level parser and calls these functions.

Each sub-command sets ``func=handler(args) -> int``; handlers raise FlarcError for bad input
(the main CLI prints it on one line) and draw tables and progress through rich.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flarc.latency.backend import BACKENDS, DTYPES
from flarc.latency.timing import TimingConfig

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _add_shape_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        action="extend",
        nargs="+",
        default=[],
        metavar="INPUT:DIMS",
        help="input shape such as input_ids:1x128 (repeatable); unset symbolic dims: "
        "first axis 1, others 128",
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``latency`` command group (``profile``, ``show``)."""
    latency = subparsers.add_parser("latency", help="measure and show per-rank layer latency")
    sub = latency.add_subparsers(dest="latency_command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="time every target's dense node and factor pairs")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--backend", choices=list(BACKENDS), default="ort-cpu")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (ort-cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    _add_shape_arg(p)
    p.add_argument("--align", type=_positive_int, default=8, help="rank grid step (default 8)")
    p.add_argument("--include", default=None, help="regex of node names to profile")
    p.add_argument("--exclude", default=None, help="regex of node names to skip")
    p.add_argument("--max-repeats", type=_positive_int, default=TimingConfig.max_repeats)
    p.add_argument(
        "--max-seconds", type=float, default=TimingConfig.max_seconds, help="time cap per layer"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="default $FLARC_CACHE_DIR/latency or ~/.cache/flarc/latency",
    )
    p.add_argument("--no-cache", action="store_true", help="measure everything again")
    p.add_argument("-o", "--output", required=True, help="latency.json to write")
    p.set_defaults(func=profile_handler)

    s = sub.add_parser("show", help="print a latency.json as a table, optionally plot it")
    s.add_argument("latency", help="latency.json from 'flarc latency profile'")
    s.add_argument("-o", "--output", default=None, help="PNG plot to write")
    s.set_defaults(func=show_handler)
    return latency


def register_export(export_subparsers: argparse._SubParsersAction) -> None:
    """Add ``ort`` and ``trt`` to the main CLI's ``export`` group."""
    o = export_subparsers.add_parser("ort", help="write an onnxruntime .ort model")
    o.add_argument("model", help="ONNX model")
    o.add_argument("-o", "--output", required=True, help=".ort file to write")
    o.add_argument(
        "--optimization", choices=["disable", "basic", "extended", "all"], default="basic"
    )
    o.set_defaults(func=export_ort_handler)

    t = export_subparsers.add_parser("trt", help="build a TensorRT engine (needs a GPU)")
    t.add_argument("model", help="ONNX model")
    t.add_argument("-o", "--output", required=True, help="engine file to write")
    t.add_argument("--fp16", action="store_true", help="allow half-precision kernels")
    _add_shape_arg(t)
    t.set_defaults(func=export_trt_handler)


def register_compare(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compare``: onnxruntime on a model vs an engine or another model (polygraphy)."""
    c = subparsers.add_parser("compare", help="compare a model with its engine or another model")
    c.add_argument("model", help="reference ONNX model (run in onnxruntime)")
    c.add_argument("other", help="TensorRT engine, .ort or .onnx model")
    _add_shape_arg(c)
    c.add_argument("--atol", type=float, default=1e-4)
    c.add_argument("--rtol", type=float, default=1e-3)
    c.add_argument("--iterations", type=_positive_int, default=2)
    c.set_defaults(func=compare_handler)
    return c


def profile_handler(args: argparse.Namespace) -> int:
    from flarc.core.files import check_output_path
    from flarc.core.modelio import load_model
    from flarc.core.progress import RichProgress
    from flarc.core.targets import find_targets, require_targets
    from flarc.latency.backend import get_backend
    from flarc.latency.cache import LatencyCache
    from flarc.latency.profile import profile_model
    from flarc.latency.shapes import parse_shape_args
    from flarc.latency.show import summary_table

    out = check_output_path(args.output, [args.model])
    shapes = parse_shape_args(args.shape)
    model = load_model(args.model)
    found = find_targets(model, args.include, args.exclude)
    require_targets(found, args.model)
    timing = TimingConfig(max_repeats=args.max_repeats, max_seconds=args.max_seconds)
    backend = get_backend(args.backend, threads=args.threads, dtype=args.dtype, timing=timing)
    cache = LatencyCache(args.cache_dir, enabled=not args.no_cache)
    profile = profile_model(
        model, found.targets, backend, shapes, args.align, cache, RichProgress()
    )
    profile.save(out)
    console = Console()
    console.print(summary_table(profile))
    console.print(
        f"{len(found.targets)} targets, {len(profile.shapes)} shapes at "
        f"{profile.input_shapes}; cache {cache.hits} hits, {cache.misses} measured -> {out}"
    )
    return 0


def show_handler(args: argparse.Namespace) -> int:
    from flarc.core.files import check_output_path
    from flarc.latency.profile import LatencyProfile
    from flarc.latency.show import plot_profiles, summary_table

    profile = LatencyProfile.load(args.latency)
    console = Console()
    console.print(summary_table(profile))
    console.print(f"device: {profile.device}")
    if args.output:
        out = check_output_path(args.output, [args.latency])
        plot_profiles({"": profile}, out)
        console.print(f"plot -> {out}")
    return 0


def export_ort_handler(args: argparse.Namespace) -> int:
    from flarc.export.engines import export_ort

    out = export_ort(args.model, args.output, args.optimization)
    Console().print(f"onnxruntime model -> {out} ({Path(out).stat().st_size} bytes)")
    return 0


def export_trt_handler(args: argparse.Namespace) -> int:
    from flarc.export.engines import export_trt
    from flarc.latency.shapes import parse_shape_args

    out = export_trt(args.model, args.output, fp16=args.fp16, shapes=parse_shape_args(args.shape))
    Console().print(f"TensorRT engine -> {out} ({Path(out).stat().st_size} bytes)")
    return 0


def compare_handler(args: argparse.Namespace) -> int:
    from flarc.export.engines import compare
    from flarc.latency.shapes import parse_shape_args

    result = compare(
        args.model,
        args.other,
        shapes=parse_shape_args(args.shape),
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
    console = Console()
    console.print(table)
    console.print("PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1
