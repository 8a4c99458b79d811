"""Observing a norm layer's normalised output, also when the layer applies an activation after it.

timm's norm layers (``BatchNormAct2d``, and the ``GroupNormAct`` that replaces it) normalise,
then apply their ``drop`` and ``act`` modules inside the same ``forward``; the layer's output
is the activation's. Everything that compares a GroupNorm with the BatchNorm it replaced
(calibration's affine fits, feature losses, parity's per-layer localisation against the ONNX
GroupNorm node) needs the normalised output before the activation. :func:`register_output_hook`
gives a forward hook exactly that: the layer's own output for a plain norm, the input of its
``drop`` (cloned, since the activation may run in place) for a norm-act layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gn_convert.surgery.registry import is_batchnorm

Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


def norm_tail(module: nn.Module) -> nn.Module | None:
    """The first module a norm-act layer applies after normalising (its ``drop``), or None for a plain norm."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if not (isinstance(drop, nn.Module) and isinstance(act, nn.Module)):
        return None
    return drop if isinstance(module, nn.GroupNorm) or is_batchnorm(module) else None


class _Handles:
    """Removes several hook handles at once."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def register_output_hook(module: nn.Module, hook: Hook) -> Any:
    """Register ``hook(module, inputs, normalised_output)`` on a norm layer (or any module).

    For a plain module this is ``module.register_forward_hook(hook)`` (a returned value replaces
    the output, as usual). For a norm-act layer the hook sees the layer's inputs and the
    normalised output before ``drop`` and ``act``; its return value is ignored.

    Returns:
        A handle whose ``remove()`` removes every hook it registered.
    """
    tail = norm_tail(module)
    if tail is None:
        return module.register_forward_hook(hook)
    seen: list[tuple[Any, ...]] = [()]

    def keep_inputs(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen[0] = args

    def at_tail(_tail: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        hook(module, seen[0], args[0].clone())

    return _Handles(module.register_forward_pre_hook(keep_inputs), tail.register_forward_pre_hook(at_tail))
