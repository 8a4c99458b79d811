"""Latency of converted GroupNorm models under OpenVINO's CPU runtime, against their BatchNorm originals.

For each model (untrained torchvision weights: latency does not depend on the values; G=32 on every
layer, ``min_channels_per_group=1``), this exports the BatchNorm original and the GroupNorm model in
each export target, compiles every file with OpenVINO (``gn_convert.runtime.openvino``) in each shape
mode, and times them interleaved in one process (``gn_convert.bench.harness``), one interleaved run
per shape mode, each against the BatchNorm original compiled the same way. A compile that crashes
OpenVINO (the ``standard`` file with a static batch, ``scripts/openvino_segfault_repro.py``) is caught
in a child process and printed as skipped.

Variants: ``bn``; the export targets ``inlined``, ``standard``, ``fast``, ``blocked``, ``openvino``;
``inlined-2p`` (the inlined file of the ``two-pass`` body: Reduce/Sub/Mul ops, which OpenVINO fuses
into MVN); ``standard-nosnip`` (the standard file compiled with ``SNIPPETS_MODE=DISABLE``, the
crash's workaround).

Usage::

    python scripts/bench_openvino.py                                   # resnet50 and mobilenet_v3_large, b1 and b8
    python scripts/bench_openvino.py --models resnet50 --variants bn,inlined,openvino --modes static --rounds 20
    python scripts/bench_openvino.py --precision default               # OpenVINO's default precision (bf16 here)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import gn_convert
from gn_convert.atomic import atomic_file
from gn_convert.bench.harness import Variant, parse_batches, run_bench
from gn_convert.bench.variants import openvino_variant
from gn_convert.errors import GnConvertError, ProviderUnavailableError
from gn_convert.load.names import build_model
from gn_convert.onnx import export_onnx, lower_onnx
from gn_convert.runtime.openvino import SHAPE_MODES, OpenVinoSession, openvino_version

MODELS = ("resnet50", "mobilenet_v3_large")
VARIANTS = ("bn", "inlined", "inlined-2p", "standard", "standard-nosnip", "fast", "blocked", "openvino")
FILES = {"standard-nosnip": "standard"}
"""Variants that time another variant's file (with other compile properties)."""
PROPERTIES = {"standard-nosnip": {"SNIPPETS_MODE": "DISABLE"}}


def export_files(name: str, folder: Path, wanted: list[str], groups: int) -> dict[str, Path]:
    """The BN original, the function file and each wanted target's file of one model (reused when there)."""
    torch.manual_seed(0)
    original = build_model(name).eval()
    converted = gn_convert.convert(original, groups, min_channels_per_group=1).eval()
    shape = (1, 3, 224, 224)
    paths = {v: folder / f"{name}.{v}.G{groups}.onnx" for v in ["bn", "function", *wanted] if v not in FILES}
    for variant, path in paths.items():
        if path.exists():
            continue
        start = time.perf_counter()
        if variant == "bn":
            export_onnx(original, path, input_shape=shape, allow_batchnorm=True)
        elif variant == "function":
            export_onnx(converted, path, input_shape=shape)
        elif variant == "inlined-2p":
            export_onnx(converted, path, input_shape=shape, target="inlined", body="two-pass")
        else:
            lower_onnx(paths["function"], path, variant)
        print(f"  exported {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def variants_for(paths: dict[str, Path], wanted: list[str], mode: str, args: argparse.Namespace) -> list[Variant]:
    """One timed variant per wanted file compiled in ``mode``; a file OpenVINO cannot compile is printed, not timed."""
    found = []
    for variant in wanted:
        try:
            session = OpenVinoSession(paths[FILES.get(variant, variant)], precision=args.precision_hint,
                                      threads=args.threads, static=mode == "static",
                                      properties=PROPERTIES.get(variant))
            if mode == "static":  # compile (and probe) every batch now, outside the timed rounds
                for batch in parse_batches(args.batch):
                    session.compiled({session.get_inputs()[0].name: (batch, 3, 224, 224)})
        except GnConvertError as exc:
            print(f"  {variant}/{mode}: skipped: {exc}", flush=True)
            continue
        found.append(openvino_variant(variant, session))
    return found


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """Export, compile and time one model in each shape mode; print the tables."""
    wanted = [v for v in args.variants.split(",") if v]
    print(f"{name}: exporting ({', '.join(wanted)})", flush=True)
    paths = export_files(name, folder, wanted, args.groups)
    results = []
    for mode in args.modes.split(","):
        variants = variants_for(paths, wanted, mode, args)
        result = run_bench(variants, (3, 224, 224), batches=parse_batches(args.batch), rounds=args.rounds,
                           warmup=args.warmup, baseline="bn" if any(v.name == "bn" for v in variants) else None,
                           threads=args.threads, provider="openvino" if args.precision_hint else "openvino-default",
                           engine=("OpenVINO", openvino_version()))
        print(f"\n## {name} (G={args.groups}, {mode} shapes, precision {args.precision})\n{result.table()}\n",
              flush=True)
        results.append({"model": name, "mode": mode, "precision": args.precision, **result.to_dict()})
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated (default {','.join(VARIANTS)})")
    p.add_argument("--modes", default=",".join(SHAPE_MODES), help="shape modes: static (the model reshaped to the "
                   "batch before compiling), dynamic (the file's dynamic batch); default both")
    p.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--threads", type=int, default=2, help="INFERENCE_NUM_THREADS (default 2)")
    p.add_argument("--precision", choices=("f32", "default"), default="f32",
                   help="INFERENCE_PRECISION_HINT f32 (default), or OpenVINO's default (bf16 on CPUs with bf16 units)")
    p.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds per batch (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch (default 2)")
    p.add_argument("--groups", type=int, default=32, help="GroupNorm groups on every layer (default 32)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the exported files here")
    p.add_argument("--json", type=Path, help="write all results to this JSON file")
    args = p.parse_args(argv)
    args.precision_hint = "f32" if args.precision == "f32" else None
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success or when openvino is not installed (printed as skipped)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(f"OpenVINO {openvino_version()}, CPU, {args.threads} threads, precision {args.precision}")
    except ProviderUnavailableError as exc:
        print(f"skipped: {exc}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="gn-convert-ov-bench-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in [m for m in args.models.split(",") if m]:
            results.extend(bench_model(name, args, folder))
    if args.json:
        with atomic_file(args.json) as out:
            out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
