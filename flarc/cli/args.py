"""Argument groups shared by the commands (polygraphy's pattern): each group adds its flags to a
parser and turns the parsed values into what the Python API takes, so a flag means the same in
every command that has it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import onnx

from flarc.calib.data import HOLDOUT
from flarc.calib.statistics import PRECISION
from flarc.core.errors import DataError, OptionError

log = logging.getLogger(__name__)

RATIO_HELP = (
    "keep a fraction R of each target's parameters (SVD-LLM's convention: rank k with "
    "k(n+m) ~ R*n*m, rounded up to --align; 0.8 removes about 20%%). Default when no rank "
    "option is given: 0.8"
)

LATENCY_HELP = (
    "a 'flarc latency profile' file, or a backend to profile on the fly (ort-cpu, torch-cuda, "
    "tensorrt): ranks predicted slower than the dense layer are rejected, and the end-to-end "
    "speedup is measured"
)
CLOSED_LOOP_HELP = (
    "refactorize targets level by level on the activations of the partly compressed model "
    "(ranks chosen first), so later layers correct for earlier errors"
)
PRESET_HELP = (
    "best (default): with the default rank rule, the chosen ranks are refitted closed loop with "
    "error compensation (as --compensate); fast: open loop, 1.2x (Qwen2.5-0.5B) to 2.3x "
    "(MiniLM) quicker, at a quality cost on language models (README). --closed-loop, "
    "--compensate or another rank rule override it"
)
COMPENSATE_HELP = (
    "closed loop with error compensation: each target reproduces the original layer's output "
    "from the compressed activations (implies --closed-loop)"
)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got '{text}'")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'")
    return value


class ArgGroup:
    """A set of flags: ``add`` puts them on a parser, ``parse`` reads them back."""

    title = ""

    def add(self, parser: argparse.ArgumentParser) -> None:
        """Add this group's flags to ``parser``."""
        self.add_to(parser.add_argument_group(self.title) if self.title else parser)

    def add_to(self, group: Any) -> None:
        """Add the flags to an argparse group (or parser)."""
        raise NotImplementedError

    def parse(self, args: argparse.Namespace, *rest: Any) -> Any:
        """What the Python API takes, from the parsed flags."""
        raise NotImplementedError


class ModelArgs(ArgGroup):
    """The positional input a command works on (a model, by default)."""

    def __init__(self, help: str = "the ONNX model", name: str = "model") -> None:
        self.help = help
        self.name = name

    def add_to(self, g) -> None:
        g.add_argument(self.name, help=self.help)

    def parse(self, args: argparse.Namespace) -> str:
        """The path as given."""
        return getattr(args, self.name)


class OutputArgs(ArgGroup):
    """``-o/--output``: what a command writes."""

    def __init__(self, help: str, required: bool = True) -> None:
        self.help = help
        self.required = required

    def add_to(self, g) -> None:
        g.add_argument("-o", "--output", required=self.required, default=None, help=self.help)

    def parse(self, args: argparse.Namespace) -> str | None:
        """The path as given (None when optional and absent)."""
        return args.output


class TargetArgs(ArgGroup):
    """``--include`` / ``--exclude``: which nodes are targets."""

    def add_to(self, g) -> None:
        g.add_argument("--include", metavar="REGEX", help="only targets whose node name matches")
        g.add_argument("--exclude", metavar="REGEX", help="skip targets whose node name matches")

    def parse(self, args: argparse.Namespace, model: onnx.ModelProto, path: str):
        """The model's targets (one-line error when there is none)."""
        from flarc.core.targets import find_targets, require_targets

        targets = find_targets(model, args.include, args.exclude)
        require_targets(targets, path)
        return targets


