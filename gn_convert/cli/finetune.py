"""``gn-convert finetune CHECKPOINT --teacher MODEL --data DIR``: distil a converted model.

Loads the converted checkpoint (the student) and its BatchNorm original (the teacher),
optionally calibrates the GroupNorm affines on the data, distils for ``--steps`` with a
progress bar showing loss and agreement, and writes a new checkpoint folder with the
distillation history in ``report.json``. The resumable state lives in ``--state-dir``
(default ``OUT.train-state``, saved every ``--checkpoint-every`` steps); ``--resume``
continues a killed run from it exactly. Under ``torchrun`` the run is data-parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import check_output_folder, staged_folder
from ..calibrate import METHODS, ORDERS, calibrate
from ..checkpoint import load_converted, read_config, save
from ..data import DataError
from ..errors import GnConvertError
from ..finetune import TRAINABLE, DistillResult, StepInfo, distill
from ..group_plan import GroupPlan
from ..models import default_weights_enum, load_model
from .stages import Stages


def add_distill_arguments(parser: argparse.ArgumentParser, steps_flag: str = "--steps",
                          default_steps: int | None = 200) -> None:
    """The data, calibration and distillation options shared by ``finetune`` and ``convert``."""
    g = parser.add_argument_group("data, calibration and distillation")
    g.add_argument("--data", type=Path, help="folder of images (plain, unlabelled) or of class "
                   "subfolders (labelled) for calibration and distillation")
    g.add_argument("--eval-data", type=Path, help="separate held-out folder (default: --holdout of --data)")
    g.add_argument("--holdout", type=float, default=0.1, help="fraction of --data held out for evaluation (0.1)")
    g.add_argument("--input-size", type=int, help="crop side in pixels (default: the model's preset)")
    g.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="calibrate the GroupNorm affines on N batches of --data first (default 0: off)")
    g.add_argument("--calibrate-method", choices=METHODS, default="variance", help="calibration fit (variance)")
    g.add_argument("--calibrate-order", choices=ORDERS, default="greedy",
                   help="calibration order (greedy, the best measured; independent is one cheap pass)")
    g.add_argument(steps_flag, dest="steps", type=int, default=default_steps, metavar="N",
                   help=f"distillation steps (default {default_steps or 0})")
    g.add_argument("--batch-size", type=int, default=32, help="global batch per step (32)")
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per step per process (1)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (1e-4; "
                   "try 1e-2 with --trainable gn-affine)")
    g.add_argument("--trainable", choices=TRAINABLE, default="all", help="parameters to train (all)")
    g.add_argument("--gn-lr-scale", type=float, default=1.0, help="lr multiplier of GroupNorm affines (1)")
    g.add_argument("--temperature", type=float, default=2.0, help="KL temperature (2)")
    g.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy weight with labels (0: off)")
    g.add_argument("--feature-weight", type=float, default=0.0, help="GroupNorm-output loss weight (0: off)")
    g.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations (25)")
    g.add_argument("--target-agreement", type=float, help="stop once held-out agreement reaches this (0-1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, data order and augmentation (0)")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes (0)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips in training augmentation")


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a single process): the only one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


class ProgressBar:
    """A tqdm bar driven by :func:`gn_convert.distill`'s callback, opened at the first step
    (so errors before training print alone) and only on rank 0."""

    def __init__(self, total: int, label: str = "distilling") -> None:
        self.total, self.label, self.bar = total, label, None
        self.enabled = is_main_process()

    def __call__(self, info: StepInfo) -> None:
        """Show the step, the loss and the last measured agreement."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=info.step - 1, desc=self.label, unit="step",
                            dynamic_ncols=True)
        self.bar.n = info.step
        shown = {"loss": f"{info.loss:.4f}"}
        if info.agreement is not None:
            shown["agree"] = f"{info.agreement:.3f}"
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        """Close the bar if it was opened."""
        if self.bar is not None:
            self.bar.close()


def run_fidelity(args: argparse.Namespace, student: Any, teacher: Any, architecture: str,
                 stages: Stages, state_dir: Path | None = None) -> dict[str, Any]:
    """Calibrate (``--calibrate N``) then distil (``--steps N``) ``student`` in place.

    Does nothing when neither is asked for.

    Raises:
        DataError: calibration or distillation is asked for without ``--data``.

    Returns:
        JSON-ready reports under ``calibration`` and ``finetune`` (absent when not run).
    """
    report: dict[str, Any] = {}
    if not (args.calibrate or args.steps):
        return report
    if args.data is None:
        raise DataError("calibration and distillation need --data DIR (a folder of images or of class subfolders)")
    weights = default_weights_enum(architecture)
    if args.calibrate:
        with stages("calibrate", f"calibrating on {args.calibrate} batches of {args.data}"):
            cal = calibrate(student, teacher, args.data, batches=args.calibrate, batch_size=args.batch_size,
                            method=args.calibrate_method, order=args.calibrate_order, seed=args.seed,
                            weights=weights, input_size=args.input_size, holdout=args.holdout)
        report["calibration"] = cal.to_dict()
        if is_main_process():
            print(cal.summary())
    if args.steps:
        result = _distill(args, student, teacher, weights, state_dir)
        stages.timings["finetune"] = round(result.seconds, 3)
        report["finetune"] = result.to_dict()
        if is_main_process():
            print(_result_line(result))
    return report


