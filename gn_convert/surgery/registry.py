"""Registry from BatchNorm layer types to readers of their state and builders of their replacement.

Surgery and planning never test for concrete classes: they ask this registry. A reader turns
one BatchNorm-like module into a :class:`BatchNormState` (channels, eps, affine parameters,
running statistics, mode), so a new BatchNorm flavour is supported by registering one reader.
A replacement builder (:func:`register_replacement`) turns the plain ``nn.GroupNorm`` that
surgery made into the module that takes the layer's place, for layers that compute more than
a normalisation (timm's ``BatchNormAct2d`` applies an activation and a drop inside the layer:
it becomes timm's ``GroupNormAct`` with the same activation and drop).

Lookup walks the module's MRO, so subclasses of a registered type are found too. Types of an
optional library are registered by qualified name (``"timm.layers.norm_act.BatchNormAct2d"``),
so the library is never imported here. A subclass that overrides ``forward`` below every
registered type computes something the registry does not know: :func:`unknown_forward` names
it, and planning refuses it rather than silently dropping what its ``forward`` adds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


@dataclass
class BatchNormState:
    """What a GroupNorm replacement needs to know about one BatchNorm layer.

    Attributes:
        num_channels: number of channels C.
        eps: the layer's epsilon, copied to the GroupNorm.
        affine: whether the layer has a learnable scale and shift.
        weight: per-channel scale (C,), or None when not affine.
        bias: per-channel shift (C,), or None when not affine.
        running_mean: population mean (C,), or None when statistics are not tracked.
        running_var: population variance (C,), or None when statistics are not tracked.
        requires_grad: whether the affine scale is trained.
        bias_requires_grad: whether the affine shift is trained (None: as the scale).
        training: the module's train/eval mode.
        min_rank: the smallest input rank the layer accepts (2 for (N, C) input).
        device: device of the layer's tensors.
        dtype: floating dtype of the layer's tensors.
    """

    num_channels: int
    eps: float
    affine: bool
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    requires_grad: bool
    training: bool
    min_rank: int
    device: torch.device
    dtype: torch.dtype
    bias_requires_grad: bool | None = None


Reader = Callable[[nn.Module], BatchNormState]
Builder = Callable[[nn.Module, nn.GroupNorm], nn.Module]
TypeKey = type | str  # a class, or "module.QualName" for a class of an optional library
_READERS: dict[TypeKey, Reader] = {}
_BUILDERS: dict[TypeKey, Builder] = {}
_MIN_RANK = ((nn.BatchNorm3d, 5), (nn.BatchNorm2d, 4))


def qualified_name(klass: type) -> str:
    """``module.QualName`` of a class, as types of optional libraries are registered."""
    return f"{klass.__module__}.{klass.__qualname__}"


def _entry(table: dict[TypeKey, Callable[..., Any]], klass: type) -> Callable[..., Any] | None:
    """``table``'s entry for exactly ``klass``, registered by class or by qualified name."""
    return table.get(klass) or table.get(qualified_name(klass))


def _lookup(table: dict[TypeKey, Callable[..., Any]], module: nn.Module) -> Callable[..., Any] | None:
    """The entry of the first class in ``module``'s MRO that ``table`` has."""
    return next((entry for klass in type(module).__mro__ if (entry := _entry(table, klass)) is not None), None)


def register_batchnorm(*classes: TypeKey) -> Callable[[Reader], Reader]:
    """Decorator: register ``reader`` as the state reader of ``classes`` and their subclasses."""

    def wrap(reader: Reader) -> Reader:
        for cls in classes:
            _READERS[cls] = reader
        return reader

    return wrap


def register_replacement(*classes: TypeKey) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(bn, group_norm) -> module`` as the replacement of ``classes``.

    The builder receives the original layer and the ``nn.GroupNorm`` that surgery built for it
    (groups, eps, initialised affine, dtype, device, mode) and returns the module that takes
    the layer's place. Types without a builder are replaced by that GroupNorm itself.
    """

    def wrap(builder: Builder) -> Builder:
        for cls in classes:
            _BUILDERS[cls] = builder
        return builder

    return wrap


def read_batchnorm(module: nn.Module) -> BatchNormState | None:
    """Return the state of ``module`` if it is a registered BatchNorm type, else None."""
    reader = _lookup(_READERS, module)
    return reader(module) if reader is not None else None


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer this package converts."""
    return _lookup(_READERS, module) is not None


