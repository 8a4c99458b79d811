"""Latency of converted GroupNorm models under onnxruntime, against their BatchNorm originals.

For each model (untrained torchvision weights: latency does not depend on the values), this
exports the BatchNorm original and its GroupNorm conversion in every form, then times all of
them interleaved in one process (``gn_convert.bench.harness``), at each batch size, and prints the
median latency and the ratio to the BatchNorm original. Before timing, it prints how many reorders of
full activations onnxruntime leaves in each ONNX variant on this CPU (``gn_convert.bench.reorders``).

Variants (CPU):

- ``bn``: the BatchNorm original (``export_onnx(allow_batchnorm=True)``, i.e.
  ``torch.onnx.export``); onnxruntime folds each BN into its convolution.
- ``torch-default``: the GN model exported by plain ``torch.onnx.export`` (opset 20:
  Reshape -> InstanceNormalization -> Reshape -> Mul -> Add).
- ``function``, ``inlined``, ``standard``: gn-convert's export targets.
- ``function-2p``, ``function-in``: the function file with the ``two-pass`` body (Reduce/Sub/Mul
  ops) or the ``instance-norm`` body (``gn_convert.onnx.op.BODIES``; the default is ``layer-norm``).
- ``fast``: the function file lowered by ``gn_convert.onnx.lowering.fast.to_fast``.
- ``blocked``: the function file lowered by ``gn_convert.onnx.lowering.blocked.to_blocked`` (standard ops
  that onnxruntime keeps on its NCHWc layout: no reorder of the activation around GroupNorm).
- ``native``: the function file run with gn-convert's native GroupNorm kernel registered
  (``gn_convert.native``; built on first use, skipped with the reason if it cannot be built).
- ``native-nchwc``: ``native`` with each GroupNorm (and the Add + Relu after it) computed on
  onnxruntime's blocked layout, no reorders around it (``gn_convert.native.nchwc``).
- ``torch-eager``: the GN model in torch, as a reference.

With ``--provider cuda`` (onnxruntime-gpu and a GPU), the models are exported in float16 and
``ms-groupnorm`` (``gn_convert.onnx.lowering.ms_groupnorm``: com.microsoft.GroupNorm, NHWC) is added; without a
GPU the run prints why it is skipped and exits 0.

Usage::

    python scripts/bench_latency.py                                 # resnet50, batch 1 and 8
    python scripts/bench_latency.py --models resnet50,resnet18,mobilenet_v3_large,efficientnet_b0
    python scripts/bench_latency.py --threads 1,2 --spinning off,on  # issue 16's grid, with the physical limit
    python scripts/bench_latency.py --provider cuda --rounds 50
    python scripts/bench_latency.py --models resnet50,mobilenet_v3_large --threads 2 --rounds 16 \
        --variants bn,function,fast,blocked                        # issue 23, item 4: the blocked target
    python scripts/bench_latency.py --models deeplabv3_resnet50 --size 520 --batch 1 --variants bn,function,native,native-nchwc
    python scripts/bench_latency.py --models r3d_18 --size 112 --batch 1 --variants bn,function,native  # 16x112x112
    python scripts/bench_latency.py --variants bn,native,native-nchwc \
        --native-library wheel=WHEEL_LIB.so,local=$(gn-convert native)  # the wheel's kernel against a local build
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin while others are timed
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn

import gn_convert
from gn_convert.atomic import atomic_file
from gn_convert.bench.harness import Variant, parse_batches, run_bench
from gn_convert.bench.limits import groupnorm_traffic, limit_lines
from gn_convert.bench.reorders import count_reorders
from gn_convert.bench.variants import ort_session, session_variant, torch_variant
from gn_convert.errors import GnConvertError, NativeBuildError, ProviderUnavailableError
from gn_convert.load.names import build_model
from gn_convert.load.weights import resolve_source
from gn_convert.native.build import kernel_isa
from gn_convert.native.nchwc import block_size
from gn_convert.onnx import export_onnx, lower_onnx
from gn_convert.onnx.lowering.function import set_body
from gn_convert.pipeline import sized
from gn_convert.runtime import check_provider
from gn_convert.tasks import task_of

MODELS = ("resnet50",)
ALL_MODELS = ("resnet50", "resnet18", "mobilenet_v3_large", "efficientnet_b0")
CPU_VARIANTS = ("bn", "torch-default", "function", "function-in", "function-2p", "inlined", "standard", "fast", "blocked",
                "native", "native-nchwc", "torch-eager")
LOWERED = ("inlined", "standard", "fast", "blocked", "ms-groupnorm")
"""Variants that are the function file lowered to the export target of the same name."""
CUDA_VARIANTS = ("bn", "torch-default", "function", "fast", "ms-groupnorm", "torch-eager")
BODY_VARIANTS = {"function-2p": "two-pass", "function-in": "instance-norm", "function-2l": "two-level"}
"""Variants that are the function file with another body (gn_convert.onnx.op.BODIES)."""
NOTES = {
    "bn": "BatchNorm original, BN folded into the convolutions by onnxruntime",
    "torch-default": "GN model, plain torch.onnx.export (Reshape-InstanceNormalization-Reshape-Mul-Add)",
    "function": "gn-convert export, target function (our op; its default layer-norm body inlined by onnxruntime)",
    "function-2p": "function file with the two-pass body (ReduceMean/Sub/Mul/... ops)",
    "function-in": "function file with the instance-norm body (InstanceNormalization over each (sample, group) row)",
    "function-2l": "function file with the two-level body (each row reduced per channel, then per group: dense tasks' default)",
    "inlined": "gn-convert export, target inlined",
    "standard": "gn-convert export, target standard (GroupNormalization-21, one-pass variance)",
    "fast": "function file lowered to the fast target (InstanceNormalization + BatchNormalization affine)",
    "blocked": "function file lowered to the blocked target (standard ops onnxruntime keeps on its NCHWc layout)",
    "native": "function file with the native GroupNorm kernel library registered (gn_convert.native), plain layout",
    "native-nchwc": "native, GroupNorm (+ Add + Relu) on onnxruntime's blocked layout (gn_convert.native.nchwc)",
    "ms-groupnorm": "function file lowered to com.microsoft.GroupNorm (CUDA, NHWC, one-pass variance)",
    "torch-eager": "GN model in torch eager mode (reference)",
}


def sample_shape(name: str, size: int) -> tuple[int, ...]:
    """One sample's input shape: ``(3, size, size)``, ``(3, 16, size, size)`` for a video model."""
    return (3, *sized(resolve_source(name, "none").input_size, size))


