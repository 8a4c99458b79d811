"""Data-free initialisation of GroupNorm affine parameters from BatchNorm statistics.

For group g with channels S_g, let M_g be the mean of ``running_mean`` over S_g and
V_g = mean over S_g of (running_var + (running_mean - M_g)^2): the population mean and
variance of the whole group. GroupNorm normalises a channel c with (M_g, V_g) where BatchNorm
used (mean_c, var_c), so the affine that reproduces BatchNorm's output is

    weight'_c = weight_c * sqrt(V_g + eps) / sqrt(var_c + eps)
    bias'_c   = bias_c + weight_c * (M_g - mean_c) / sqrt(var_c + eps)

It is exact when each sample's group statistics equal the population's (see DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gn_convert.surgery.registry import BatchNormState


def identity_affine(state: BatchNormState, num_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight 1 and bias 0: what Opacus does (the learned function is lost); ``num_groups`` is unused."""
    ones = torch.ones(state.num_channels, device=state.device, dtype=state.dtype)
    return ones, torch.zeros_like(ones)


def bn_stats_affine(state: BatchNormState, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm (weight, bias) that reproduce a BatchNorm layer from its running statistics.

    Computed in float64 and cast to the layer's dtype. A layer without running statistics
    keeps its own weight and bias (nothing better is known without data).

    Args:
        state: the BatchNorm layer's state (see :mod:`gn_convert.surgery.registry`).
        num_groups: the GroupNorm's group count; must divide ``state.num_channels``.

    Returns:
        (weight, bias), each of shape (C,).
    """
    weight, bias = identity_affine(state)
    if state.weight is not None and state.bias is not None:  # affine
        weight, bias = state.weight.clone(), state.bias.clone()
    if state.running_mean is None or state.running_var is None:
        return weight, bias
    w, b = weight.double(), bias.double()
    mean, var = state.running_mean.double(), state.running_var.double().clamp_min(0)
    grouped_mean = mean.view(num_groups, -1)
    group_mean = grouped_mean.mean(dim=1, keepdim=True)
    group_var = (var.view(num_groups, -1) + (grouped_mean - group_mean) ** 2).mean(dim=1, keepdim=True)
    inv_std = torch.rsqrt(var + state.eps)
    new_weight = w * (torch.sqrt(group_var + state.eps).expand_as(grouped_mean).reshape(-1) * inv_std)
    new_bias = b + w * (group_mean.expand_as(grouped_mean).reshape(-1) - mean) * inv_std
    return new_weight.to(state.dtype), new_bias.to(state.dtype)


#: init name -> affine (weight, bias) from a BatchNorm state and a group count; the CLI's choices are its keys
INITS: dict[str, Callable[[BatchNormState, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "bn-stats": bn_stats_affine,
    "identity": identity_affine,
}