def replacement(module: nn.Module, group_norm: nn.GroupNorm) -> nn.Module:
    """The module that replaces BatchNorm layer ``module``, given the GroupNorm built for it."""
    builder = _lookup(_BUILDERS, module)
    return builder(module, group_norm) if builder is not None else group_norm


def unknown_forward(module: nn.Module) -> str | None:
    """The qualified name of the class whose ``forward`` the registry does not understand, or None.

    A registered BatchNorm type whose ``forward`` comes from a subclass with neither a reader
    nor a replacement registered for it may compute more than a normalisation (an activation,
    a mask, ...) that a plain GroupNorm would silently drop.
    """
    if not is_batchnorm(module):
        return None
    owner = next(k for k in type(module).__mro__ if "forward" in vars(k))
    known = _entry(_READERS, owner) is not None or _entry(_BUILDERS, owner) is not None
    return None if known else qualified_name(owner)


def _tensor_meta(*tensors: torch.Tensor | None) -> tuple[torch.device, torch.dtype]:
    for t in tensors:
        if t is not None:
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@register_batchnorm(nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
def _read_torch_batchnorm(bn: Any) -> BatchNormState:
    """BatchNorm1d/2d/3d, SyncBatchNorm and every subclass of torch's ``_BatchNorm``."""
    device, dtype = _tensor_meta(bn.weight, bn.running_mean)
    min_rank = next((rank for klass, rank in _MIN_RANK if isinstance(bn, klass)), 2)
    return BatchNormState(
        num_channels=bn.num_features,
        eps=float(bn.eps),
        affine=bool(bn.affine),
        weight=bn.weight.detach() if bn.affine else None,
        bias=bn.bias.detach() if bn.affine else None,
        running_mean=bn.running_mean.detach() if bn.running_mean is not None else None,
        running_var=bn.running_var.detach() if bn.running_var is not None else None,
        requires_grad=bool(bn.affine and bn.weight.requires_grad),
        training=bn.training,
        min_rank=min_rank,
        device=device,
        dtype=dtype,
        bias_requires_grad=bool(bn.affine and bn.bias.requires_grad),
    )


_TIMM = "timm.layers.norm_act"
"""Where timm defines its norm-act layers from 0.9 on (the floor of the ``timm`` extra; ``timm.models.layers``
re-exports the same classes)."""


@register_batchnorm(FrozenBatchNorm2d, f"{_TIMM}.FrozenBatchNormAct2d")
def _read_frozen_batchnorm(bn: Any) -> BatchNormState:
    """torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d: affine and statistics are
    buffers, never trained."""
    return BatchNormState(
        num_channels=bn.weight.numel(),
        eps=float(bn.eps),
        affine=True,
        weight=bn.weight.detach(),
        bias=bn.bias.detach(),
        running_mean=bn.running_mean.detach(),
        running_var=bn.running_var.detach(),
        requires_grad=False,
        training=bn.training,
        min_rank=4,
        device=bn.weight.device,
        dtype=bn.weight.dtype,
    )


@register_replacement(*(f"{_TIMM}.{name}" for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")))
def _norm_act_replacement(bn: Any, group_norm: nn.GroupNorm) -> nn.Module:
    """timm's norm + drop + activation layers -> timm's ``GroupNormAct`` with copies of the
    layer's own ``drop`` and ``act`` modules (same activation, same in-place flag, same eps)."""
    from timm.layers import GroupNormAct  # the model is made of timm layers, so timm is installed

    out = GroupNormAct(group_norm.num_channels, group_norm.num_groups, eps=group_norm.eps,
                       affine=group_norm.affine, apply_act=False)  # no device=/dtype= before timm 1.0.17
    if group_norm.weight is not None:
        out = out.to(device=group_norm.weight.device, dtype=group_norm.weight.dtype)
    out.load_state_dict(group_norm.state_dict())
    for mine, theirs in zip(out.parameters(), group_norm.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    out.drop, out.act = copy.deepcopy(bn.drop), copy.deepcopy(bn.act)
    return out.train(group_norm.training)
