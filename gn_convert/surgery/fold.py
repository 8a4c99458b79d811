"""Folding BatchNorm layers into the convolution before them: frozen layers keep their function exactly.

A user who fine-tunes only the last stage of a network (the DP study's recipe) need not convert
the BatchNorm layers of the stages they freeze: in evaluation mode a BatchNorm after a
convolution is an affine map per channel, which the convolution absorbs,

    W' = W * s,   b' = (b - running_mean) * s + beta,   s = gamma / sqrt(running_var + eps),

so the network computes the same function with no normalisation layer there at all (nothing
for Opacus to refuse, nothing for GroupNorm to approximate). The BatchNorm becomes
``nn.Identity`` (or, for a norm-act layer, its drop and activation).

Preconditions, each checked; a layer that breaks one is refused by name:

- its input is exactly the output of one ``Conv1d/2d/3d`` or ``Linear`` module, found by running
  the model once on an example (the convolution ``feeds`` it);
- that convolution's output is read by nothing else (folding changes it for every reader): the
  folded model is compared with the original on the example, in evaluation mode, and must agree.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from gn_convert.difference import relative_error
from gn_convert.errors import UnsupportableLayerError
from gn_convert.modes import eval_mode
from gn_convert.surgery.observe import norm_tail
from gn_convert.surgery.registry import read_batchnorm

log = logging.getLogger(__name__)

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def feeders(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, str]:
    """For each BatchNorm layer in ``names``, the module whose output is its input (one forward pass).

    Raises:
        UnsupportableLayerError: some layers are not fed directly by a convolution or linear
            layer, or never run on the example (all named at once).
    """
    modules = dict(model.named_modules())
    made: dict[int, tuple[str, torch.Tensor]] = {}  # the outputs are kept, so no id is reused during the pass
    found: dict[str, str] = {}

    def producer(x: Any) -> str:
        name, out = made.get(id(x), ("", None))
        return name if out is x else ""

    def fed(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the input is unchanged
            if args and name not in found:
                found[name] = producer(args[0])
        return hook

    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: made.__setitem__(id(out), (n, out)))
               for n, m in modules.items() if isinstance(m, FOLDABLE)]
    handles += [modules[n].register_forward_pre_hook(fed(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    bad = [n for n in names if not found.get(n)]
    if bad:
        raise UnsupportableLayerError(
            f"cannot fold {', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''}: its input is not the output of a "
            "convolution or linear layer (or it did not run on the example); convert it instead, or leave it "
            "out of the fold patterns")
    return found


def _fold_one(conv: nn.Module, bn: nn.Module) -> None:
    """Absorb ``bn``'s evaluation-mode affine map into ``conv`` (in place)."""
    state = read_batchnorm(bn)
    assert state is not None and state.running_var is not None and state.running_mean is not None
    weight, old_bias = conv.weight, conv.bias
    assert isinstance(weight, nn.Parameter) and (old_bias is None or isinstance(old_bias, nn.Parameter))
    scale = (state.weight if state.weight is not None else torch.ones_like(state.running_var)) \
        / torch.sqrt(state.running_var + state.eps)
    shift = state.bias if state.bias is not None else torch.zeros_like(state.running_mean)
    with torch.no_grad():
        weight.mul_(scale.to(weight).view((-1,) + (1,) * (weight.dim() - 1)))
        bias = old_bias if old_bias is not None else torch.zeros_like(state.running_mean)
        new_bias = (bias.to(scale) - state.running_mean) * scale + shift
        if old_bias is None:
            conv.bias = nn.Parameter(new_bias.to(weight), requires_grad=weight.requires_grad)
        else:
            old_bias.copy_(new_bias)


def _tail(bn: nn.Module) -> nn.Module:
    """What stays of a folded layer: nothing, or a norm-act layer's drop and activation."""
    if norm_tail(bn) is None:
        return nn.Identity()
    drop, act = getattr(bn, "drop"), getattr(bn, "act")  # noqa: B009 - typed as modules by norm_tail's check
    return nn.Sequential(copy.deepcopy(drop), copy.deepcopy(act))


def fold_batchnorm(model: nn.Module, names: list[str], example: torch.Tensor, *, prove: bool = True) -> dict[str, str]:
    """Fold the BatchNorm layers ``names`` of ``model`` (in place) into the layers that feed them.

    Args:
        model: the model (its other layers are left as they are).
        names: qualified names of BatchNorm layers with running statistics.
        example: an input batch the model accepts (to find the feeders and check the result).
        prove: compare the folded model with the original on ``example`` (False only where the
            weights are placeholders about to be overwritten, as when a checkpoint is loaded).

    Returns:
        BatchNorm name -> the name of the convolution it was folded into.

    Raises:
        UnsupportableLayerError: a layer has no direct convolution feeder, a layer tracks no
            running statistics, or the folded model computes something else on ``example``.
    """
    if not names:
        return {}
    modules = dict(model.named_modules())
    untracked = [n for n in names if getattr(read_batchnorm(modules[n]), "running_var", None) is None]
    if untracked:
        raise UnsupportableLayerError(f"cannot fold {', '.join(untracked[:5])}: it tracks no running statistics")
    found = feeders(model, names, example)
    with eval_mode(model), torch.no_grad():
        before = model(example) if prove else None
    for name in names:
        _fold_one(modules[found[name]], modules[name])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _tail(modules[name]))
    if before is None:
        return found
    with eval_mode(model), torch.no_grad():
        after = model(example)
    error = relative_error(before, after)
    if not error <= 1e-4:
        raise UnsupportableLayerError(f"folding {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} changed the "
                                      f"model's output (relative error {error:.1e}): a folded convolution's output is "
                                      "read elsewhere too; fold fewer layers")
    log.info("folded %d BatchNorm layers into their convolutions (relative error %.1e on the example)",
             len(names), error)
    return found
