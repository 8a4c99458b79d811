"""``gn-convert parity MODEL.onnx --checkpoint DIR``: compare an ONNX file with its PyTorch model.

Exit status: 0 every provider passed, 1 a comparison or check failed, 2 bad input (a file
that is not ONNX, does not match the checkpoint, a missing checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gn_convert import strict_json
from gn_convert.atomic import atomic_file
from gn_convert.cli.arguments import add_native_library_argument
from gn_convert.cli.export import parse_shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``parity`` command."""
    p = sub.add_parser(
        "parity", help="check that an ONNX file computes what its checkpoint computes",
        description="Run the ONNX model under onnxruntime (each provider, graph optimisations off and on) "
        "and compare it with the checkpoint's PyTorch model on random, large-mean, large-scale and optional "
        "image inputs at batch 1 and --batch; check batch independence; name the first failing GroupNorm "
        "layer. Exit 0 pass, 1 fail, 2 bad input.",
    )
    p.add_argument("onnx", type=Path, metavar="MODEL.onnx", help="the exported file (any target)")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder written by `gn-convert MODEL`")
    p.add_argument("--providers", default="cpu",
                   help="comma-separated: cpu, cpu-native (the native GroupNorm kernel), cuda, tensorrt, openvino "
                   "(OpenVINO's CPU runtime, f32 hint), openvino-default (its default precision: bf16 on CPUs with "
                   "bfloat16 units) (default cpu); absent ones are reported as skipped")
    p.add_argument("--levels", default="off,all", help="onnxruntime optimisation levels (default off,all); OpenVINO runs its "
                   "shape modes instead (dynamic, static)")
    p.add_argument("--batch", type=int, default=8, help="the larger batch size (default 8; batch 1 always runs)")
    p.add_argument("--images", type=Path, help="a folder of images to use as one more input set")
    p.add_argument("--input-shape", metavar="N,C,H,W", help="for ONNX inputs with dynamic axes besides the batch")
    p.add_argument("--max-rel", type=float, help="override every provider's max relative error bound")
    p.add_argument("--json", type=Path, help="also write the full report as JSON")
    add_native_library_argument(p)


def _tolerances(max_rel: float | None) -> dict | None:
    from gn_convert.parity import DEFAULT_TOLERANCES

    if max_rel is None:
        return None
    return {key: dataclasses.replace(tol, max_rel=max_rel) for key, tol in DEFAULT_TOLERANCES.items()}


def run(args: argparse.Namespace) -> int:
    """Check parity; returns the exit code."""
    from gn_convert.onnx import read_model
    from gn_convert.parity import check_parity
    from gn_convert.surgery.checkpoint import load_converted

    read_model(args.onnx, load_external_data=False)  # a bad file fails before the model loads
    model = load_converted(args.checkpoint)
    report = check_parity(
        model, args.onnx, providers=args.providers, levels=[x.strip() for x in args.levels.split(",") if x.strip()],
        batch=args.batch, images=args.images, tolerances=_tolerances(args.max_rel),
        input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        native_library=args.native_library,
    )
    print(report.table())
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(strict_json.dumps(report.to_dict(), indent=2))
    return 0 if report.passed else 1
