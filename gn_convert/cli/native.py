"""``gn-convert native``: build the native GroupNorm kernel library and print its path; with
``--blocked MODEL``, also write MODEL with its GroupNorms on onnxruntime's blocked layout, for
sessions opened outside gn-convert on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gn_convert.native.build import DEFAULT_MARCH, build_library
from gn_convert.native.headers import ENV_VAR


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``native`` command."""
    p = sub.add_parser(
        "native", help="build the native GroupNorm kernel for onnxruntime and print its path",
        description="Compile gn-convert's native CPU kernel for ai.gn_convert::GroupNorm (cached after the "
        "first build) and print the shared library's path, for onnxruntime's "
        "SessionOptions.register_custom_ops_library or Triton's op_library_filename. Needs a C++ compiler "
        f"and onnxruntime's C++ headers: --include, ${ENV_VAR}, the system include folders, or fetched "
        "once from the npm registry. gn-convert's wheel already carries a portable build, which every other "
        "command uses first; this one builds for this CPU (or --march).")
    p.add_argument("--include", type=Path, metavar="DIR", help="onnxruntime's include/ folder")
    p.add_argument("--march", default=DEFAULT_MARCH,
                   help="the -march target (default native: this CPU; x86-64-v2 runs on any x86-64 server, "
                   "x86-64-v3 on AVX2 ones)")
    p.add_argument("--no-fetch", action="store_true", help="never fetch the headers from the npm registry")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--blocked", type=Path, metavar="MODEL",
                   help="also write MODEL (a gn-convert .onnx) with every GroupNorm, and the Add and activation "
                   "after it, computed on onnxruntime's blocked (NCHWc) layout: no reorders around it. The file "
                   "is for this CPU and this onnxruntime only; gn-convert's own sessions do this by themselves")
    p.add_argument("-o", "--output", type=Path, help="where --blocked writes (default: MODEL.blocked.onnx)")


def run(args: argparse.Namespace) -> int:
    """Build (or find) the library and print its path; 0 on success."""
    print(f"building the native GroupNorm kernel (-march={args.march}; the first build fetches onnxruntime's "
          "headers and compiles, about 30 s; later ones are cached) ...", file=sys.stderr, flush=True)
    library = build_library(args.include, march=args.march, fetch=not args.no_fetch, force=args.force)
    print(library)
    if args.blocked is not None:
        _write_blocked(args.blocked, args.output or args.blocked.with_suffix(".blocked.onnx"), library)
    return 0


def _write_blocked(model: Path, output: Path, library: Path) -> None:
    """Rewrite ``model`` for the blocked layout into ``output`` (atomically) and say what moved."""
    from gn_convert.atomic import atomic_file
    from gn_convert.errors import OutputError, SessionError
    from gn_convert.native.nchwc import block_size, nchwc_model

    if not model.is_file():
        raise SessionError(f"ONNX file {model} not found")
    if output.exists() and output.resolve() == model.resolve():  # the portable file would become this CPU's only
        raise OutputError(f"--output {output} is the model itself; write the blocked file beside it (the default "
                          f"is {model.with_suffix('.blocked.onnx').name})")
    data, fused = nchwc_model(model, library)
    if not fused:
        raise SessionError(f"{model} has no GroupNorm that onnxruntime runs on its blocked layout here (no "
                           "ai.gn_convert::GroupNorm node after a convolution); pass a model gn-convert exported")
    with atomic_file(output) as staged:
        staged.write_bytes(data)
    print(f"{output}: {fused} GroupNorm layers on onnxruntime's blocked layout (block {block_size()}); open it with "
          f"SessionOptions.register_custom_ops_library({str(library)!r}), on this machine only", file=sys.stderr)