class ShapeArgs(ArgGroup):
    """``--shape NAME:DIMS``: input shapes, for synthetic data, latency and engines."""

    def __init__(self, help: str = "input shape such as input_ids:1x128 (repeatable)") -> None:
        self.help = help

    def add_to(self, g) -> None:
        g.add_argument(
            "--shape",
            action="extend",
            nargs="+",
            default=[],
            metavar="NAME:DIMS",
            help=self.help,
        )

    def parse(self, args: argparse.Namespace) -> dict[str, list[int]]:
        """``["input_ids:1x128"]`` -> ``{"input_ids": [1, 128]}`` (``1,128`` works too)."""
        shapes: dict[str, list[int]] = {}
        for item in args.shape or []:
            name, sep, dims = item.rpartition(":")
            try:
                values = [int(d) for d in dims.lower().replace(",", "x").split("x") if d]
            except ValueError:
                values = []
            if not sep or not name or not values or any(v < 1 for v in values):
                raise DataError(f"--shape '{item}': expected NAME:DIMS such as input_ids:1x128")
            shapes[name] = values
        return shapes


class CalibrationArgs(ArgGroup):
    """Where calibration batches come from, how they are batched and what is held out."""

    title = "calibration data"

    def __init__(self, synthetic: bool = True) -> None:
        self.synthetic = synthetic
        self.shapes = ShapeArgs("input shape for --synthetic, e.g. x:1x3x224x224 (repeatable)")

    def add_to(self, g) -> None:
        g.add_argument(
            "--calib",
            metavar="DATA",
            help="a .npz (arrays keyed by input name, first axis = samples), a folder of them, "
            "or a data loader script 'file.py:function' yielding feed dicts (user code: it is "
            "executed)",
        )
        g.add_argument("--text", metavar="FILE", help="a text file, tokenized with --tokenizer")
        g.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder")
        g.add_argument(
            "--seq-len", type=positive_int, default=128, help="tokens per sequence for --text (128)"
        )
        g.add_argument(
            "--pack",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="--text as one document (line breaks kept) tokenized into one stream and cut into "
            "--seq-len windows (no padding) instead of one sequence per line; default: packed for "
            "KV-cache decoders (causal language models), one per line otherwise",
        )
        if self.synthetic:
            g.add_argument(
                "--synthetic",
                type=positive_int,
                metavar="N",
                help="N random batches from the declared shapes",
            )
            self.shapes.add_to(g)
        g.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch (8)")
        g.add_argument("--max-batches", type=positive_int, help="use at most this many batches")
        g.add_argument(
            "--holdout",
            type=float,
            default=HOLDOUT,
            help=f"fraction of batches held out for validation ({HOLDOUT}; at least one of two)",
        )
        g.add_argument(
            "--mask-input",
            metavar="NAME",
            help="attention mask input (default: found by name 'attention_mask')",
        )

    @staticmethod
    def given(args: argparse.Namespace) -> bool:
        """Whether any calibration source was given."""
        return any(getattr(args, k, None) for k in ("calib", "text", "synthetic"))

    def parse(self, args: argparse.Namespace, model: onnx.ModelProto, tokens_only: bool = False):
        """The checked calibration set; ``tokens_only`` leaves KV-cache inputs to the caller."""
        from flarc.calib.data import (
            CalibrationSet,
            check_feed,
            load_calibration,
            load_text_lines,
            read_text_file,
            split_holdout,
            synthetic_feeds,
            tokenize,
        )
        from flarc.core.inputs import is_past, model_inputs

        specs = model_inputs(model)
        decoder = any(is_past(s) for s in specs)
        if tokens_only:
            specs = [s for s in specs if not is_past(s)]
        synthetic = getattr(args, "synthetic", None)
        if len([x for x in (args.calib, args.text, synthetic) if x]) != 1:
            what = "--calib, --text (with --tokenizer)" + (
                " or --synthetic N" if self.synthetic else ""
            )
            raise DataError(f"give exactly one of {what}")
        if args.text:
            if not args.tokenizer:
                raise DataError("--text needs --tokenizer DIR")
            pack = decoder if getattr(args, "pack", None) is None else args.pack
            # Packed, the file is one document: its line breaks are tokens the model must see.
            texts = [read_text_file(Path(args.text))] if pack else load_text_lines(Path(args.text))
            # Counted in --batch-size batches, as for --calib, whatever batch the model takes.
            limit = args.max_batches * args.batch_size if args.max_batches else None
            feeds = tokenize(
                texts, args.tokenizer, specs, args.seq_len, args.batch_size, pack, limit,
                args.holdout,
            )  # fmt: skip
            return load_calibration(feeds, specs, holdout=args.holdout)
        if synthetic:
            shapes = {k: tuple(v) for k, v in self.shapes.parse(args).items()}
            feeds = [
                check_feed(feed, specs, f"--synthetic batch {i}")
                for i, feed in enumerate(synthetic_feeds(specs, synthetic, shapes))
            ]
            calib, held = split_holdout(feeds, args.holdout)
            return CalibrationSet(calib, held, "synthetic")
        return load_calibration(args.calib, specs, args.batch_size, args.holdout, args.max_batches)


