"""``gn-convert finetune CHECKPOINT --data DIR``: distil a converted model from its BatchNorm teacher.

A thin layer over :func:`gn_convert.finetune.run_finetune`: options in, progress bar and summary out.
It loads the converted checkpoint (the student) and its BatchNorm original (the teacher),
optionally calibrates the GroupNorm affines on the data, distils for ``--steps`` with a
progress bar showing loss and agreement, and writes a new checkpoint folder with the
distillation history in ``report.json``. The resumable state lives in ``--state-dir``
(default ``OUT.train-state``, saved every ``--checkpoint-every`` steps); ``--resume``
continues a killed run from it exactly. Under ``torchrun`` the run is data-parallel.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from gn_convert.cli.arguments import (
    ProgressBar,
    add_data_arguments,
    add_distill_arguments,
    fidelity_kwargs,
    fidelity_lines,
    is_main_process,
    stderr_sink,
)
from gn_convert.errors import DataError

if TYPE_CHECKING:  # the parser is built without torch; run() imports the Python entry
    from gn_convert.finetune import FinetuneOptions


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
    add_data_arguments(p)
    add_distill_arguments(p)


def options_from(args: argparse.Namespace) -> FinetuneOptions:
    """The :class:`~gn_convert.finetune.FinetuneOptions` of parsed ``finetune`` options."""
    from gn_convert.finetune import FinetuneOptions

    fidelity = {k: v for k, v in fidelity_kwargs(args).items() if k != "data"}
    return FinetuneOptions(
        checkpoint=args.checkpoint, data=args.data, out=args.out, force=args.force, teacher=args.teacher,
        teacher_weights=args.teacher_weights, num_classes=args.num_classes, state_dir=args.state_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, keep_state=args.keep_state, fidelity=fidelity)


def run(args: argparse.Namespace) -> int:
    """Run the ``finetune`` command (:func:`gn_convert.finetune.run_finetune`); returns the exit code."""
    from gn_convert.finetune import run_finetune
    from gn_convert.stages import Stages

    if args.data is None:
        raise DataError("finetune needs --data DIR (a folder of images or of class subfolders)")
    opts = options_from(args)
    bar = ProgressBar(args.steps)
    try:
        report = run_finetune(opts, stages=Stages(stderr_sink), progress=bar)
    finally:
        bar.close()
    if not is_main_process():
        return 0
    for line in fidelity_lines(report):
        print(line)
    print(f"wrote {opts.output}")
    return 0
