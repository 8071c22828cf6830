"""``flarc demo``: the built-in default model (all-MiniLM-L6-v2) compressed with the default
method, and what changed (parameters, embeddings, latency)."""

from __future__ import annotations

import argparse

from flarc.cli.command import Command
from flarc.cli.display import CliProgress, console


class Demo(Command):
    """``flarc demo``: compress all-MiniLM-L6-v2 on English text and show parameters, output errors,
    sentence-embedding cosines and CPU latency before and after."""

    name = "demo"
    help = "compress all-MiniLM-L6-v2 (the built-in default model) and show what changed"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--budget", type=float, default=0.8, help="fraction of the target parameters kept (0.8)"
        )
        parser.add_argument(
            "--out-dir", default=None, help="where to write the models (default: the flarc cache)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from flarc.demo import run_demo
        from flarc.report import comparison_table, rows_table, summary_lines

        con = console()
        con.print(
            "all-MiniLM-L6-v2 on English text of pydoc_data.topics; the default method (--preset "
            "best: global allocation weighted by K-FAC sensitivities, then closed-loop "
            f"compensated factors), keeping {args.budget:.0%} of target parameters"
        )
        demo = run_demo(args.budget, args.out_dir, CliProgress())
        con.print(f"model: {demo.source}")
        con.print(
            f"text: {demo.calibration_sentences} calibration and {demo.heldout_sentences} "
            "held-out sentences"
        )
        con.print(rows_table(demo.result.rows))
        con.print(comparison_table(demo.result))
        for line in summary_lines(demo.result):
            con.print(line)
        cos = demo.cosines
        con.print(
            f"sentence-embedding cosine to the original on {len(cos)} other sentences: "
            f"mean {cos.mean():.4f}, min {cos.min():.4f}"
        )
        for label, (before, after) in demo.latency.items():
            con.print(
                f"onnxruntime CPU latency, {label}: {before * 1e3:.1f} ms -> {after * 1e3:.1f} ms "
                f"({before / after:.2f}x)"
            )
        con.print(f"compressed in {demo.seconds:.1f} s; wrote {demo.output}")
        return 0