class CheckpointArgs(ArgGroup):
    """``--checkpoint DIR --resume``: calibration sums saved as they grow, resumed bit for bit."""

    title = "checkpoints"

    def add_to(self, g) -> None:
        g.add_argument(
            "--checkpoint",
            metavar="DIR",
            help="save the running calibration sums in DIR every --checkpoint-every batches",
        )
        g.add_argument(
            "--checkpoint-every",
            type=int,
            default=8,
            metavar="N",
            help="batches per checkpoint (8; a save waits for the end of the shard, up to 8 "
            "consecutive batches whose products are stacked)",
        )
        g.add_argument(
            "--resume",
            action="store_true",
            help="continue from the checkpoint in --checkpoint DIR (same model, options and "
            "data); the statistics are bit-identical to an uninterrupted run",
        )

    def parse(self, args: argparse.Namespace) -> dict:
        """Keyword arguments of :func:`flarc.pipeline.analyze`."""
        return {
            "checkpoint": args.checkpoint,
            "resume": args.resume,
            "checkpoint_every": args.checkpoint_every,
        }


class ComputeArgs(ArgGroup):
    """``--executor``, ``--ray-address``, ``--workers``, ``--device``: where the heavy work runs
    (the results are the same everywhere)."""

    title = "compute"

    def add_to(self, g) -> None:
        g.add_argument(
            "--executor",
            choices=("local", "ray"),
            default="local",
            help="where calibration shards and per-target factorizations run: local (this "
            "process) or ray (a local Ray cluster, or the one at --ray-address; pip install ray). "
            "Same statistics and spectra bit for bit",
        )
        g.add_argument(
            "--ray-address",
            metavar="ADDR",
            help="join a running Ray cluster (e.g. ray://head:10001 or auto) with --executor ray",
        )
        g.add_argument(
            "--workers",
            type=positive_int,
            metavar="N",
            help="jobs at once (default: every CPU here, or of the Ray cluster)",
        )
        g.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="device of the whitening and SVD math (torch, float64): auto = cuda when torch "
            "sees a GPU, else cpu (numpy/LAPACK)",
        )

    def parse(self, args: argparse.Namespace):
        """A :class:`flarc.core.executor.Compute` (its executor started: close it when done)."""
        from flarc.core.executor import Compute, make_executor, resolve_device

        device = resolve_device(args.device)
        return Compute(make_executor(args.executor, args.ray_address, args.workers), device)


class FisherLossArgs(ArgGroup):
    """``--fisher-loss``: the loss Fisher importances are taken on."""

    def add_to(self, g) -> None:
        g.add_argument(
            "--fisher-loss",
            choices=("auto", "lm", "sampled", "projection"),
            default="auto",
            help="loss of the Fisher gradients: lm = next-token cross-entropy (logits [B,S,V] and "
            "input_ids; padding excluded); sampled = cross-entropy against labels sampled from "
            "the model's own output distribution (classifiers); projection = 0.5 ||R^T y||^2 with "
            "a seeded random Gaussian R (embeddings and anything else); auto picks lm, then "
            "sampled, then projection",
        )

    def parse(self, args: argparse.Namespace) -> str:
        """The loss name."""
        return args.fisher_loss


