"""Command line of export/: ``flarc export-hf``, ``flarc export buckets`` and ``flarc generate``.

The main CLI owns the parser; it calls :func:`register` with its top-level subparsers and
:func:`register_buckets` with the subparsers of its ``export`` group. Every handler is
``func(args) -> int`` and raises FlarcError for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flarc.core.errors import DataError, FlarcError

BUDGETS_HELP = (
    "comma-separated bucket budgets in (0, 1] (1.0,0.8,0.6,0.4). Budget b gives the bucket a "
    "total rank of b * sum over targets of min(n, m), shared out in proportion to each target's "
    "Fisher importance, clipped to [align, min(n, m)] (surplus redistributed) and rounded to "
    "--align; 1.0 is full rank, i.e. the dense model up to float rounding"
)
SCHEDULE_HELP = (
    "which bucket decodes each step: 'static:B'; 'steps:1.0@0,0.8@32,0.6@96' (bucket by index "
    "of the generated token, budgets non-increasing); 'entropy:LOW:HIGH' (next step's bucket "
    "from the entropy H in nats of the current next-token distribution: H<=LOW smallest, "
    "H>=HIGH largest, between the smallest bucket >= linear interpolation). Default: the "
    "largest bucket"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the top-level ``export-hf`` and ``generate`` commands."""
    p = subparsers.add_parser(
        "export-hf",
        help="export a local Hugging Face causal LM to ONNX with a KV cache (optimum layout)",
    )
    p.add_argument("model_dir", help="a local Hugging Face model folder (no hub access)")
    p.add_argument("-o", "--output", required=True, help="the ONNX model to write")
    p.add_argument(
        "--external-data",
        action="store_true",
        help="always write weights to <output>.data (default: only for large models)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the logits check against torch")
    p.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser(
        "generate", help="generate text over rank buckets with a shared KV cache"
    )
    p.add_argument("model", help="a bucket folder (flarc export buckets) or a plain KV-cache .onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    src.add_argument("--prompt-ids", metavar="IDS", help="prompt as comma-separated token ids")
    p.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    p.add_argument("--schedule", help=SCHEDULE_HELP)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument(
        "--backend",
        choices=("ort-cpu", "tensorrt"),
        default="ort-cpu",
        help="onnxruntime CPU with weights shared by all buckets, or one TensorRT engine per "
        "bucket (needs tensorrt and an NVIDIA GPU)",
    )
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="skip hashing the bucket files")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)


def register_buckets(export_subparsers: argparse._SubParsersAction) -> None:
    """Add ``buckets`` under the main CLI's ``export`` group."""
    p = export_subparsers.add_parser(
        "buckets",
        help="rank buckets for progressive decoding: one analysis, weights stored once",
    )
    p.add_argument("model", help="a KV-cache language model (.onnx, e.g. from flarc export-hf)")
    p.add_argument("-o", "--output", required=True, help="the bucket folder to write")
    p.add_argument("--budgets", default="1.0,0.8,0.6,0.4", help=BUDGETS_HELP)
    p.add_argument("--align", type=int, default=8, help="ranks are multiples of this (8)")
    g = p.add_argument_group("calibration data (token batches; the KV cache starts empty)")
    g.add_argument("--calib", metavar="DATA", help=".npz or folder with input_ids/attention_mask")
    g.add_argument("--text", metavar="FILE", help="a text file, tokenized with --tokenizer")
    g.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for --text (128)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per batch (4)")
    g.add_argument("--max-batches", type=int, default=16, help="use at most this many (16)")
    g.add_argument("--mask-input", metavar="NAME", help="attention mask input (attention_mask)")
    g.add_argument(
        "--fisher-loss", default="lm", help="loss for the Fisher importance (lm: next token)"
    )
    g.add_argument("--include", metavar="REGEX", help="only targets whose node name matches")
    g.add_argument("--exclude", metavar="REGEX", help="skip targets whose node name matches")
    p.set_defaults(func=cmd_buckets)


