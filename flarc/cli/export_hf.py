"""``flarc export-hf``: a local Hugging Face causal LM to ONNX with a KV cache (optimum layout)."""

from __future__ import annotations

import argparse
import time

from flarc.cli.args import ModelArgs, OutputArgs
from flarc.cli.command import Command
from flarc.cli.display import console


class ExportHf(Command):
    """``flarc export-hf``: a local Hugging Face causal LM to ONNX with a KV cache, its logits
    checked against torch unless ``--no-check``."""

    name = "export-hf"
    help = "export a local Hugging Face causal LM to ONNX with a KV cache (optimum layout)"
    groups = (
        ModelArgs("a local Hugging Face model folder (no hub access)", name="model_dir"),
        OutputArgs("the ONNX model to write"),
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--external-data",
            action="store_true",
            help="always write weights to <output>.data (default: only for large models)",
        )
        parser.add_argument(
            "--no-check", action="store_true", help="skip the logits check against torch"
        )

    def run(self, args: argparse.Namespace) -> int:
        from flarc.export.hf import export_hf

        t0 = time.perf_counter()
        summary = export_hf(
            args.model_dir,
            args.output,
            check=not args.no_check,
            # No flag: external data exactly when the model is large (over protobuf's limit).
            external_data=True if args.external_data else None,
        )
        err = summary.get("max_abs_logits_error")
        check = f", max |logits - torch| {err:.2e}" if err is not None else ""
        console().print(
            f"wrote {', '.join(summary['files'])} ({summary['parameters']:,} parameters, "
            f"{summary['num_layers']} layers{check}) in {time.perf_counter() - t0:.1f} s"
        )
        return 0