class WhiteningArgs(ArgGroup):
    """Shrinkage and whitening of the input statistics: the analysis options."""

    title = "whitening"

    def add_to(self, g) -> None:
        from flarc.rewrite.analysis import SENSITIVITY_BATCHES

        g.add_argument(
            "--shrinkage",
            choices=("ledoit-wolf", "oas", "none"),
            default="ledoit-wolf",
            help="shrinkage of the input statistic (ledoit-wolf)",
        )
        g.add_argument(
            "--shrinkage-lambda",
            type=float,
            metavar="X",
            help="fix the shrinkage intensity at X in [0, 1] instead of estimating it",
        )
        g.add_argument(
            "--centered",
            action="store_true",
            help="centre the statistic before shrinking (FLAR-SVD paper); default uncentred, "
            "which matches the output-error objective",
        )
        g.add_argument(
            "--whiten",
            choices=("cholesky", "eig", "diag", "none"),
            default="cholesky",
            help="whitening factor: cholesky (default; falls back to eig with a warning), eig; "
            "baselines: diag (ASVD-style per-channel RMS scaling), none (plain SVD of the weight)",
        )
        g.add_argument(
            "--stats-precision",
            choices=("float64", "float32"),
            default=PRECISION,
            help="the type of the input rows whose products make each statistic; shards of "
            f"rows are added in float64 either way ({PRECISION})",
        )
        g.add_argument(
            "--sensitivity-batches",
            type=int,
            default=SENSITIVITY_BATCHES,
            metavar="N",
            help="calibration batches of the one backward pass that gives the K-FAC loss "
            f"sensitivities the default rule weighs targets by ({SENSITIVITY_BATCHES}; 0 = none)",
        )
        g.add_argument(
            "--output-shrinkage",
            type=unit_interval,
            metavar="A",
            help="shrink the per-output-channel loss weights D of two-sided whitening toward "
            "their mean, (1 - A) D + A mean(D), by A instead of each target's Ledoit-Wolf "
            "intensity (0 = D as estimated, 1 = one weight per target)",
        )

    def parse(self, args: argparse.Namespace, fisher: str | None = None):
        """:class:`AnalysisOptions` (``fisher``: the loss to take importances on, if any)."""
        from flarc.rewrite.analysis import AnalysisOptions

        return AnalysisOptions(
            shrinkage=args.shrinkage,
            centered=args.centered,
            shrinkage_lambda=args.shrinkage_lambda,
            whiten=args.whiten,
            precision=args.stats_precision,
            mask_input=getattr(args, "mask_input", None),
            fisher=fisher,
            sensitivity=RankArgs.needs_sensitivity(args),
            sensitivity_batches=args.sensitivity_batches,
            output_shrinkage=args.output_shrinkage,
        )


RANK_FLAGS = (
    "ratio",
    "energy",
    "align",
    "search",
    "criterion",
    "allocate",
    "budget",
    "fisher_weighted",
    "output_weighted",
    "kfac_weighted",
    "output_batches",
    "output_metric",
)


