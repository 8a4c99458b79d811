"""``gn-convert MODEL``: the whole pipeline on a torchvision model.

Stages: load -> plan -> convert -> save. The output folder is assembled under a temporary
name and renamed into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import check_output_folder, staged_folder
from ..checkpoint import save
from ..group_plan import POLICIES, plan
from ..initialize import INITS
from ..models import load_model, resolve_source
from ..surgery import convert
from .finetune import add_distill_arguments, run_fidelity
from . import deploy as deploy_cli
from . import export as onnx_cli
from .stages import Stages

SHOWN_FALLBACKS = 5


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The group-plan options shared by every command that converts."""
    g = parser.add_argument_group("group plan")
    g.add_argument("--groups", "-g", type=int, default=32, help="GroupNorm groups per layer (default 32)")
    g.add_argument("--group-size", type=int, help="channels per group, instead of --groups")
    g.add_argument("--policy", choices=POLICIES, default="divisor",
                   help="when the groups do not divide a layer's channels: largest divisor <= G "
                   "(divisor, default), gcd(G, C), or refuse (strict)")
    g.add_argument("--init", choices=INITS, default="bn-stats",
                   help="GroupNorm affine init: from the BatchNorm statistics (default) or identity")
    g.add_argument("--include", action="append", metavar="PATTERN",
                   help="convert only layers whose name matches (fnmatch; repeatable)")
    g.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave layers whose name matches as BatchNorm (fnmatch; repeatable)")
    g.add_argument("--skip-unsupportable", action="store_true",
                   help="leave layers whose groups would hold one value as BatchNorm, instead of failing")
    g.add_argument("--allow-no-bn", action="store_true",
                   help="accept a model without BatchNorm (a no-op) instead of failing")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``convert`` command (also the default when a model name comes first)."""
    p = sub.add_parser(
        "convert", help="convert a torchvision model (the default command)",
        description="Convert a torchvision model's BatchNorm layers to GroupNorm and write the "
        "checkpoint and report.json into --out.",
    )
    p.add_argument("model", help="torchvision model name (`gn-convert list` shows them)")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (torchvision's pretrained weights; downloaded or cached), a weights "
                   "name (IMAGENET1K_V1), none (untrained; works offline), or a local file")
    p.add_argument("--num-classes", type=int, help="classifier size, for untrained or local weights")
    p.add_argument("--out", "-o", type=Path, help="output folder (default ./gn-MODEL)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--format", choices=("safetensors", "pt"), default="safetensors",
                   help="weights file format (default safetensors)")
    add_plan_arguments(p)
    onnx_cli.add_pipeline_arguments(p)
    deploy_cli.add_pipeline_arguments(p)
    add_distill_arguments(p, steps_flag="--finetune-steps", default_steps=0)


def plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`gn_convert.plan` from parsed options."""
    return dict(
        groups=args.groups, group_size=args.group_size, policy=args.policy, include=args.include,
        exclude=args.exclude, on_single="skip" if args.skip_unsupportable else "error",
        allow_no_bn=args.allow_no_bn,
    )


def versions() -> dict[str, str]:
    """Versions of the packages that determine the result."""
    found = {"gn_convert": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchvision", "onnx", "onnxruntime", "onnxscript"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def run(args: argparse.Namespace) -> int:
    """Run the pipeline; returns the exit code."""
    out = check_output_folder(args.out or Path(f"gn-{args.model}"), args.force)
    deploy_cli.check_pipeline_arguments(args, out)
    source = resolve_source(args.model, args.weights)
    stages = Stages()
    with stages("load", f"loading {args.model} (weights: {source.weights})"):
        model = load_model(args.model, args.weights, num_classes=args.num_classes)
    with stages("plan", "planning groups"):
        example = torch.zeros(1, 3, *source.input_size)
        layer_plan = plan(model, example_input=example, **plan_kwargs(args))
    with stages("convert", f"converting ({layer_plan.summary()})"):
        converted = convert(model, plan=layer_plan, init=args.init)
    fidelity = run_fidelity(args, converted, model, args.model, stages)
    with staged_folder(out, args.force) as tmp:
        with stages("save", f"saving to {out}"):
            kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
            save(converted, tmp, plan=layer_plan, architecture=args.model, model_kwargs=kwargs,
                 source_weights=source.weights, weights_format=args.format,
                 extra={"input_size": list(source.input_size), "categories": source.categories})
        onnx_fields = onnx_cli.pipeline_stage(
            args, converted, tmp, source.input_size, keeps_batchnorm=bool(layer_plan.untouched), stages=stages,
            metadata={"source_architecture": args.model, "source_weights": source.weights, "group_plan": layer_plan.summary()})
        triton_fields = deploy_cli.pipeline_stage(args, tmp, out, source.categories, stages,
                                                  parity_failed=onnx_cli.parity_failed(onnx_fields))
        report = {
            "model": args.model,
            "weights": source.weights,
            "init": args.init,
            "summary": layer_plan.summary(),
            "plan": layer_plan.to_dict(),
            **fidelity,
            **onnx_fields,
            **triton_fields,
            "timings_s": stages.timings,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    print(layer_plan.summary())
    for layer in layer_plan.fallbacks[:SHOWN_FALLBACKS]:
        print(f"  fallback {layer.name}: {layer.reason}")
    if len(layer_plan.fallbacks) > SHOWN_FALLBACKS:
        print(f"  ... {len(layer_plan.fallbacks) - SHOWN_FALLBACKS} more fallbacks in report.json")
    print(f"wrote {out} in {stages.total():.1f} s")
    return 1 if onnx_cli.parity_failed(onnx_fields) else 0
