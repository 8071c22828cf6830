"""``flarc generate``: text from rank buckets (or one KV-cache model) with a shared KV cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from flarc.cli.args import ModelArgs
from flarc.cli.command import Command
from flarc.core.errors import DataError, FlarcError

SCHEDULE_HELP = (
    "which bucket decodes each step: 'static:B'; 'steps:1.0@0,0.8@32,0.6@96' (bucket by index "
    "of the generated token, budgets non-increasing); 'entropy:LOW:HIGH' (next step's bucket "
    "from the entropy H in nats of the current next-token distribution: H<=LOW smallest, "
    "H>=HIGH largest, between the smallest bucket >= linear interpolation); 'entropy:MEAN' "
    "(the two buckets around mean budget MEAN, the larger after the most uncertain steps, the "
    "running mean held at MEAN). Default: the largest bucket"
)


def load_tokenizer(path: str | None):
    """A local Hugging Face tokenizer (:func:`flarc.calib.data.load_tokenizer`), or None without
    a path."""
    from flarc.calib.data import load_tokenizer as load

    return None if path is None else load(path)


class Generate(Command):
    """``flarc generate``: decode a prompt over a bucket folder (``--schedule`` picks each step's
    bucket) or a plain KV-cache model, streaming the text or printing JSON."""

    name = "generate"
    help = "generate text over rank buckets with a shared KV cache"
    groups = (ModelArgs("a bucket folder (flarc export buckets) or a plain KV-cache .onnx"),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt", help="prompt text (needs --tokenizer)")
        src.add_argument("--prompt-ids", metavar="IDS", help="prompt as comma-separated token ids")
        parser.add_argument(
            "--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder"
        )
        parser.add_argument(
            "--max-new-tokens", type=int, default=64, help="tokens to generate (64)"
        )
        parser.add_argument("--schedule", help=SCHEDULE_HELP)
        parser.add_argument(
            "--sample", action="store_true", help="sample instead of greedy decoding"
        )
        parser.add_argument(
            "--temperature", type=float, default=1.0, help="sampling temperature (1.0)"
        )
        parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
        parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
        parser.add_argument(
            "--backend",
            choices=("ort-cpu", "tensorrt"),
            default="ort-cpu",
            help="onnxruntime CPU with weights shared by all buckets, or one TensorRT engine per "
            "bucket (needs tensorrt and an NVIDIA GPU)",
        )
        parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
        parser.add_argument(
            "--prepack",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="give each bucket's session its own prepacked weights (faster decode, one copy "
            "per bucket) instead of weights shared by all buckets; default: prepack when the "
            "schedule uses a single bucket",
        )
        parser.add_argument(
            "--no-verify", action="store_true", help="skip hashing the bucket files"
        )
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        parser.set_defaults(global_threads=False)  # own_process sets it
        parser.add_argument(
            "--compare-dense",
            nargs="?",
            const="",
            metavar="ONNX",
            help="also decode the same prompt with the dense model (the folder's 1.0 bucket, "
            "else its source model, else ONNX) and report its tokens/s and the token agreement",
        )

    def own_process(self, args: argparse.Namespace) -> None:
        """One onnxruntime thread pool for every session of this process: a schedule that
        switches buckets does not run against the spinning threads of the session it left
        (1.2x on Qwen2.5-0.5B's entropy schedule, 2 cores). Every session then must use it."""
        import onnxruntime as ort

        try:
            ort.set_global_thread_pool_sizes(args.threads or 0, 1)
        except Exception as exc:  # onnxruntime's own type: made by an earlier call of main
            if "already been created" not in str(exc):
                raise
        args.global_threads = True

    def run(self, args: argparse.Namespace) -> int:
        import numpy as np

        from flarc.export.runtime import Generator

        tok = load_tokenizer(args.tokenizer)
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
            gen = Generator.from_onnx(path, args.threads, args.global_threads)
        else:
            from flarc.export.manifest import load_manifest
            from flarc.export.schedule import parse_schedule

            available = load_manifest(path, verify=False).budgets
            schedule = args.schedule or f"static:{max(available):g}"
            gen = Generator.from_buckets(
                path,
                args.backend,
                budgets=list(parse_schedule(schedule, available).used),  # only what it picks
                threads=args.threads,
                verify=not args.no_verify,
                prepack=args.prepack,
                global_threads=args.global_threads,
            )
        eos = getattr(tok, "eos_token_id", None) if tok is not None else None
        shown = {"text": ""}
        generated: list[int] = []

        def on_token(token: int) -> None:
            generated.append(token)
            if args.json:
                return
            if tok is None:
                sys.stdout.write(f"{token} ")
            else:  # decode the whole continuation: a token may complete a character
                text = tok.decode(generated, skip_special_tokens=True)
                sys.stdout.write(text[len(shown["text"]) :])
                shown["text"] = text
            sys.stdout.flush()

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
        dense = None
        if args.compare_dense is not None:
            dense = _dense_run(gen, path, args, prompt, eos)
            dense.update(agreement(result.tokens, dense["tokens"]))
        if args.json:
            data = {
                "prompt_ids": result.prompt,
                "tokens": result.tokens,
                "text": tok.decode(result.tokens) if tok is not None else None,
                "budgets": result.budgets,
                "mean_budget": result.mean_budget,
                "tokens_per_s": result.tokens_per_s,
                "prefill_s": result.prefill_s,
            }
            if dense is not None:
                data["dense"] = dense
            sys.stdout.write(json.dumps(data) + "\n")
            return 0
        counts = {b: result.budgets.count(b) for b in sorted(set(result.budgets), reverse=True)}
        used = ", ".join(f"{b:g}x{n}" for b, n in counts.items())
        sys.stdout.write("\n")
        Console(stderr=True).print(
            f"[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s after a "
            f"{result.prefill_s * 1e3:.0f} ms prefill; buckets {used}; mean budget "
            f"{np.mean(result.budgets):.3f}]",
            markup=False,
        )
        if dense is not None:
            first = dense["first_divergence"]
            Console(stderr=True).print(
                f"[dense: {dense['tokens_per_s']:.1f} tokens/s; agreement "
                f"{dense['agreement']:.1%} of {dense['compared']} tokens; "
                + ("identical]" if first is None else f"first divergence at token {first}]"),
                markup=False,
            )
        return 0


def _dense_run(gen, path: Path, args: argparse.Namespace, prompt: list[int], eos) -> dict:
    """The same prompt and decoding with the dense model, and how far the tokens agree."""
    from flarc.export.runtime import Generator

    if args.compare_dense:
        dense_gen = Generator.from_onnx(args.compare_dense, args.threads, args.global_threads)
        schedule = None
    elif gen.manifest is not None and 1.0 in gen.manifest.budgets:
        dense_gen = Generator.from_buckets(
            path,
            budgets=[1.0],
            threads=args.threads,
            verify=False,
            global_threads=args.global_threads,
        )
        schedule = "static:1"
    else:
        source = (gen.manifest.data.get("source", {}) if gen.manifest else {}).get("model")
        if not source or not Path(source).is_file():
            raise FlarcError(
                f"{path}: no 1.0 bucket and no source model to compare with; give "
                "--compare-dense ONNX"
            )
        dense_gen = Generator.from_onnx(source, args.threads, args.global_threads)
        schedule = None
    ref = dense_gen.generate(
        prompt,
        args.max_new_tokens,
        schedule,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos,
    )
    return {"tokens": ref.tokens, "tokens_per_s": ref.tokens_per_s}


def agreement(tokens: list[int], dense: list[int]) -> dict:
    """How far ``tokens`` follow the dense continuation: the share of equal positions over the
    shorter length, and the first position that differs (None when none does)."""
    n = min(len(tokens), len(dense))
    same = [a == b for a, b in zip(tokens[:n], dense[:n], strict=True)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(tokens) != len(dense):
        first = n
    return {"compared": n, "agreement": sum(same) / n if n else 1.0, "first_divergence": first}