def _export_torch_default(model: nn.Module, path: Path, shape: tuple[int, ...], fp16: bool,
                          outputs: tuple[str, ...]) -> None:
    """torch's own export of the GN model (no custom translation), dynamic batch, opset 20."""
    source = model.half() if fp16 else model
    example = torch.randn(2, *shape[1:], dtype=torch.float16 if fp16 else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(source, (example,), dynamo=True, opset_version=20, optimize=True,
                                    dynamic_shapes=({0: "batch"},), input_names=["input"],
                                    output_names=list(outputs), verbose=False)
    assert program is not None  # the dynamo exporter always returns one
    program.save(str(path))
    if fp16:
        model.float()


def export_variants(name: str, folder: Path, *, groups: int, size: int, fp16: bool,
                    wanted: list[str], min_channels: int = 1) -> tuple[dict[str, Path], nn.Module]:
    """Export every ONNX variant of one model into ``folder`` (reused when already there)."""
    torch.manual_seed(0)
    task = task_of(name)
    original = build_model(name).eval()
    converted = gn_convert.convert(original, groups, min_channels_per_group=min_channels).eval()
    outputs = task.output_names(original)
    bn, gn = task.exportable(original), task.exportable(converted)  # a tensor or a tuple of tensors out
    shape = (1, *sample_shape(name, size))
    tag = f"{size}px.G{groups}K{min_channels}.{'fp16' if fp16 else 'fp32'}"
    paths = {v: folder / f"{name}.{v}.{tag}.onnx" for v in wanted
             if v not in ("torch-eager", "native", "native-nchwc")}
    paths.setdefault("function", folder / f"{name}.function.{tag}.onnx")  # every lowering starts from it
    steps = {
        "bn": lambda p: export_onnx(bn, p, input_shape=shape, allow_batchnorm=True, fp16=fp16, output_names=outputs),
        "function": lambda p: export_onnx(gn, p, input_shape=shape, fp16=fp16, output_names=outputs),
        "torch-default": lambda p: _export_torch_default(gn, p, shape, fp16, outputs),
    }
    function_file = paths["function"]
    order = ["bn", "torch-default", "function"] + [v for v in paths if v not in ("bn", "torch-default", "function")]
    for variant in order:
        if variant not in paths:
            continue
        path = paths[variant]
        if path.exists():
            continue
        start = time.perf_counter()
        if variant in steps:
            steps[variant](path)
        elif variant in LOWERED:
            lower_onnx(function_file, path, variant)
        elif variant in BODY_VARIANTS:
            model = onnx.load(function_file)
            onnx.save(set_body(model, BODY_VARIANTS[variant]), path)
        print(f"  exported {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return paths, gn


def _native_libraries(given: str | None) -> dict[str, Path]:
    """The native kernel libraries to time, by label: ``--native-library`` (``LABEL=PATH,...``), else the
    one built for this CPU under the label ``""`` (none, with the reason printed, where it cannot be built)."""
    from gn_convert.native import build_library

    if given:
        pairs = [item.split("=", 1) for item in given.split(",") if item]
        if any(len(pair) != 2 or not Path(pair[1]).is_file() for pair in pairs):
            raise NativeBuildError(f"--native-library {given!r}: expected LABEL=PATH,... naming existing files")
        return {label: Path(path) for label, path in pairs}
    try:
        return {"": build_library()}
    except NativeBuildError as exc:
        print(f"  native: skipped: {exc}", flush=True)
        return {}


def reorder_counts(paths: dict[str, Path], wanted: list[str], shape: tuple[int, ...]) -> dict[str, dict[str, int]]:
    """The NCHWc reorders onnxruntime leaves in each wanted ONNX file on this CPU, printed as one line."""
    counts = {v: count_reorders(paths[v], input_shape=(1, *shape)).to_dict() for v in wanted if v in paths}
    print(f"  reorders of activations onnxruntime leaves here (NCHWc block {block_size()}; out + in, elements a "
          "sample): " + ", ".join(f"{v} {c['large_out']} + {c['large_in']}, {c['large_elements']}"
                                  for v, c in counts.items()), flush=True)
    return counts


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """Export and time one model at every thread count and spinning setting; print the tables."""
    fp16 = args.provider == "cuda"
    wanted = [v for v in args.variants.split(",") if v]
    print(f"{name}: exporting ({', '.join(wanted)})", flush=True)
    paths, gn = export_variants(name, folder, groups=args.groups, size=args.size, fp16=fp16, wanted=wanted,
                                min_channels=args.min_channels_per_group)
    shape = sample_shape(name, args.size)
    reorders = reorder_counts(paths, wanted, shape) if args.provider == "cpu" and len(shape) == 3 else {}
    libraries = _native_libraries(args.native_library) if {"native", "native-nchwc"} & set(wanted) else {}
    results = []
    for threads in parse_batches(args.threads):
        torch.set_num_threads(threads)
        for spinning in args.spinning.split(","):
            spin = spinning == "on"
            variants: list[Variant] = []
            for variant in wanted:
                if variant in ("native", "native-nchwc"):
                    for label, library in libraries.items():
                        session = ort_session(paths["function"], threads=threads, custom_ops_library=library,
                                              spinning=spin, blocked=variant == "native-nchwc")
                        note = NOTES[variant] + (f"; library {library} ({kernel_isa(library)} kernels)" if label else "")
                        variants.append(session_variant(f"{variant}@{label}" if label else variant, session, note=note))
                    continue
                if variant == "torch-eager":
                    variants.append(torch_variant(variant, gn, threads=threads, device="cuda" if fp16 else "cpu",
                                                  fp16=fp16, note=NOTES[variant]))
                    continue
                session = ort_session(paths[variant], threads=threads, provider=args.provider, spinning=spin)
                variants.append(session_variant(variant, session, note=NOTES.get(variant, "")))
            result = run_bench(variants, shape, batches=parse_batches(args.batch),
                               rounds=args.rounds, warmup=args.warmup, baseline="bn" if "bn" in wanted else None,
                               threads=threads, provider=args.provider, clock=args.clock)
            lines = []
            if "bn" in wanted and not fp16:
                lines = limit_lines(result, lambda b: groupnorm_traffic(gn, (b, *shape)), threads, "bn")
            print(f"\n## {name} (G={args.groups}, {'float16' if fp16 else 'float32'}, {threads} thread(s), "
                  f"spinning {spinning})\n{result.table()}\n" + "\n".join(lines) + "\n", flush=True)
            results.append({"model": name, "spinning": spin, "limit": lines, "reorders": reorders, **result.to_dict()})
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (all: {','.join(ALL_MODELS)})")
    p.add_argument("--variants", default=None, help=f"comma-separated, default CPU: {','.join(CPU_VARIANTS)}; "
                   f"CUDA: {','.join(CUDA_VARIANTS)}")
    p.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--threads", default="2", help="intra-op threads of onnxruntime and torch; several: 1,2 (default 2)")
    p.add_argument("--spinning", default="off", choices=("off", "on", "off,on"),
                   help="onnxruntime pool threads spinning while idle (default off; off,on: both)")
    p.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds per batch (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch (default 2)")
    p.add_argument("--groups", type=int, default=32, help="GroupNorm groups of the conversion (default 32)")
    p.add_argument("--min-channels-per-group", type=int, default=1, metavar="K",
                   help="the plan's bound (default 1: G on every layer, as every figure in PERF.md; the library's "
                   "default is 16)")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224; a video model's clips "
                   "keep their 16 frames: r3d_18 is timed at --size 112)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: latency (default); cpu: process CPU time, robust on a busy machine")
    p.add_argument("--native-library", metavar="LABEL=PATH,...",
                   help="time the native variants with each of these kernel libraries, interleaved, as "
                   "native@LABEL (e.g. wheel=...,local=...; default: the build for this CPU)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the exported files here")
    p.add_argument("--json", type=Path, help="write all results to this JSON file")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(CUDA_VARIANTS if args.provider == "cuda" else CPU_VARIANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success or on a skipped CUDA run."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        check_provider(args.provider)
        if args.provider == "cuda" and not torch.cuda.is_available():
            raise ProviderUnavailableError("torch sees no CUDA device")
    except ProviderUnavailableError as exc:
        print(f"skipped: {exc}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="gn-convert-bench-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in [m for m in args.models.split(",") if m]:
            try:
                results.extend(bench_model(name, args, folder))
            except GnConvertError as exc:
                print(f"bench_latency: error: {name}: {exc}", file=sys.stderr)
                return 2
    if args.json:
        with atomic_file(args.json) as out:
            out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
