"""The measurement behind the fidelity policy of :func:`gn_convert.plan`: per layer, how close each
candidate group count keeps its output to BN's.

The plan itself is made by :func:`gn_convert.plan` (``policy="fidelity"``, ``measure=``
:func:`layer_errors`); :func:`fidelity_plan` is that call in one line. For each BatchNorm layer with
C channels, every divisor G' of C up to the requested G (and with at least
``min_channels_per_group`` channels per group) is a candidate. On the teacher's own inputs to the
layer, the candidate's normalised output (GroupNorm without affine) is fitted to the BatchNorm
output channel by channel (the variance-preserving fit of :mod:`gn_convert.fidelity.calibrate.moments`), and
the candidate whose fit leaves the smallest error (1 - R^2, averaged over channels) is chosen. All
candidates of all layers are measured in the same passes over the data, so the cost is a few teacher
forward passes.

The choice is recorded per layer in the plan (``measured_error`` and a reason that lists the error
of the requested count beside it), so the plan is reproducible and inspectable. It is an option
(``policy="fidelity"``), never a silent change: fewer groups are closer to LayerNorm, and users who
want G=32 for its training behaviour (Wu & He: ImageNet error 24.1% at G=32, 25.3% at G=1, 28.4% as
instance norm) keep the default plan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from gn_convert.errors import GroupPlanError
from gn_convert.fidelity.calibrate.moments import Moments
from gn_convert.fidelity.pairs import forward_hooks
from gn_convert.modes import eval_mode
from gn_convert.surgery.plan import FIDELITY, GroupPlan, Measure, batchnorm_layers
from gn_convert.surgery.plan import plan as default_plan

log = logging.getLogger(__name__)

POLICY = FIDELITY


def measure_errors(teacher: nn.Module, images: Iterable[torch.Tensor], options: dict[str, list[int]],
                   eps: dict[str, float]) -> dict[str, dict[int, float]]:
    """Per layer and candidate group count, 1 - R^2 of the best per-channel affine from GN to BN output.

    Args:
        teacher: the BatchNorm model (eval mode).
        images: batches of inputs.
        options: layer name -> candidate group counts.
        eps: layer name -> epsilon.
    """
    modules = dict(teacher.named_modules())
    moments: dict[str, dict[int, Moments]] = {}

    def hook_for(name: str):  # noqa: ANN202 - a forward hook
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            per = moments.setdefault(name, {g: Moments(x.shape[1], x.device) for g in options[name]})
            for g, m in per.items():
                m.update(F.group_norm(x, g, eps=eps[name]), output)
        return hook

    with forward_hooks([(modules[n], hook_for(n)) for n in options]), eval_mode(teacher), torch.no_grad():
        for x in images:
            teacher(x)
    errors: dict[str, dict[int, float]] = {}
    for name, per in moments.items():
        errors[name] = {}
        for g, m in per.items():
            slope, intercept, r2 = m.fit("variance")
            errors[name][g] = float(1 - r2.clamp(max=1).mean())
    return errors


def layer_errors(teacher: nn.Module, images: Iterable[torch.Tensor]) -> Measure:
    """The ``measure`` of :func:`gn_convert.plan`'s fidelity policy: each candidate's error on ``images``.

    Raises:
        GroupPlanError: no images.
    """
    batches = list(images)
    if not batches:
        raise GroupPlanError("the fidelity plan needs some images (real or synthetic) to measure on")
    states = {name: state for name, _, state in batchnorm_layers(teacher)}

    def measure(options: dict[str, list[int]]) -> dict[str, dict[int, float]]:
        return measure_errors(teacher, batches, options, {n: states[n].eps for n in options})
    return measure


def fidelity_plan(teacher: nn.Module, images: Iterable[torch.Tensor], groups: int = 32, *,
                  min_channels_per_group: int | None = None, example_input: torch.Tensor | None = None,
                  **plan_options: object) -> GroupPlan:
    """``gn_convert.plan(teacher, groups, policy="fidelity", measure=layer_errors(teacher, images))``.

    Args:
        teacher: the BatchNorm model.
        images: a few batches of inputs (real or synthetic), on the teacher's device.
        groups: the largest group count allowed per layer (the requested G).
        min_channels_per_group: the smallest group allowed (default as in :func:`gn_convert.plan`; 1 allows
            instance norm).
        example_input: as in :func:`gn_convert.plan` (defaults to the first batch).
        **plan_options: ``include``, ``exclude``, ``on_single``, ``allow_no_bn`` of :func:`gn_convert.plan`.

    Returns:
        The plan, policy ``fidelity``; each converted layer's ``measured_error`` and reason say why.

    Raises:
        GroupPlanError: no images.
    """
    batches = list(images)
    measure = layer_errors(teacher, batches)
    result = default_plan(teacher, groups, policy=POLICY, min_channels_per_group=min_channels_per_group,
                          measure=measure, example_input=example_input if example_input is not None else batches[0][:1],
                          **plan_options)  # type: ignore[arg-type]
    log.info("fidelity plan: %s", result.summary())
    return result
