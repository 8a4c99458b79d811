"""The fidelity stage of the main command: calibrate, then distil, as one call with a report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from gn_convert.errors import DataError
from gn_convert.fidelity.calibrate.engine import calibrate
from gn_convert.fidelity.distill.engine import distill
from gn_convert.fidelity.pairs import TRAINED_WEIGHTS_HINT, check_trained
from gn_convert.load.weights import default_weights_enum
from gn_convert.stages import Stages

log = logging.getLogger(__name__)


def run_fidelity(student: nn.Module, teacher: nn.Module, architecture: str, *, data: str | Path | None = None,
                 calibrate_batches: int = 0, calibrate_method: str = "variance", calibrate_order: str = "greedy",
                 steps: int = 0, batch_size: int = 32, seed: int = 0, holdout: float = 0.1,
                 input_size: int | None = None, stages: Stages | None = None,
                 callback: Callable[[Any], None] | None = None, **distill_options: Any) -> dict[str, Any]:
    """Calibrate (``calibrate_batches`` batches) then distil (``steps``) ``student`` in place.

    Args:
        student: the converted model.
        teacher: its BatchNorm original.
        architecture: the torchvision name, for the model's preprocessing of folder images.
        data: a folder of images or of class subfolders.
        calibrate_batches, calibrate_method, calibrate_order: see :func:`gn_convert.calibrate`
            (0 batches: no calibration).
        steps, batch_size, seed, holdout, input_size, distill_options: see :func:`gn_convert.distill`
            (0 steps: no distillation).
        stages: the stage timer.
        callback: called after every distillation step (progress).

    Returns:
        JSON-ready reports under ``calibration`` and ``finetune`` (absent when not run).

    Raises:
        DataError: calibration or distillation is asked for without ``data``.
        UntrainedTeacherError: the teacher was never trained (``weights="none"``).
    """
    report: dict[str, Any] = {}
    if not (calibrate_batches or steps):
        return report
    if data is None:
        raise DataError("calibration and distillation need data: a folder of images or of class subfolders (--data)")
    check_trained(teacher, TRAINED_WEIGHTS_HINT)
    stages = stages or Stages()
    weights = default_weights_enum(architecture)
    common = dict(batch_size=batch_size, seed=seed, weights=weights, input_size=input_size, holdout=holdout)
    if calibrate_batches:
        with stages("calibrate", f"calibrating on {calibrate_batches} batches of {data}"):
            cal = calibrate(student, teacher, data, batches=calibrate_batches, method=calibrate_method,
                            order=calibrate_order, **common)
        report["calibration"] = cal.to_dict()
        log.info(cal.summary())
    if steps:
        result = distill(student, teacher, data, steps=steps, callback=callback, **common, **distill_options)
        stages.timings["finetune"] = round(result.seconds, 3)
        report["finetune"] = result.to_dict()
    return report
