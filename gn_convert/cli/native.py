"""``gn-convert native``: build the native GroupNorm kernel library and print its path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gn_convert.native import build_library
from gn_convert.native.build import DEFAULT_MARCH
from gn_convert.native.headers import ENV_VAR


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``native`` command."""
    p = sub.add_parser(
        "native", help="build the native GroupNorm kernel for onnxruntime and print its path",
        description="Compile gn-convert's native CPU kernel for ai.gn_convert::GroupNorm (cached after the "
        "first build) and print the shared library's path, for onnxruntime's "
        "SessionOptions.register_custom_ops_library or Triton's op_library_filename. Needs a C++ compiler "
        f"and onnxruntime's C++ headers: --include, ${ENV_VAR}, the system include folders, or fetched "
        "once from the npm registry.")
    p.add_argument("--include", type=Path, metavar="DIR", help="onnxruntime's include/ folder")
    p.add_argument("--march", default=DEFAULT_MARCH,
                   help="the -march target (default native: this CPU; x86-64-v2 runs on any x86-64 server, x86-64-v3 on AVX2 ones)")
    p.add_argument("--no-fetch", action="store_true", help="never fetch the headers from the npm registry")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")


def run(args: argparse.Namespace) -> int:
    """Build (or find) the library and print its path; 0 on success."""
    print(f"building the native GroupNorm kernel (-march={args.march}; the first build fetches onnxruntime's "
          "headers and compiles, about 30 s; later ones are cached) ...", file=sys.stderr, flush=True)
    print(build_library(args.include, march=args.march, fetch=not args.no_fetch, force=args.force))
    return 0
