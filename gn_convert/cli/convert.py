"""``gn-convert MODEL``: the whole pipeline (:func:`gn_convert.pipeline.run_pipeline`) on a
torchvision model, with progress on stderr and a summary on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gn_convert.cli import deploy as deploy_cli
from gn_convert.cli.arguments import (
    BudgetBar,
    ProgressBar,
    add_data_arguments,
    add_distill_arguments,
    add_native_library_argument,
    add_plan_arguments,
    add_recover_arguments,
    add_target_argument,
    fidelity_kwargs,
    fidelity_lines,
    plan_kwargs,
    recover_kwargs,
    stderr_sink,
)
from gn_convert.errors import OptionError

if TYPE_CHECKING:  # the parser is built without torch; run() imports the pipeline
    from gn_convert.pipeline import PipelineOptions

PARITY_BATCH = 2
"""The default larger batch of the parity check (:data:`gn_convert.pipeline.PARITY_BATCH`)."""

SHOWN_FALLBACKS = 5
DENSE_SCORES = {"miou": "mIoU", "feature_r2": "feature R^2", "box_recall": "boxes found", "box_precision": "right"}
"""Scores a dense task's recovery adds (per-pixel agreement's mean IoU; detection features' R^2 and the share of
the teacher's confident detections the student finds, and of its own that the teacher has:
:mod:`gn_convert.fidelity.boxes`)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``convert`` command (also the default when a model name comes first).

    Its options are grouped by pipeline stage, in the order the stages run: model and weights, group
    plan, fidelity (data, recovery, calibration and distillation), DP, ONNX export and parity, Triton,
    output.
    """
    p = sub.add_parser(
        "convert", help="convert a torchvision model of any task, or a timm model (the default command)",
        usage="gn-convert [convert] MODEL [options]",
        description="Convert a torchvision model's BatchNorm layers to GroupNorm and write the "
        "checkpoint, model.onnx (checked for parity) and report.json into --out. Every stage after "
        "the group plan is optional; the groups below follow the order the stages run.",
        epilog="Examples and every option in detail: docs/USAGE.md.",
    )
    g = p.add_argument_group("model and weights")
    g.add_argument("model", help="torchvision model name (classification, segmentation, detection, video), or "
                   "timm/NAME (`gn-convert list` shows them)")
    g.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (torchvision's pretrained weights; downloaded or cached), a weights "
                   "name (IMAGENET1K_V1), none (untrained; works offline), or a local file")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size, for untrained or local weights")
    g.add_argument("--weights-backbone", metavar="WEIGHTS",
                   help="segmentation and detection models with --weights none: the backbone's pretrained weights "
                   "(DEFAULT: torchvision's default for the model; or a weights name), downloaded or cached "
                   "(default: none, an untrained backbone)")
    add_plan_arguments(p)
    add_data_arguments(p)
    add_recover_arguments(p)
    add_distill_arguments(p, steps_flag="--finetune-steps", default_steps=0)
    g = p.add_argument_group("differential privacy (Opacus)")
    g.add_argument("--dp-ready", action="store_true",
                   help="make the saved model trainable under Opacus DP-SGD as it is (activations and in-place "
                   "operations out of place; gn_convert.load_converted gives it back DP-ready)")
    g = p.add_argument_group("ONNX export and parity")
    g.add_argument("--no-onnx", action="store_true", help="do not write model.onnx (nor check its parity)")
    add_target_argument(g, "--onnx-target")
    g.add_argument("--no-parity", action="store_true", help="do not check model.onnx against the model")
    g.add_argument("--parity-batch", type=int, default=PARITY_BATCH, metavar="N",
                   help=f"larger batch of the parity check (default {PARITY_BATCH})")
    g.add_argument("--native", action="store_true",
                   help="also check model.onnx on gn-convert's native GroupNorm kernel and, with --triton-repo, "
                   "ship the kernel with the model")
    add_native_library_argument(g)
    deploy_cli.add_pipeline_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", type=Path, metavar="DIR", help="output folder (default ./gn-MODEL)")
    g.add_argument("--force", action="store_true", help="replace an existing output folder that gn-convert wrote")
    g.add_argument("--format", choices=("safetensors", "pt"), default="safetensors",
                   help="weights file format (default safetensors)")
    p.set_defaults(parser=p)


def options_from(args: argparse.Namespace) -> PipelineOptions:
    """The :class:`PipelineOptions` of parsed ``convert`` options.

    Raises:
        OptionError: ``--data`` (or ``--eval-data``) without a stage that uses it, which would
            silently be ignored.
    """
    from gn_convert.pipeline import PipelineOptions

    unused = [flag for flag, value in (("--data", args.data), ("--eval-data", args.eval_data)) if value is not None]
    if unused and not (args.calibrate or args.steps or args.recover):
        raise OptionError(f"{' and '.join(unused)} given, but no stage uses data: add --calibrate N, --finetune-steps N "
                          f"or --recover, or drop {unused[0]}")

    return PipelineOptions(
        model=args.model, weights=args.weights, num_classes=args.num_classes, weights_backbone=args.weights_backbone,
        input_size=args.input_size, out=args.out, force=args.force,
        weights_format=args.format, plan=plan_kwargs(args, getattr(args, "parser", None)), init=args.init,
        dp_ready=args.dp_ready,
        fidelity=fidelity_kwargs(args), recover=recover_kwargs(args, getattr(args, "parser", None)),
        onnx=not args.no_onnx, onnx_target=args.onnx_target,
        parity=not args.no_parity, parity_batch=args.parity_batch, native=args.native,
        native_library=args.native_library, triton_repo=args.triton_repo, triton_name=args.triton_name,
        triton_instance=args.triton_instance)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What the command prints on stdout once the output folder is written."""
    layers = report["plan"]["layers"]
    fallbacks = [layer for layer in layers if layer["action"] == "convert" and layer["fallback"]]
    lines = [report["summary"], *(f"  fallback {layer['name']}: {layer['reason']}" for layer in fallbacks[:SHOWN_FALLBACKS])]
    if len(fallbacks) > SHOWN_FALLBACKS:
        lines.append(f"  ... {len(fallbacks) - SHOWN_FALLBACKS} more fallbacks in report.json")
    recovery = report.get("recovery")
    if recovery:
        lines += [f"recovery on {recovery['heldout']} held-out views of {recovery['heldout_photos']} photos, "
                  f"{recovery['seconds']:.0f} s (held-out agreement, KL, fit on the training photos):"]
        lines += [f"  {s['name']:12} {s['seconds']:7.1f} s  agreement {_fraction(s['agreement'])}  "
                  f"KL {_number(s['scores'].get('kl'))}  fit {_fraction(s['scores'].get('fit'))}"
                  + "".join(f"  {label} {_fraction(s['scores'][key])}" for key, label in DENSE_SCORES.items()
                            if s["scores"].get(key) is not None)
                  for s in recovery["stages"]]
        lines += [f"  warning: {w}" for w in recovery["warnings"]]
    return lines + fidelity_lines(report)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run(args: argparse.Namespace) -> int:
    """Run the pipeline; returns the exit code (1 when the parity check failed)."""
    from gn_convert.pipeline import parity_failed, run_pipeline
    from gn_convert.stages import Stages

    opts = options_from(args)
    bar = BudgetBar(args.budget) if args.recover else ProgressBar(args.steps) if args.steps else None
    try:
        report = run_pipeline(opts, stages=Stages(stderr_sink), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    parity = report.get("parity")
    if parity:
        print(f"parity {'passed' if parity['passed'] else 'FAILED'} on {', '.join(parity['providers'])} "
              f"({len(parity['rows'])} comparisons, worst max_rel {parity['worst_max_rel']:.1e})", file=sys.stderr)
        for line in parity["failures"]:
            print(f"  {line}", file=sys.stderr)
    if report.get("triton", {}).get("skipped"):
        print(f"gn-convert: not writing Triton model {report['triton']['name']}: the ONNX model failed its parity "
              "check (see report.json)", file=sys.stderr)
    print("\n".join(summary_lines(report)))
    print(f"wrote {opts.output} in {sum(report['timings_s'].values()):.1f} s")
    return 1 if parity_failed(report) else 0
