"""The ``finetune`` command as one Python function: distil a converted checkpoint from its BatchNorm
teacher and write a new checkpoint folder.

``gn-convert finetune CHECKPOINT --data DIR`` parses its options into :class:`FinetuneOptions` and
calls :func:`run_finetune`; everything it does is available here without the CLI::

    from gn_convert.finetune import FinetuneOptions, run_finetune
    report = run_finetune(FinetuneOptions(Path("gn-resnet18"), data=Path("photos"), teacher_weights="bn.pth",
                                          fidelity={"steps": 200}))

The student is the checkpoint's converted model, the teacher its BatchNorm original (what the
checkpoint records, or ``teacher``/``teacher_weights``). The resumable state lives in
``state_dir`` (default ``OUT.train-state``, saved every ``checkpoint_every`` steps); ``resume``
continues a killed run from it exactly. After a successful run the files gn-convert wrote there are
removed (``keep_state`` keeps them); a ``state_dir`` the user named, and anything else in it, stays.
Under ``torchrun`` the run is data-parallel and only rank 0
writes. The output folder is assembled under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from gn_convert import strict_json
from gn_convert.data.folders import check_data
from gn_convert.errors import CheckpointError, DataError
from gn_convert.fidelity.distill.state import STATE_FILE
from gn_convert.output_folder import check_output_folder, refuse_overlap, staged_folder
from gn_convert.ownership import remove_owned
from gn_convert.stages import Stages

#: config.json fields that :func:`gn_convert.save` writes itself (the rest is carried over)
_WRITTEN_BY_SAVE = ("format", "gn_convert_version", "torch_version", "architecture", "model_kwargs",
                    "source_weights", "weights_file", "plan")


@dataclass
class FinetuneOptions:
    """What ``gn-convert finetune`` is asked to do (the CLI's options, by the same names).

    Attributes:
        checkpoint: the converted checkpoint folder (written by ``gn-convert MODEL`` or :func:`gn_convert.save`).
        data: a folder of images (plain or class subfolders).
        out: the new checkpoint folder (default ``CHECKPOINT-finetuned``).
        force: replace an existing ``out`` that gn-convert wrote.
        teacher: the teacher's model name (default: the checkpoint's architecture).
        teacher_weights: the teacher's weights (default: the checkpoint's source weights).
        num_classes: the classifier size of a teacher weights file.
        state_dir: the resumable state folder (default ``OUT.train-state``).
        checkpoint_every: steps between state saves.
        resume: continue a stopped run from ``state_dir``.
        keep_state: keep the state files after success (by default only the files gn-convert wrote
            into ``state_dir`` are removed, and ``state_dir`` itself only when it is the default).
        fidelity: keyword arguments of :func:`gn_convert.fidelity.stage.run_fidelity` (calibration
            and distillation: ``steps``, ``calibrate_batches``, ``lr``, ...), ``data`` excepted.
    """

    checkpoint: Path
    data: str | Path | None = None
    out: Path | None = None
    force: bool = False
    teacher: str | None = None
    teacher_weights: str | None = None
    num_classes: int | None = None
    state_dir: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    keep_state: bool = False
    fidelity: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        """The new checkpoint folder."""
        return Path(self.out or f"{self.checkpoint}-finetuned")


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a single process): the only one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def load_teacher(opts: FinetuneOptions, config: dict[str, Any]) -> tuple[str, nn.Module]:
    """The teacher's name and model: ``teacher``/``teacher_weights``, else what the checkpoint records.

    Raises:
        CheckpointError: a custom model without ``teacher``.
        UntrainedTeacherError: the teacher was never trained (a checkpoint converted from ``weights="none"``
            without ``teacher_weights``: a new random teacher on every run, resume and rank would make the
            numbers meaningless), by the rule every command that distils follows.
    """
    from gn_convert.fidelity.pairs import check_trained
    from gn_convert.load.weights import load_model

    architecture = opts.teacher or config.get("architecture")
    weights = opts.teacher_weights or config.get("source_weights") or "DEFAULT"
    if not architecture:
        raise CheckpointError(f"{opts.checkpoint} holds a custom model; name its teacher (teacher=, --teacher MODEL)")
    num_classes = opts.num_classes
    if num_classes is None and os.path.exists(weights) and architecture == config.get("architecture"):
        num_classes = config.get("model_kwargs", {}).get("num_classes")
    backbone = config.get("weights_backbone") if architecture == config.get("architecture") and not opts.teacher_weights \
        else None  # a dense model converted from a pretrained backbone: its teacher has that backbone too
    teacher = load_model(architecture, weights, num_classes=num_classes, weights_backbone=backbone)
    check_trained(teacher, f"give the BatchNorm weights {opts.checkpoint} was converted from "
                           "(teacher_weights=, --teacher-weights FILE)")
    return architecture, teacher


def run_finetune(opts: FinetuneOptions, *, stages: Stages | None = None,
                 progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Distil the checkpoint from its teacher and write the new checkpoint folder (rank 0).

    Args:
        opts: what to do.
        stages: the stage timer (the CLI's reports each stage on stderr); default silent.
        progress: a callback for the distillation steps (the CLI's progress bar).

    Returns:
        The report (``report.json``): ``calibration`` and ``finetune`` results, timings, the source.

    Raises:
        DataError: no ``data``.
        OutputError: the output folder cannot be written (checked before any work).
        CheckpointError: the checkpoint or its teacher cannot be had.
    """
    from gn_convert.fidelity.stage import run_fidelity
    from gn_convert.surgery.checkpoint import load_converted, read_config, save
    from gn_convert.surgery.plan import GroupPlan

    if opts.data is None:
        raise DataError("finetuning needs data: a folder of images or of class subfolders (data=, --data DIR)")
    check_data(opts.data)
    out = check_output_folder(opts.output, opts.force)
    state_dir = opts.state_dir or out.with_name(out.name + ".train-state")
    refuse_overlap(out, "--out", state_dir, "--state-dir")
    refuse_overlap(Path(opts.checkpoint), "the checkpoint", state_dir, "--state-dir")  # clean-up must not reach it
    if isinstance(opts.data, (str, Path)):
        refuse_overlap(Path(opts.data), "--data", state_dir, "--state-dir")
    config = read_config(opts.checkpoint)
    stages = stages or Stages()
    with stages("load", f"loading {opts.checkpoint} and its teacher"):
        student = load_converted(opts.checkpoint)
        architecture, teacher = load_teacher(opts, config)
    fidelity = run_fidelity(student, teacher, architecture, data=opts.data, stages=stages, callback=progress,
                            checkpoint_dir=state_dir, checkpoint_every=opts.checkpoint_every, resume=opts.resume,
                            **opts.fidelity)
    report = {"source": str(opts.checkpoint), **fidelity, "timings_s": stages.timings}
    if not is_main_process():
        return report
    with staged_folder(out, opts.force) as tmp:
        save(student, tmp, plan=GroupPlan.from_dict(config["plan"]), architecture=config.get("architecture"),
             model_kwargs=config.get("model_kwargs"), source_weights=config.get("source_weights"),
             weights_format="pt" if config.get("weights_file", "").endswith(".pt") else "safetensors",
             extra={k: v for k, v in config.items() if k not in _WRITTEN_BY_SAVE})
        (tmp / "report.json").write_text(strict_json.dumps(report, indent=2))
    if not opts.keep_state:  # the files gn-convert wrote there; a folder the user named stays
        remove_owned(state_dir, remove_folder=opts.state_dir is None, only=[STATE_FILE])
    return report
