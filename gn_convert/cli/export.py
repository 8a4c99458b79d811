"""``gn-convert export SOURCE -o FILE``: export a converted model (or its BN original) to ONNX.

SOURCE is a checkpoint folder written by ``gn-convert MODEL`` or a torchvision model name
(converted on the fly with the group-plan options).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gn_convert.cli.arguments import add_plan_arguments, add_target_argument, plan_kwargs, stderr_sink
from gn_convert.errors import CheckpointError, OptionError
from gn_convert.onnx.targets import describe

if TYPE_CHECKING:  # the parser is built without torch; the command imports it
    from torch import nn


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` command."""
    p = sub.add_parser(
        "export", help="export a converted model to ONNX with the custom GroupNorm op",
        description="Export a checkpoint folder (written by `gn-convert MODEL`) or a torchvision model "
        f"(converted on the fly) to ONNX. Targets: {describe()}.",
    )
    p.add_argument("source", metavar="CHECKPOINT_OR_MODEL", help="checkpoint folder or torchvision model name")
    p.add_argument("--out", "-o", type=Path, required=True, help="the .onnx file to write")
    add_target_argument(p, "--target")
    p.add_argument("--input-shape", metavar="N,C,H,W",
                   help="example input shape (default: 1,3 and the weights' own crop size)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis instead of making it dynamic")
    p.add_argument("--opset", type=int, default=21, help="default-domain opset, 18-21 (default 21)")
    p.add_argument("--fp16", action="store_true", help="export a float16 model (statistics still in float32)")
    p.add_argument("--baseline", action="store_true",
                   help="export the BatchNorm original instead (for latency and parity comparisons)")
    p.add_argument("--weights", default="DEFAULT",
                   help="with a model name: DEFAULT, a weights name, none, or a local file (as `gn-convert MODEL`)")
    p.add_argument("--num-classes", type=int, help="with a model name: classifier size for untrained or local weights")
    add_plan_arguments(p)
    p.set_defaults(parser=p)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``N,C,H,W`` (any rank >= 3) into a tuple.

    Raises:
        GnConvertError: the text is not comma-separated positive integers.
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise OptionError(f"--input-shape {text!r} is not a list of integers; use N,C,H,W such as 1,3,224,224") from None
    if len(shape) < 3 or min(shape) < 1:
        raise OptionError(f"--input-shape {text!r} needs rank >= 3 and sizes >= 1, such as 1,3,224,224")
    return shape


@dataclass
class _Source:
    """A model to export, with what the export records about it."""

    model: nn.Module
    metadata: dict[str, str] = field(default_factory=dict)
    size: tuple[int, ...] | None = None
    keeps_batchnorm: bool = False


def _is_path(source: str) -> bool:
    return Path(source).exists() or "/" in source or source.startswith(".")


def _from_checkpoint(folder: Path, args: argparse.Namespace) -> _Source:
    """The model to export from a checkpoint folder (the converted one, or its BN original)."""
    from gn_convert.load.weights import load_model
    from gn_convert.surgery.checkpoint import load_converted, read_config

    config = read_config(folder)
    arch = config.get("architecture")
    size = tuple(config["input_size"]) if config.get("input_size") else None
    meta = {"source_architecture": str(arch), "source_weights": str(config.get("source_weights")),
            "checkpoint": str(folder.resolve())}
    if not args.baseline:
        layers = (config.get("plan") or {}).get("layers") or []
        converted = sum(1 for layer in layers if layer.get("action") == "convert")
        meta["group_plan"] = f"{converted} of {len(layers)} BatchNorm layers converted"
        return _Source(load_converted(folder), meta, size, any(layer.get("action") != "convert" for layer in layers))
    if not arch:
        raise CheckpointError(f"{folder} holds a custom model; export its BatchNorm original from Python")
    weights = str(config.get("source_weights") or "none")
    if weights == "none":
        print("note: the checkpoint was converted from untrained weights; the baseline is a fresh untrained "
              "model (good for latency, not for parity)", file=sys.stderr)
    model = load_model(arch, weights, **(config.get("model_kwargs") or {}))
    return _Source(model, meta, size, True)


def _from_name(name: str, args: argparse.Namespace) -> _Source:
    """The model to export from a torchvision name, converted with the plan options."""
    import torch

    from gn_convert.load.weights import load_model, resolve_source
    from gn_convert.surgery.plan import plan
    from gn_convert.surgery.replace import convert

    source = resolve_source(name, args.weights)
    model = load_model(name, args.weights, num_classes=args.num_classes)
    meta = {"source_architecture": name, "source_weights": source.weights}
    if args.baseline:
        return _Source(model, meta, source.input_size, True)
    layer_plan = plan(model, example_input=torch.zeros(1, 3, *source.input_size),
                      **plan_kwargs(args, getattr(args, "parser", None)))
    meta["group_plan"] = layer_plan.summary()
    return _Source(convert(model, plan=layer_plan, init=args.init), meta, source.input_size, bool(layer_plan.untouched))


def run(args: argparse.Namespace) -> int:
    """Export; returns the exit code."""
    from gn_convert.onnx.export import export_onnx
    from gn_convert.stages import Stages
    from gn_convert.surgery.checkpoint import CONFIG_FILE

    stages = Stages(stderr_sink)
    with stages("load", f"loading {args.source}"):
        if Path(args.source).is_dir() or (Path(args.source) / CONFIG_FILE).exists():
            source = _from_checkpoint(Path(args.source), args)
        elif _is_path(args.source):
            raise CheckpointError(f"checkpoint folder {args.source} not found; pass a folder written by "
                                  "`gn-convert MODEL --out DIR` or a torchvision model name")
        else:
            source = _from_name(args.source, args)
    shape = parse_shape(args.input_shape) if args.input_shape else ((1, 3, *source.size) if source.size else None)
    what = "BatchNorm baseline" if args.baseline else args.target
    with stages("export", f"exporting {what} to {args.out}"):
        report = export_onnx(source.model, args.out, target=args.target, input_shape=shape,
                             dynamic_batch=not args.static_batch, opset=args.opset, fp16=args.fp16,
                             allow_batchnorm=source.keeps_batchnorm, metadata=source.metadata)
    form = what if args.baseline else f"{report.target}, {len(report.layers)} GroupNorm nodes"
    print(f"wrote {report.path} ({form}, {report.size_bytes / 2**20:.1f} MiB) in {stages.total():.1f} s")
    return 0