def cmd_export_hf(args: argparse.Namespace) -> int:
    from flarc.export.hf import export_hf

    t0 = time.perf_counter()
    summary = export_hf(
        args.model_dir,
        args.output,
        check=not args.no_check,
        # No flag: None, i.e. external data exactly when the model is large (a >2 GB model
        # cannot be written as one protobuf); False here used to force it inline.
        external_data=True if args.external_data else None,
    )
    err = summary.get("max_abs_logits_error")
    check = f", max |logits - torch| {err:.2e}" if err is not None else ""
    print(
        f"wrote {', '.join(summary['files'])} ({summary['parameters']:,} parameters, "
        f"{summary['num_layers']} layers{check}) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _token_data(args: argparse.Namespace, model):
    from flarc.calib.data import CalibrationSet, load_calibration, load_text_lines, tokenize
    from flarc.core.inputs import model_inputs

    specs = [s for s in model_inputs(model) if not s.name.startswith("past_key_values.")]
    if bool(args.calib) == bool(args.text):
        raise DataError("give exactly one of --calib or --text (with --tokenizer)")
    if args.text:
        if not args.tokenizer:
            raise DataError("--text needs --tokenizer DIR")
        feeds = tokenize(
            load_text_lines(Path(args.text)), args.tokenizer, specs, args.seq_len, args.batch_size
        )
        return load_calibration(feeds[: args.max_batches], specs, holdout=0.0)
    data = load_calibration(args.calib, specs, args.batch_size, 0.0, args.max_batches)
    return CalibrationSet(data.calibration, [], data.source)


def cmd_buckets(args: argparse.Namespace) -> int:
    from flarc import __version__
    from flarc.core.files import file_sha256
    from flarc.core.modelio import load_model
    from flarc.core.progress import RichProgress
    from flarc.core.targets import find_targets, require_targets
    from flarc.export.buckets import build_buckets, parse_budgets
    from flarc.pipeline import AnalysisOptions

    budgets = parse_budgets(args.budgets)
    out = Path(args.output)
    if out.resolve() == Path(args.model).resolve():
        raise FlarcError(f"{out}: output is the input model")
    t0 = time.perf_counter()
    model = load_model(args.model)
    targets = find_targets(model, args.include, args.exclude)
    require_targets(targets, args.model)
    data = _token_data(args, model)
    provenance = {
        "source": {"model": str(args.model), "sha256": file_sha256(args.model)},
        "options": {
            "calibration": data.source if args.calib else str(args.text),
            "tokenizer": args.tokenizer,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "include": args.include,
            "exclude": args.exclude,
            "fisher_loss": args.fisher_loss,
            "flarc_version": __version__,
        },
    }
    result = build_buckets(
        model,
        targets,
        data,
        budgets,
        out,
        args.align,
        analysis_options=AnalysisOptions(mask_input=args.mask_input, full_rank=True),
        fisher_loss=args.fisher_loss,
        provenance=provenance,
        progress=RichProgress(),
    )
    rows = result.manifest.data["buckets"]
    print(f"{'budget':>7} {'total rank':>11} {'params':>14} {'weights MB':>11}  file")
    for r in rows:
        print(
            f"{r['budget']:>7g} {r['total_rank']:>11} {r['params']:>14,} "
            f"{r['weight_bytes'] / 1e6:>11.1f}  {r['file']}"
        )
    size = sum(e["bytes"] for e in result.manifest.data["files"].values())
    print(f"wrote {out} ({size / 1e6:.1f} MB on disk) in {time.perf_counter() - t0:.1f} s")
    return 0


def _tokenizer(path: str | None):
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("--tokenizer needs the 'transformers' package") from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a tokenizer folder ({exc})") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from flarc.export.runtime import Generator

    tok = _tokenizer(args.tokenizer)
    if args.prompt is not None:
        if tok is None:
            raise DataError("--prompt needs --tokenizer DIR (or give --prompt-ids)")
        prompt = [int(x) for x in tok(args.prompt)["input_ids"]]
    else:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise DataError(f"--prompt-ids '{args.prompt_ids}': expected integers") from None
    path = Path(args.model)
    if path.is_file():
        if args.backend != "ort-cpu":
            raise FlarcError("--backend tensorrt works on bucket folders")
        gen = Generator.from_onnx(path, args.threads)
    else:
        gen = Generator.from_buckets(
            path, args.backend, threads=args.threads, verify=not args.no_verify
        )
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    shown = {"text": ""}

    def stream(tokens: list[int]) -> None:
        if args.json:
            return
        if tok is None:
            sys.stdout.write(f"{tokens[-1]} ")
        else:
            text = tok.decode(tokens, skip_special_tokens=True)
            sys.stdout.write(text[len(shown["text"]) :])
            shown["text"] = text
        sys.stdout.flush()

    generated: list[int] = []

    def on_token(token: int) -> None:
        generated.append(token)
        stream(generated)

    if not args.json and args.prompt is not None:
        sys.stdout.write(args.prompt)
    result = gen.generate(
        prompt,
        args.max_new_tokens,
        args.schedule,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos,
        on_token=on_token,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_ids": result.prompt,
                    "tokens": result.tokens,
                    "text": tok.decode(result.tokens) if tok is not None else None,
                    "budgets": result.budgets,
                    "mean_budget": result.mean_budget,
                    "tokens_per_s": result.tokens_per_s,
                    "prefill_s": result.prefill_s,
                }
            )
        )
        return 0
    counts = {b: result.budgets.count(b) for b in sorted(set(result.budgets), reverse=True)}
    used = ", ".join(f"{b:g}x{n}" for b, n in counts.items())
    rate = result.tokens_per_s
    print(
        f"\n[{len(result.tokens)} tokens, {rate:.1f} tokens/s after a {result.prefill_s * 1e3:.0f} "
        f"ms prefill; buckets {used}; mean budget {np.mean(result.budgets):.3f}]",
        file=sys.stderr,
    )
    return 0