def _distill(args: argparse.Namespace, student: Any, teacher: Any, weights: Any,
             state_dir: Path | None) -> DistillResult:
    bar = ProgressBar(args.steps)
    try:
        return distill(
            student, teacher, args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            trainable=args.trainable, gn_lr_scale=args.gn_lr_scale, temperature=args.temperature,
            ce_weight=args.ce_weight, feature_weight=args.feature_weight, eval_every=args.eval_every,
            target_agreement=args.target_agreement, eval_data=args.eval_data, weights=weights,
            input_size=args.input_size, callback=bar, accumulate=args.accumulate, seed=args.seed,
            holdout=args.holdout, flip=not args.no_flip, num_workers=args.workers,
            checkpoint_dir=state_dir, checkpoint_every=getattr(args, "checkpoint_every", 0),
            resume=getattr(args, "resume", False),
        )
    finally:
        bar.close()


def _result_line(result: DistillResult) -> str:
    acc = "" if result.accuracy is None else f", accuracy {result.accuracy:.3f}"
    teacher = "" if result.teacher_accuracy is None else f" (teacher {result.teacher_accuracy:.3f})"
    early = " (target reached)" if result.stopped_early else ""
    return (f"distilled {result.steps} steps{early}: held-out agreement {result.agreement:.3f}"
            f"{acc}{teacher} on {result.heldout} images")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``finetune`` command."""
    p = sub.add_parser(
        "finetune", help="distil a converted checkpoint from its BatchNorm teacher",
        description="Knowledge-distillation fine-tune of a converted checkpoint: the teacher is "
        "the BatchNorm original; the result is a new checkpoint folder (--out).",
    )
    p.add_argument("checkpoint", type=Path, help="converted checkpoint folder (from `gn-convert MODEL`)")
    p.add_argument("--teacher", help="torchvision model name of the teacher (default: the checkpoint's)")
    p.add_argument("--teacher-weights", help="teacher weights: DEFAULT, a weights name, or a file "
                   "(default: the checkpoint's source weights)")
    p.add_argument("--num-classes", type=int, help="classifier size of a teacher weights file")
    p.add_argument("--out", "-o", type=Path, help="output folder (default CHECKPOINT-finetuned)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--state-dir", type=Path, help="resumable state folder (default OUT.train-state)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between state saves (50)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from --state-dir")
    p.add_argument("--keep-state", action="store_true", help="keep --state-dir after success")
    add_distill_arguments(p)


def _teacher(args: argparse.Namespace, config: dict[str, Any]) -> tuple[str, Any]:
    architecture = args.teacher or config.get("architecture")
    weights = args.teacher_weights or config.get("source_weights") or "DEFAULT"
    if not architecture:
        raise GnConvertError(f"{args.checkpoint} holds a custom model; pass --teacher MODEL")
    num_classes = args.num_classes
    local = weights.lower() == "none" or os.path.exists(weights)
    if num_classes is None and local and architecture == config.get("architecture"):
        num_classes = config.get("model_kwargs", {}).get("num_classes")
    if not local and "_Weights." in weights:  # recorded as ResNet50_Weights.IMAGENET1K_V2
        weights = weights.split(".")[-1]
    return architecture, load_model(architecture, weights, num_classes=num_classes)


def run(args: argparse.Namespace) -> int:
    """Run the ``finetune`` command; returns the exit code."""
    if args.data is None:
        raise DataError("finetune needs --data DIR (a folder of images or of class subfolders)")
    out = check_output_folder(args.out or Path(f"{args.checkpoint}-finetuned"), args.force)
    state_dir = args.state_dir or out.with_name(out.name + ".train-state")
    config = read_config(args.checkpoint)
    stages = Stages(quiet=not is_main_process())
    with stages("load", f"loading {args.checkpoint} and its teacher"):
        student = load_converted(args.checkpoint)
        architecture, teacher = _teacher(args, config)
    report = run_fidelity(args, student, teacher, architecture, stages, state_dir)
    if not is_main_process():
        return 0
    with staged_folder(out, args.force) as tmp:
        keep = {k: v for k, v in config.items() if k not in ("format", "gn_convert_version", "torch_version",
                                                             "architecture", "model_kwargs", "source_weights",
                                                             "weights_file", "plan")}
        save(student, tmp, plan=GroupPlan.from_dict(config["plan"]), architecture=config.get("architecture"),
             model_kwargs=config.get("model_kwargs"), source_weights=config.get("source_weights"),
             weights_format="pt" if config.get("weights_file", "").endswith(".pt") else "safetensors",
             extra=keep)
        (tmp / "report.json").write_text(json.dumps({"source": str(args.checkpoint), **report,
                                                     "timings_s": stages.timings}, indent=2))
    if not args.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"wrote {out}")
    return 0
