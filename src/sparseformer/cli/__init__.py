"""The ``sparseformer`` command line: argparse sub-commands that call library functions.

Each sub-command lives in its own module with ``register(subparsers)``; the module imports its
heavy dependencies inside the handler so that ``sparseformer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "COMMANDS"]

# module name under sparseformer.cli, in the order --help lists them
COMMANDS = (
    *("models", "info", "convert", "train", "eval", "predict"),
    *("demo", "bench", "viz", "export"),
)


class CliError(Exception):
    """An error to show the user as one line (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseformer",
        description="SparseFormer (ICLR 2024): models, weights, training and tools.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sparseformer.cli.{name}").register(sub)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    from sparseformer.convert import CheckpointError
    from sparseformer.factory import UnknownModelError
    from sparseformer.hub import DownloadError

    try:
        return int(args.func(args) or 0)
    except (CliError, CheckpointError, UnknownModelError, DownloadError, OSError) as exc:
        print(f"sparseformer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:  # bad values met late: one line; -v for the trace
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"sparseformer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparseformer {args.command}: interrupted", file=sys.stderr)
        return 130