class RankArgs(ArgGroup):
    """How ranks are chosen: a rule per target, a search, or an allocation under a budget."""

    title = "ranks"

    def add_to(self, g) -> None:
        x = g.add_mutually_exclusive_group()
        x.add_argument("--ratio", type=float, metavar="R", help=RATIO_HELP)
        x.add_argument(
            "--energy",
            type=float,
            metavar="E",
            help="smallest rank keeping a fraction E of the whitened energy",
        )
        g.add_argument(
            "--align", type=positive_int, default=8, help="ranks are multiples of this (8)"
        )
        g.add_argument(
            "--search",
            choices=("bisect",),
            help="per-layer bisection (FLAR-SVD) over aligned ranks below k_equiv",
        )
        g.add_argument(
            "--criterion",
            choices=("whitened", "cosine", "output"),
            default="whitened",
            help="bisection criterion: whitened = closed-form relative output error of the layer "
            "(<= T); cosine = weight cosine similarity (>= T); output = normalised error of the "
            "model's final outputs with only that layer factorized (<= T; one onnxruntime "
            "session serves all candidates)",
        )
        g.add_argument(
            "--threshold",
            metavar="T",
            help="criterion threshold (defaults: whitened 0.05, cosine 0.95, output 1e-3), or "
            "'auto' with --criterion output: FLAR-SVD's end-output error of the uniform model at "
            "the budget divided by the number of targets, then all ranks rescaled to land on the "
            "budget",
        )
        g.add_argument(
            "--output-batches",
            type=positive_int,
            default=2,
            help="calibration batches the output criterion runs on (2)",
        )
        g.add_argument(
            "--output-metric",
            choices=("mse", "kl"),
            default="mse",
            help="end-output error of the output criterion and --output-weighted: mse = squared "
            "error of all float outputs over their energy; kl = mean KL divergence of the softmax "
            "of the outputs named *logits* from the original's (language models, classifiers)",
        )
        g.add_argument(
            "--allocate",
            choices=("fisher", "global"),
            help="fisher: ranks proportional to the Fisher importance alpha = sum_b sum (G_b * "
            "W)^2 under --budget (FLRC); global: minimise the total whitened error under "
            "--budget (or --latency-budget)",
        )
        g.add_argument(
            "--budget",
            type=float,
            metavar="P",
            help="fraction of the targets' parameters kept (0.8 = 20%% fewer); without --ratio, "
            "--energy, --search or --allocate this is the default rule: the global allocation "
            "weighted by each target's K-FAC loss sensitivity (one backward pass), 0.8 when unset",
        )
        g.add_argument(
            "--unweighted",
            dest="kfac_weighted",
            action="store_false",
            help="global: weigh every target's relative whitened error alike (no sensitivities)",
        )
        g.add_argument(
            "--fisher-weighted",
            action="store_true",
            help="global: weight each target's error by its Fisher importance",
        )
        g.add_argument(
            "--output-weighted",
            action="store_true",
            help="global: weight each target's whitened error by its measured end-output "
            "sensitivity (output error over whitened error with only that target at the uniform "
            "rank; one onnxruntime session, one evaluation per target)",
        )
        FisherLossArgs().add_to(g)

    @staticmethod
    def needs_sensitivity(args: argparse.Namespace) -> bool:
        """Whether the rank rule may weigh by K-FAC sensitivities (the default rule and plain
        ``--allocate global``; ``flarc analyze``, which has no rule yet)."""
        explicit = (
            getattr(args, "ratio", None) is not None
            or getattr(args, "energy", None) is not None
            or getattr(args, "search", None)
            or getattr(args, "allocate", None) == "fisher"
            or getattr(args, "fisher_weighted", False)
            or getattr(args, "output_weighted", False)
        )
        return getattr(args, "kfac_weighted", True) and not explicit

    @staticmethod
    def fisher_loss(args: argparse.Namespace) -> str | None:
        """The Fisher loss when the chosen rule needs importances, else None."""
        wanted = (
            getattr(args, "allocate", None) == "fisher"
            or getattr(args, "fisher_weighted", False)
            or getattr(args, "fisher", False)
        )
        return args.fisher_loss if wanted else None

    def parse(self, args: argparse.Namespace):
        """:class:`RankOptions` (without a latency model; see :class:`LatencyArgs`)."""
        from flarc.rewrite.policy import RankOptions

        threshold = args.threshold
        if threshold not in (None, "auto"):
            try:
                threshold = float(threshold)
            except ValueError:
                raise OptionError(
                    f"--threshold '{threshold}': expected a number or 'auto'"
                ) from None
        # Every rank flag is the RankOptions field of the same name.
        values = {name: getattr(args, name) for name in RANK_FLAGS}
        return RankOptions(**values, threshold=threshold)


