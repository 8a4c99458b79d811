"""BatchNorm -> GroupNorm surgery on any ``nn.Module``.

:func:`convert` applies a :class:`~gn_convert.surgery.plan.GroupPlan`: each planned BatchNorm
layer is replaced, in place of the same attribute, by an ``nn.GroupNorm`` (or, for a norm layer
that also applies an activation, the registry's replacement that keeps it) with the planned
group count, the layer's eps and affine flag, its device, dtype, ``requires_grad`` (the scale's and
the shift's), forward and backward hooks and train/eval mode, and an affine initialised from the
BatchNorm statistics (or identity). A layer registered under several names is replaced by one module
at each of them, so it stays shared. Every other module is left untouched, and the input model is
copied unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn

from gn_convert.errors import GroupPlanError
from gn_convert.surgery.initialize import INITS
from gn_convert.surgery.plan import GroupPlan, OnSingle, batchnorm_layers
from gn_convert.surgery.plan import plan as make_plan
from gn_convert.surgery.registry import BatchNormState, replacement

log = logging.getLogger(__name__)


def group_norm_from(state: BatchNormState, num_groups: int, init: str = "bn-stats") -> nn.GroupNorm:
    """Build the GroupNorm that replaces one BatchNorm layer.

    Args:
        state: the BatchNorm layer's state.
        num_groups: groups; must divide ``state.num_channels``.
        init: ``bn-stats`` (data-free init from the running statistics) or ``identity``.

    Returns:
        A GroupNorm on the layer's device and dtype, in the layer's train/eval mode.
    """
    gn = nn.GroupNorm(num_groups, state.num_channels, eps=state.eps, affine=state.affine,
                      device=state.device, dtype=state.dtype)
    if state.affine:
        weight, bias = INITS[init](state, num_groups)
        with torch.no_grad():
            gn.weight.copy_(weight)
            gn.bias.copy_(bias)
        gn.weight.requires_grad_(state.requires_grad)
        gn.bias.requires_grad_(state.requires_grad if state.bias_requires_grad is None else state.bias_requires_grad)
    gn.train(state.training)
    return gn


HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
         "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")
"""A module's hook tables: a replacement takes them over (the same tables, so a handle the user holds on a
layer converted in place still removes its hook)."""


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward and backward hooks registered on ``old`` (they now see ``new``)."""
    for table in HOOKS:
        if getattr(old, table, None):
            setattr(new, table, getattr(old, table))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def convert(
    model: nn.Module,
    groups: int | None = 32,
    *,
    group_size: int | None = None,
    policy: str = "divisor",
    min_channels_per_group: int | None = None,
    init: str = "bn-stats",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    fold: Iterable[str] | None = None,
    on_single: OnSingle = "error",
    allow_no_bn: bool = False,
    example_input: torch.Tensor | None = None,
    plan: GroupPlan | None = None,
    inplace: bool = False,
    dp_ready: bool = False,
    prove: bool = True,
) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` with GroupNorm.

    Args:
        model: any module with BatchNorm1d/2d/3d, SyncBatchNorm or FrozenBatchNorm2d layers
            (and their subclasses).
        groups, group_size, policy, min_channels_per_group, include, exclude, on_single, allow_no_bn,
        example_input:
            how to plan the groups; see :func:`gn_convert.plan`. Ignored when ``plan`` is given.
        fold: fnmatch patterns of BatchNorm layers to fold into the convolution before them
            instead of converting them (exact, proved on ``example_input`` or a probe input; see
            :mod:`gn_convert.surgery.fold`). Ignored when ``plan`` is given (its ``fold`` actions count).
        init: ``bn-stats`` (default; data-free init from the BatchNorm statistics) or
            ``identity`` (weight 1, bias 0, as Opacus does).
        plan: a precomputed plan (from :func:`gn_convert.plan` or a saved checkpoint).
        inplace: modify ``model`` itself instead of a deep copy.
        prove: prove folded layers exact on the example (False only for placeholder weights
            that are overwritten next, as :func:`gn_convert.load_converted` does).
        dp_ready: also make the result trainable under Opacus DP-SGD as it is, with the same outputs
            and gradients (proved on ``example_input`` or a probe built from the first layer, and in
            training mode; see :func:`gn_convert.surgery.dp.make_dp_ready`).

    Returns:
        The converted module (``model`` itself when ``inplace``).

    Raises:
        GroupPlanError, UnsupportableLayerError, NoBatchNormError: see :func:`gn_convert.plan`.
    """
    if init not in INITS:
        raise GroupPlanError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if plan is None:
        plan = make_plan(model, groups, group_size=group_size, policy=policy,
                         min_channels_per_group=min_channels_per_group, include=include,
                         exclude=exclude, fold=fold, on_single=on_single, allow_no_bn=allow_no_bn,
                         example_input=example_input)
    target = model if inplace else copy.deepcopy(model)
    if plan.folded:
        from gn_convert.surgery.equivalence import probe_input
        from gn_convert.surgery.fold import fold_batchnorm

        example = example_input if example_input is not None else probe_input(target)
        fold_batchnorm(target, [layer.name for layer in plan.folded], example, prove=prove)
    found = {name: (module, state) for name, module, state in batchnorm_layers(target)}
    aliases: dict[int, list[str]] = {}  # a layer registered under several names is replaced at each of them
    for name, module in target.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    for layer in plan.converted:
        module, state = found.get(layer.name, (None, None))
        if module is None or state is None or layer.num_groups is None:
            raise GroupPlanError(f"the plan names {layer.name}, which is not a BatchNorm layer of this model")
        if state.num_channels != layer.num_channels:
            raise GroupPlanError(
                f"the plan gives {layer.name} {layer.num_channels} channels, the model has {state.num_channels}"
            )
        new = replacement(module, group_norm_from(state, layer.num_groups, init))
        _carry_hooks(module, new)
        for name in aliases.get(id(module), [layer.name]):
            _set_submodule(target, name, new)
    log.info("converted: %s", plan.summary())
    if dp_ready:
        from gn_convert.surgery.dp import make_dp_ready

        target = make_dp_ready(target, example_input)
    return target
