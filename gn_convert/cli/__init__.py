"""The ``gn-convert`` command: a thin layer over the Python API.

``gn-convert MODEL [options]`` runs the whole pipeline on a torchvision model (the same as
``gn-convert convert MODEL``); the other stages are subcommands whose names are not model
names (``list``, ``export``, ...). Exit codes: 0 success, 1 a check failed or an unexpected
error, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

from gn_convert._version import __version__
from gn_convert.cli import bench, convert, deploy, export, finetune, listing, native, parity, serve
from gn_convert.cli.console import CONSOLE, ConsoleHandler
from gn_convert.errors import GnConvertError, build_mismatch

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

#: subcommand name -> module with ``add_parser(subparsers)`` and ``run(args) -> int``
COMMANDS: dict[str, ModuleType] = {"convert": convert, "list": listing, "deploy": deploy, "serve": serve,
                                 "export": export, "finetune": finetune, "bench": bench,
                                 "parity": parity, "native": native}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="gn-convert",
        description="Convert a pretrained BatchNorm CNN into a GroupNorm network that keeps its "
        "function, export it to ONNX and check it. `gn-convert MODEL` is `gn-convert convert MODEL`.",
    )
    parser.add_argument("--version", action="version", version=f"gn-convert {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


API_WORDS = re.compile(r'\b(weights|num_classes)=(?:"([^"]*)"|([^\s,;)]+))')
"""An API argument in an error message (``weights="none"``, ``num_classes=N``): the library speaks
the API's words, and the command line says them as its options (``--weights none``)."""


def cli_words(message: str) -> str:
    """``message`` with the API's argument spellings turned into the command's options."""
    return API_WORDS.sub(lambda m: f"--{m[1].replace('_', '-')} {m[2] if m[2] is not None else m[3]}", message)


GLOBAL_FLAGS = re.compile(r"-v+|--verbose")
"""The top-level options that take no value and may precede the command (``-v``, ``-vv``)."""
TOP_LEVEL_EXITS = ("-h", "--help", "--version")


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert ``convert`` unless the command line names a command.

    Top-level flags (``-v``) are skipped; the first other word decides: a command name is kept,
    ``-h``/``--help``/``--version`` are the top-level parser's, and anything else (a model name, or
    an option of the main command such as ``--groups 8``, which takes a value) starts the
    ``convert`` command, so ``gn-convert --groups 8 resnet18`` is ``gn-convert convert --groups 8
    resnet18``.
    """
    for i, arg in enumerate(argv):
        if GLOBAL_FLAGS.fullmatch(arg):
            continue
        if arg in COMMANDS or arg in TOP_LEVEL_EXITS:
            return argv
        return [*argv[:i], "convert", *argv[i:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gn-convert`` console script; returns the exit code."""
    args_list = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[ConsoleHandler(CONSOLE)])
    if not args.verbose:  # the command owns this process: torch's exporter's notices are noise to its users
        warnings.filterwarnings("ignore", module=r"torch\.onnx|onnxscript|torch\._export")
    try:
        return COMMANDS[args.command].run(args)
    except GnConvertError as err:
        print(f"gn-convert: error: {cli_words(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("gn-convert: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`gn-convert list | head`): not a failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # an unexpected failure: say so, with the traceback under -v
        mismatch = build_mismatch(err)
        if mismatch is not None:  # an environment that cannot do the job: one line, exit 2
            print(f"gn-convert: error: {mismatch}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.verbose:
            raise
        print(f"gn-convert: internal error: {type(err).__name__}: {err} (rerun with -v for the "
              "traceback, and please report it)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
