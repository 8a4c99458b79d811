"""Registry from BatchNorm layer types to readers of their state.

Surgery and planning never test for concrete classes: they ask this registry. A reader turns
one BatchNorm-like module into a :class:`BatchNormState` (channels, eps, affine parameters,
running statistics, mode), so a new BatchNorm flavour is supported by registering one reader.
Lookup walks the module's MRO, so subclasses of a registered type are found too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
        requires_grad: whether the affine parameters are trained.
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


Reader = Callable[[nn.Module], BatchNormState]
_READERS: dict[type, Reader] = {}
_MIN_RANK = ((nn.BatchNorm3d, 5), (nn.BatchNorm2d, 4))


def register_batchnorm(cls: type) -> Callable[[Reader], Reader]:
    """Decorator: register ``reader`` as the state reader of ``cls`` and its subclasses."""

    def wrap(reader: Reader) -> Reader:
        _READERS[cls] = reader
        return reader

    return wrap


def read_batchnorm(module: nn.Module) -> BatchNormState | None:
    """Return the state of ``module`` if it is a registered BatchNorm type, else None."""
    for klass in type(module).__mro__:
        reader = _READERS.get(klass)
        if reader is not None:
            return reader(module)
    return None


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer this package converts."""
    return any(klass in _READERS for klass in type(module).__mro__)


def _tensor_meta(*tensors: torch.Tensor | None) -> tuple[torch.device, torch.dtype]:
    for t in tensors:
        if t is not None:
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@register_batchnorm(nn.modules.batchnorm._BatchNorm)
def _read_torch_batchnorm(bn: nn.Module) -> BatchNormState:
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
    )


@register_batchnorm(FrozenBatchNorm2d)
def _read_frozen_batchnorm(bn: nn.Module) -> BatchNormState:
    """torchvision's FrozenBatchNorm2d: affine and statistics are buffers, never trained."""
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
