"""BatchNorm statistics: re-estimating them on data, and making them non-trivial for tests.

An untrained torchvision model has running_mean 0 and running_var 1 in every layer, which
makes BatchNorm an identity and hides conversion errors. :func:`estimate_batchnorm_stats`
sets the statistics to their population values over some inputs (real images in the tests),
and :func:`randomize_batchnorm_affine` gives the affine parameters seeded random values, so a
converted model has something real to reproduce.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gn_convert.modes import eval_mode
from gn_convert.surgery.plan import batchnorm_layers


@torch.no_grad()
def estimate_batchnorm_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm layer's running statistics to their average over ``batches``.

    Uses cumulative averaging (momentum=None) in train mode, then restores each layer's
    momentum and every module's own mode. FrozenBatchNorm2d layers are left as they are.

    Args:
        model: the model, modified in place.
        batches: input tensors (N, C, ...).

    Returns:
        ``model``.
    """
    layers = [m for _, m, _ in batchnorm_layers(model) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    with eval_mode(model):
        for m in layers:
            m.train()
        try:
            for batch in batches:
                model(batch)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
    return model


@torch.no_grad()
def randomize_batchnorm_affine(model: nn.Module, seed: int = 0, spread: float = 0.5) -> nn.Module:
    """Give every BatchNorm affine seeded random values: weight in [1-spread, 1+spread],
    bias ~ N(0, spread/2). Modifies ``model`` in place and returns it."""
    gen = torch.Generator().manual_seed(seed)
    for _, module, state in batchnorm_layers(model):
        if not state.affine:
            continue
        c = state.num_channels
        weight = 1 + spread * (2 * torch.rand(c, generator=gen) - 1)
        bias = spread / 2 * torch.randn(c, generator=gen)
        getattr(module, "weight").copy_(weight.to(state.dtype))  # noqa: B009 (nn.Module's attributes are untyped)
        getattr(module, "bias").copy_(bias.to(state.dtype))  # noqa: B009
    return model
