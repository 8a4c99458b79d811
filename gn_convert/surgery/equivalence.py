"""Proof by value that a rewrite of a model kept its function: outputs compared on a probe input.

A rewrite of a user's model (``make_dp_ready``'s out-of-place forward, a flag turned off)
is checked where it runs: the rewritten model and a copy of the original get the same probe
input, in training and in evaluation mode (with the same random seed, so dropout draws the same
masks), and every output tensor must agree. When they do not, the module to blame is found by
comparing every module's output, in the order the modules return, and named in the error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gn_convert.errors import UnsupportableLayerError
from gn_convert.modes import training_mode

RELATIVE_TOLERANCE = 1e-5  # a reordered float sum; a silent change of function is orders larger
_SEED = 20181


def probe_input(model: nn.Module, batch: int = 2, size: int = 64) -> torch.Tensor:
    """A seeded random input for the model's first convolution or linear layer: ``(batch, C, size, ...)``
    for a ConvNd, ``(batch, in_features)`` for a Linear.

    Raises:
        UnsupportableLayerError: the model has neither (pass an example input).
    """
    gen = torch.Generator().manual_seed(_SEED)
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = (size,) * (module.weight.dim() - 2)
            return torch.randn(batch, module.in_channels, *spatial, generator=gen, dtype=module.weight.dtype)
        if isinstance(module, nn.Linear):
            return torch.randn(batch, module.in_features, generator=gen, dtype=module.weight.dtype)
    raise UnsupportableLayerError("cannot tell the model's input shape from its first layer; pass an example "
                                  "input (example_input= / example=)")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _difference(a: Any, b: Any) -> float:
    """Largest error relative to the reference's scale; inf when the structures differ."""
    left, right = list(_tensors(a)), list(_tensors(b))
    if len(left) != len(right) or any(x.shape != y.shape for x, y in zip(left, right)):
        return float("inf")
    worst = 0.0
    for x, y in zip(left, right):
        if x.numel():
            scale = 1.0 + float(x.detach().abs().max())
            worst = max(worst, float((x.detach().double() - y.detach().double()).abs().max()) / scale)
    return worst


def _run(model: nn.Module, example: torch.Tensor, training: bool) -> Any:
    with torch.random.fork_rng(devices=[]), torch.no_grad(), training_mode(model, training=training):
        torch.manual_seed(_SEED)
        return model(example.clone())


def _module_outputs(model: nn.Module, example: torch.Tensor, training: bool) -> list[tuple[str, list[torch.Tensor]]]:
    """Every module's output, copied when it returns (later in-place code cannot change it)."""
    seen: list[tuple[str, list[torch.Tensor]]] = []
    handles = [module.register_forward_hook(
        lambda _m, _i, out, name=name: seen.append((name, [t.detach().clone() for t in _tensors(out)])))
        for name, module in model.named_modules()]
    try:
        _run(model, example, training)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def first_differing_module(original: nn.Module, rewritten: nn.Module, example: torch.Tensor,
                           training: bool) -> str:
    """The name of the first module, in the order modules return, whose output differs."""
    before = _module_outputs(original, example, training)
    after = dict(_module_outputs(rewritten, example, training)[::-1])  # first call of each name wins
    for name, outputs in before:
        if name in after and _difference(outputs, after[name]) > RELATIVE_TOLERANCE:
            return name or "the model itself"
    return "the model itself"


def assert_same_function(original: nn.Module, rewritten: nn.Module, example: torch.Tensor, what: str) -> float:
    """Prove on ``example`` that ``rewritten`` computes what ``original`` computed.

    Both are run in training and in evaluation mode (each module's mode is restored) with the
    same random seed. Returns the largest relative difference found (0.0 for an exact rewrite).

    Raises:
        UnsupportableLayerError: an output differs beyond :data:`RELATIVE_TOLERANCE`; the message
            names the first module whose output differs.
    """
    worst = 0.0
    for training in (True, False):
        difference = _difference(_run(original, example, training), _run(rewritten, example, training))
        if difference > RELATIVE_TOLERANCE:
            name = first_differing_module(original, rewritten, example, training)
            mode = "training" if training else "evaluation"
            raise UnsupportableLayerError(
                f"{what} changed what the model computes ({mode} mode, relative difference {difference:.3g} on a "
                f"probe input; first differing module: {name}); rewrite its in-place code out of place by hand")
        worst = max(worst, difference)
    return worst
