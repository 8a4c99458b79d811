"""``gn-convert finetune CHECKPOINT --data DIR``: distil a converted model from its BatchNorm teacher.

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

from gn_convert.atomic import check_output_folder, staged_folder
from gn_convert.cli.arguments import (
    ProgressBar,
    add_distill_arguments,
    fidelity_kwargs,
    fidelity_lines,
    is_main_process,
    stderr_sink,
)
from gn_convert.errors import CheckpointError, DataError


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
    """The teacher: ``--teacher``/``--teacher-weights``, else what the checkpoint records.

    Raises:
        CheckpointError: a custom model without ``--teacher``, or a checkpoint converted from
            untrained weights without ``--teacher-weights`` (a new random teacher on every run,
            resume and rank would make the numbers meaningless).
    """
    from gn_convert.load.weights import load_model

    architecture = args.teacher or config.get("architecture")
    recorded = config.get("source_weights") or "DEFAULT"
    weights = args.teacher_weights or recorded
    if not architecture:
        raise CheckpointError(f"{args.checkpoint} holds a custom model; pass --teacher MODEL")
    if weights.lower() == "none":
        raise CheckpointError(f"{args.checkpoint} was converted from untrained weights (--weights none): there is "
                              "no teacher to distil from; pass --teacher-weights FILE (the BatchNorm weights)")
    num_classes = args.num_classes
    if num_classes is None and os.path.exists(weights) and architecture == config.get("architecture"):
        num_classes = config.get("model_kwargs", {}).get("num_classes")
    return architecture, load_model(architecture, weights, num_classes=num_classes)


def run(args: argparse.Namespace) -> int:
    """Run the ``finetune`` command; returns the exit code."""
    from gn_convert.fidelity.stage import run_fidelity
    from gn_convert.stages import Stages
    from gn_convert.surgery.checkpoint import load_converted, read_config, save
    from gn_convert.surgery.plan import GroupPlan

    if args.data is None:
        raise DataError("finetune needs --data DIR (a folder of images or of class subfolders)")
    out = check_output_folder(args.out or Path(f"{args.checkpoint}-finetuned"), args.force)
    state_dir = args.state_dir or out.with_name(out.name + ".train-state")
    config = read_config(args.checkpoint)
    stages = Stages(stderr_sink)
    with stages("load", f"loading {args.checkpoint} and its teacher"):
        student = load_converted(args.checkpoint)
        architecture, teacher = _teacher(args, config)
    bar = ProgressBar(args.steps)
    try:
        report = run_fidelity(student, teacher, architecture, stages=stages, callback=bar,
                              checkpoint_dir=state_dir, checkpoint_every=args.checkpoint_every,
                              resume=args.resume, **fidelity_kwargs(args))
    finally:
        bar.close()
    for line in fidelity_lines(report) if is_main_process() else []:
        print(line)
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
