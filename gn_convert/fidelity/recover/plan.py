"""What a recovery settles before it trains: the group plan, and how long one distillation step takes.

The plan goes through :func:`gn_convert.plan` (the fidelity policy measures each layer's candidates on
training views); an already converted student embodies its own plan. The step time comes from a few
steps of the real distillation on a copy, so the step count planned for a budget is the count that runs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from gn_convert.data.sources import DataSplit
from gn_convert.fidelity.distill.engine import distill
from gn_convert.fidelity.group_search import layer_errors
from gn_convert.fidelity.pairs import norm_pairs
from gn_convert.surgery.plan import FIDELITY, GroupPlan, LayerPlan
from gn_convert.surgery.plan import plan as make_plan

PLAN_BATCHES = 4
"""Batches of training views the fidelity policy measures its candidates on."""
PROBE_STEPS = 4
"""Distillation steps timed (on a copy) to plan how many fit in the budget."""


def student_plan(student: nn.Module, teacher: nn.Module) -> GroupPlan:
    """The plan an already converted student embodies (its GroupNorm layers, matched to the teacher's)."""
    layers = [LayerPlan(p.name, type(p.teacher).__name__, p.student.num_channels, p.student.num_groups,
                        p.student.eps, p.student.affine) for p in norm_pairs(student, teacher)]
    return GroupPlan(None, None, "given", layers)


def group_plan(teacher: nn.Module, batches: Iterator[torch.Tensor], options: dict[str, Any]) -> GroupPlan:
    """The group plan through :func:`gn_convert.plan`; the fidelity policy measures on training views."""
    images = [next(batches) for _ in range(PLAN_BATCHES if options["policy"] == FIDELITY else 1)]
    measure = layer_errors(teacher, images) if options["policy"] == FIDELITY else None
    return make_plan(teacher, example_input=images[0][:1], measure=measure, **options)


def step_seconds(student: nn.Module, teacher: nn.Module, train: Dataset, options: dict[str, Any],
                  device: torch.device) -> float:
    """Seconds of one distillation step: :data:`PROBE_STEPS` steps of the real distillation, with the same
    options, on a copy, timed between steps (rank 0's; the other ranks return 1). A probe of the forward and
    backward passes alone left out loading, the GroupNorm-output loss and the optimiser step, and planned
    20-50% more steps than EfficientNet-Lite0 then ran."""
    stamps: list[float] = []
    distill(copy.deepcopy(student), teacher, DataSplit(train, None, False), steps=PROBE_STEPS,
            eval_every=PROBE_STEPS + 1, device=device, callback=lambda _info: stamps.append(time.perf_counter()),
            **options)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2] * 1.05 if gaps else 1.0
