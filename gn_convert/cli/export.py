"""``gn-convert export SOURCE -o FILE``: export a converted model (or its BN original) to ONNX.

SOURCE is a checkpoint folder written by ``gn-convert MODEL`` or a torchvision model name
(converted on the fly with the group-plan options).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..checkpoint import CONFIG_FILE, load_converted, read_config
from ..errors import CheckpointError, GnConvertError
from ..group_plan import plan
from ..models import load_model, resolve_source
from ..surgery import convert
from .pipeline import add_plan_arguments, plan_kwargs
from .stages import Stages

TARGETS = ("function", "inlined", "standard", "fast")  # gn_convert.onnx.TARGETS, without importing onnx for --help
PIPELINE_PARITY_BATCH = 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` command."""
    p = sub.add_parser(
        "export", help="export a converted model to ONNX with the custom GroupNorm op",
        description="Export a checkpoint folder (written by `gn-convert MODEL`) or a torchvision model "
        "(converted on the fly) to ONNX. Targets: function (one ai.gn_convert::GroupNorm node per layer, "
        "with its function; onnxruntime, fastest with `gn-convert native`), inlined (standard ops only; "
        "OpenVINO, TensorRT), standard (GroupNormalization-21; onnxruntime computes it imprecisely for "
        "large-mean inputs), fast (InstanceNormalization + BatchNormalization; onnxruntime CPU without "
        "the native kernel).",
    )
    p.add_argument("source", metavar="CHECKPOINT_OR_MODEL", help="checkpoint folder or torchvision model name")
    p.add_argument("--out", "-o", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--target", choices=TARGETS, default="function", help="ONNX form (default function)")
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


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``N,C,H,W`` (any rank >= 3) into a tuple.

    Raises:
        GnConvertError: the text is not comma-separated positive integers.
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise GnConvertError(f"--input-shape {text!r} is not a list of integers; use N,C,H,W such as 1,3,224,224") from None
    if len(shape) < 3 or min(shape) < 1:
        raise GnConvertError(f"--input-shape {text!r} needs rank >= 3 and sizes >= 1, such as 1,3,224,224")
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
    model = load_model(arch, weights.split(".")[-1] if "_Weights." in weights else weights,
                       **(config.get("model_kwargs") or {}))
    return _Source(model, meta, size, True)


def _from_name(name: str, args: argparse.Namespace) -> _Source:
    """The model to export from a torchvision name, converted with the plan options."""
    import torch

    source = resolve_source(name, args.weights)
    model = load_model(name, args.weights, num_classes=args.num_classes)
    meta = {"source_architecture": name, "source_weights": source.weights}
    if args.baseline:
        return _Source(model, meta, source.input_size, True)
    layer_plan = plan(model, example_input=torch.zeros(1, 3, *source.input_size), **plan_kwargs(args))
    meta["group_plan"] = layer_plan.summary()
    return _Source(convert(model, plan=layer_plan, init=args.init), meta, source.input_size, bool(layer_plan.untouched))


def run(args: argparse.Namespace) -> int:
    """Export; returns the exit code."""
    from ..onnx import export_onnx

    stages = Stages()
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


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The ONNX options of the main ``gn-convert MODEL`` command."""
    g = parser.add_argument_group("ONNX")
    g.add_argument("--no-onnx", action="store_true", help="do not write model.onnx (nor check its parity)")
    g.add_argument("--onnx-target", choices=TARGETS, default="function",
                   help="form of model.onnx (default function; see `gn-convert export -h`)")
    g.add_argument("--no-parity", action="store_true", help="do not check model.onnx against the model")
    g.add_argument("--parity-batch", type=int, default=PIPELINE_PARITY_BATCH,
                   help=f"larger batch of the parity check (default {PIPELINE_PARITY_BATCH})")
    g.add_argument("--native", action="store_true",
                   help="also check model.onnx on gn-convert's native GroupNorm kernel (built here, `gn-convert "
                   "native`) and, with --triton-repo, ship the kernel with the model")


def pipeline_stage(args: argparse.Namespace, converted: nn.Module, folder: Path, input_size: tuple[int, ...],
                   metadata: dict[str, str], keeps_batchnorm: bool, stages: Stages) -> dict[str, object]:
    """Write ``model.onnx`` into the pipeline's (staged) output folder.

    Args:
        args: the main command's parsed options.
        converted: the converted model.
        folder: the staged output folder.
        input_size: the weights' crop size (H, W).
        metadata: source architecture, weights and plan summary, for metadata_props.
        keeps_batchnorm: whether the plan left BatchNorm layers.
        stages: the command's stage timer.

    Returns:
        The fields for ``report.json``: ``onnx`` (the export) and ``parity`` (the CPU parity
        report, with ``--native`` on the native kernel too; ``parity.passed`` is the verdict);
        empty with ``--no-onnx``.
    """
    if getattr(args, "no_onnx", False):
        return {}
    from ..onnx import export_onnx

    target = getattr(args, "onnx_target", "function")
    with stages("export", f"exporting model.onnx ({target})"):
        report = export_onnx(converted, folder / "model.onnx", target=target, input_shape=(1, 3, *input_size),
                             allow_batchnorm=keeps_batchnorm, metadata=metadata)
    data = report.to_dict()
    data.update(path="model.onnx", files=[Path(p).name for p in data["files"]])
    if getattr(args, "no_parity", False):
        return {"onnx": data}
    from ..parity import check_parity

    native = getattr(args, "native", False)
    where = "onnxruntime CPU" + (" and the native kernel" if native else "")
    with stages("parity", f"checking parity on {where}"):
        parity = check_parity(converted, report.path, providers=("cpu", "cpu-native") if native else ("cpu",),
                              batch=getattr(args, "parity_batch", PIPELINE_PARITY_BATCH))
    result = parity.to_dict()
    result["onnx_path"] = "model.onnx"
    worst = max((row.metrics.max_rel for row in parity.rows), default=float("nan"))
    print(f"parity {'passed' if parity.passed else 'FAILED'} on {where} "
          f"({len(parity.rows)} comparisons, worst max_rel {worst:.1e})", file=sys.stderr)
    for line in parity.failures():
        print(f"  {line}", file=sys.stderr)
    return {"onnx": data, "parity": result}


def parity_failed(fields: dict[str, object]) -> bool:
    """Whether :func:`pipeline_stage` ran a parity check that failed."""
    parity = fields.get("parity")
    return isinstance(parity, dict) and parity.get("passed") is False