class LatencyArgs(ArgGroup):
    """Latency-aware ranks and the end-to-end timing of the result."""

    title = "latency"

    def add_to(self, g) -> None:
        g.add_argument("--latency", metavar="JSON|BACKEND", help=LATENCY_HELP)
        g.add_argument(
            "--max-lat-recov",
            type=float,
            default=1.0,
            help="largest accepted t_pair(k) / t_dense (1.0)",
        )
        g.add_argument(
            "--latency-budget",
            type=float,
            metavar="L",
            help="global: predicted time of the targets at most L x their dense time",
        )
        g.add_argument(
            "--latency-backend", default="ort-cpu", help="backend of the end-to-end check (ort-cpu)"
        )
        g.add_argument("--threads", type=positive_int, help="threads for latency measurements")
        g.add_argument(
            "--require-speedup",
            action="store_true",
            help="fail if the compressed model is slower than the original",
        )

    def parse(self, args: argparse.Namespace, options, model, analysis, shapes, progress):
        """``options`` with its latency model (profiled or loaded) and latency limits set."""
        other_rule = (
            args.allocate == "fisher"
            or args.ratio is not None
            or args.energy is not None
            or args.search is not None
        )
        if args.latency_budget is not None and (other_rule or not args.latency):
            raise OptionError(
                "--latency-budget goes with --latency and the global allocation (the default)"
            )
        options.max_lat_recov = args.max_lat_recov
        options.latency_budget = args.latency_budget
        if args.latency:
            from flarc.latency.model import load_latency_model

            options.latency = load_latency_model(
                args.latency,
                model,
                analysis.targets,
                # The shapes the end-to-end check runs at, unless the user names others.
                shapes or {k: list(v.shape) for k, v in analysis.heldout_feeds[0].items()},
                args.threads,
                align=args.align,
                progress=progress,
            )
        return options


VALIDATE_FITS_HELP = (
    "with the compensated closed loop and held-out batches (--holdout), each target keeps its "
    "compensated or its plain closed-loop fit, whichever reproduces the original's layer output "
    "better on the held-out batches: a guard against a calibration set too uniform for "
    "compensation (ViT-S/14 on 8 images, 30%% cut: cosine 0.9854 -> 0.9898); a second SVD per "
    "target (Qwen2.5-0.5B: +31-37 s)"
)


COMPENSATION_FLOOR_HELP = (
    "least shrinkage intensity of a compensated fit, in [0, 1] (0.05): higher trusts the "
    "calibration less. Past a 20%% cut, a calibration set of few images wants more (ViT-S/14 "
    "on crops of 8 images, 30 / 40%% cut: cosine 0.9854 / 0.9780 at 0.05, 0.9903 / 0.9901 at "
    "0.4), diverse data less (all-MiniLM-L6-v2 on 512 sentences, 20 / 30%%: 0.9715 / 0.9537 "
    "at 0.05, 0.9560 / 0.9339 at 0.4)"
)


class ClosedLoopArgs(ArgGroup):
    """``--preset`` / ``--closed-loop`` / ``--compensate`` (``presets=False``: the two flags
    alone, open loop unless given)."""

    title = "closed loop"

    def __init__(self, presets: bool = True) -> None:
        self.presets = presets

    def add_to(self, g) -> None:
        if self.presets:
            g.add_argument("--preset", choices=("best", "fast"), default="best", help=PRESET_HELP)
        g.add_argument("--closed-loop", action="store_true", help=CLOSED_LOOP_HELP)
        g.add_argument("--compensate", action="store_true", help=COMPENSATE_HELP)
        if self.presets:
            g.add_argument("--validate-fits", action="store_true", help=VALIDATE_FITS_HELP)
            g.add_argument(
                "--compensation-floor", type=float, metavar="X", help=COMPENSATION_FLOOR_HELP
            )

    def parse(
        self, args: argparse.Namespace, model: onnx.ModelProto, has_data: bool
    ) -> tuple[bool, bool]:
        """``(closed loop, compensate)``: the explicit flags, else what ``--preset`` gives for
        this model (best: compensated, with the default rank rule, calibration data and no
        subgraph; otherwise open loop, said in the log)."""
        if args.closed_loop or args.compensate:
            if not has_data:
                raise DataError(
                    "--closed-loop needs calibration data (--calib, --text or --synthetic)"
                )
            return True, bool(args.compensate)
        if getattr(args, "preset", "fast") == "fast" or not RankArgs.needs_sensitivity(args):
            return False, False
        from flarc.core.graphs import scopes

        if not has_data:  # a re-rank of a stored analysis: the user chose speed
            log.info("--preset best: open loop, no calibration data with --analysis")
            return False, False
        owner = next((s for s in scopes(model)[1:]), None)
        if owner is not None:
            log.warning(
                "--preset best: open loop, the closed loop does not run models with subgraphs "
                "('%s')",
                "/".join(owner.path),
            )
            return False, False
        return True, True
