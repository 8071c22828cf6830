"""``flarc``: the command line, a thin layer over the Python API (:mod:`flarc.pipeline` and the
stages). Every command is registered here, in one list; each is assembled from the argument
groups of :mod:`flarc.cli.args`.

Errors: bad input (:class:`flarc.FlarcError`), a file-system failure naming its file, and
onnxruntime refusing a model print one line and exit 2. Anything else is a bug in flarc: one
line saying so and exit 1, or its traceback with ``-v``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flarc.cli.analyze import Analyze
from flarc.cli.command import Command
from flarc.cli.compare import Compare
from flarc.cli.compress import Compress
from flarc.cli.demo import Demo
from flarc.cli.export import EXPORT
from flarc.cli.export_hf import ExportHf
from flarc.cli.generate import Generate
from flarc.cli.inspect_model import Inspect
from flarc.cli.latency import LATENCY
from flarc.core.errors import FlarcError
from flarc.core.version import __version__

COMMANDS: list[Command] = [
    Inspect(),
    Analyze(),
    Compress(),
    Demo(),
    LATENCY,
    Compare(),
    EXPORT,
    ExportHf(),
    Generate(),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``flarc`` parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="flarc",
        description="Low-rank factorization of deployed ONNX models (FLAR-SVD + FLRC).",
    )
    parser.add_argument("--version", action="version", version=f"flarc {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output; tracebacks of bugs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code (0 ok, 1 a bug or a failed check, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    where = getattr(args, "model", None)
    try:
        own = getattr(args, "own_process", None)
        if own is not None:
            own(args)
        return int(args.func(args) or 0)
    except FlarcError as exc:
        print(f"flarc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:  # no file named: not the environment's doing
            return _bug(exc, args.verbose)
        print(f"flarc: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flarc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # onnxruntime refusing to run the model (no kernel for an op or dtype, shapes that do
        # not fit) is bad input, not a flarc bug: one line naming the model.
        if type(exc).__module__.startswith("onnxruntime"):
            prefix = f"{where}: " if where else ""
            print(f"flarc: error: {prefix}onnxruntime: {_one_line(exc)}", file=sys.stderr)
            return 2
        return _bug(exc, args.verbose)


def _bug(exc: BaseException, verbose: int) -> int:
    if verbose:
        raise exc
    print(
        f"flarc: internal error: {type(exc).__name__}: {_one_line(exc)} "
        "(a bug in flarc; run with -v for the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
