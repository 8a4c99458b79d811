"""Proof by value that a change to a model kept its function: outputs, parameter gradients and
buffers compared on probe inputs, on copies.

A change to a user's model (``make_dp_ready``'s copies and rewrites) is checked where it runs. The
changed model and the original are deep-copied (the caller's model is never run here) and each
copy gets the same sequence of probe inputs, in training and then in evaluation mode, with the same
random seed (dropout draws the same masks; the GPU's random state is saved and restored as well as
the CPU's). After each forward pass a seeded random projection of the outputs is differentiated,
and every output, every parameter's gradient, every buffer (running statistics, counters) and the
input itself (a forward may modify its input in place) must agree, NaN-aware
(:func:`gn_convert.difference.relative_error`). A probe can refute a change, never prove it
right in general; the probes include inputs 20 times the unit scale, where saturating activations
(``Hardtanh``, ``ReLU6``) start to matter. When outputs differ, the module to blame is found by
comparing every module's output, in the order the modules return, and named in the error.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gn_convert.difference import relative_error
from gn_convert.errors import UnsupportableLayerError, first_line
from gn_convert.modes import training_mode

RELATIVE_TOLERANCE = 1e-6
"""Largest relative difference accepted; the changes proved here run the same kernels, so a change
of function is orders larger."""
PROBE_SCALES = (1.0, 20.0)
_SEED = 20181


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (the CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def probe_input(model: nn.Module, batch: int = 2, size: int = 64) -> torch.Tensor:
    """A seeded random input for the model's first convolution or linear layer, on the model's device:
    ``(batch, C, size, ...)`` for a ConvNd, ``(batch, in_features)`` for a Linear.

    Raises:
        UnsupportableLayerError: the model has neither (pass an example input).
    """
    gen = torch.Generator().manual_seed(_SEED)
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = (size,) * (module.weight.dim() - 2)
            shape: tuple[int, ...] = (batch, module.in_channels, *spatial)
        elif isinstance(module, nn.Linear):
            shape = (batch, module.in_features)
        else:
            continue
        return torch.randn(shape, generator=gen, dtype=module.weight.dtype).to(module.weight.device)
    raise UnsupportableLayerError("cannot tell the model's input shape from its first layer; pass an example "
                                  "input (example_input= / example=)")


def probe_inputs(model: nn.Module, example: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The probes of a proof: ``example`` (or :func:`probe_input`) at each of :data:`PROBE_SCALES`, and
    a second seeded random input of its shape; all on the model's device."""
    base = probe_input(model) if example is None else example.to(model_device(model))
    gen = torch.Generator().manual_seed(_SEED + 1)
    other = torch.randn(base.shape, generator=gen, dtype=base.dtype).to(base.device) if base.is_floating_point() \
        else base
    return [base * scale for scale in PROBE_SCALES] + [other]


@contextlib.contextmanager
def seeded(device: torch.device) -> Iterator[None]:
    """Seed torch's random state for the block and restore the caller's afterwards (the CPU's, and
    the GPU's where ``device`` is one)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        yield


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested output (tensors, dicts, lists, tuples), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_of(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_of(item)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_detached(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _projection(output: Any) -> torch.Tensor | None:
    """A seeded random projection of every differentiable output tensor (None when there is none)."""
    gen = torch.Generator().manual_seed(_SEED + 2)
    terms = [(t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum()
             for t in tensors_of(output) if t.requires_grad and t.is_floating_point()]
    return torch.stack(terms).sum() if terms else None


def _step(model: nn.Module, probe: torch.Tensor, training: bool) -> dict[str, Any]:
    """One forward pass and one gradient of a random projection; what the pass produced."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with seeded(probe.device), training_mode(model, training=training):
        x = probe.clone()
        output = model(x)
    loss = _projection(output)
    grads: tuple[torch.Tensor | None, ...] = (None,) * len(params)
    if loss is not None and params:
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {"output": _detached(output), "input": x.detach(),
            "gradients": {name: None if g is None else g.detach() for (name, _), g in zip(params, grads)},
            "buffers": {name: b.detach().clone() for name, b in model.named_buffers()}}


def _module_outputs(model: nn.Module, probe: torch.Tensor, training: bool) -> list[tuple[str, list[torch.Tensor]]]:
    """Every module's output, copied when it returns (later in-place code cannot change it)."""
    seen: list[tuple[str, list[torch.Tensor]]] = []
    handles = [module.register_forward_hook(
        lambda _m, _i, out, name=name: seen.append((name, [t.detach().clone() for t in tensors_of(out)])))
        for name, module in model.named_modules()]
    try:
        with seeded(probe.device), training_mode(model, training=training), torch.no_grad():
            model(probe.clone())
    finally:
        for handle in handles:
            handle.remove()
    return seen


def first_differing_module(original: nn.Module, changed: nn.Module, probe: torch.Tensor, training: bool) -> str:
    """The name of the first module, in the order modules return, whose output differs (on copies)."""
    before = _module_outputs(copy.deepcopy(original), probe, training)
    after = dict(_module_outputs(copy.deepcopy(changed), probe, training)[::-1])  # first call of each name wins
    for name, outputs in before:
        if name in after and not relative_error(outputs, after[name]) <= RELATIVE_TOLERANCE:
            return name or "the model itself"
    return "the model itself"


_PARTS = {"output": "output", "gradients": "gradient of", "buffers": "buffer", "input": "input"}


def _compare(want: dict[str, Any], got: dict[str, Any]) -> tuple[str | None, float]:
    """The first part that differs between two steps (the output, a gradient, a buffer, the input) or
    None, and the largest error seen up to there."""
    worst = 0.0
    for part, label in _PARTS.items():
        a, b = want[part], got[part]
        pairs = {name: (a[name], b[name]) for name in a} if isinstance(a, dict) and list(a) == list(b) \
            else {"": (a, b)}
        for name, (x, y) in pairs.items():
            error = relative_error(x, y)
            if not error <= RELATIVE_TOLERANCE:
                return f"{label} {name}".strip(), error
            worst = max(worst, error)
    return None, worst


def assert_same_function(original: nn.Module, changed: nn.Module, probes: torch.Tensor | list[torch.Tensor],
                         what: str, copy_changed: bool = True) -> float:
    """Prove on ``probes`` that ``changed`` computes what ``original`` computes: outputs, parameter
    gradients, buffers and the input after the pass, in training and evaluation mode.

    ``original`` is deep-copied first and never run or modified; so is ``changed``, unless
    ``copy_changed`` is False (a throwaway candidate: one model copy less in memory).

    Returns:
        The largest relative difference found (0.0 for an exact change).

    Raises:
        UnsupportableLayerError: something differs beyond :data:`RELATIVE_TOLERANCE`; the message says
            what (the output, a parameter's gradient, a buffer), in which mode and on which probe, and
            for an output the first module whose output differs.
    """
    probes = [probes] if isinstance(probes, torch.Tensor) else probes
    reference, candidate = copy.deepcopy(original), copy.deepcopy(changed) if copy_changed else changed
    worst = 0.0
    for training in (True, False):
        for index, probe in enumerate(probes):
            try:
                want = _step(reference, probe, training)
            except RuntimeError as err:
                raise UnsupportableLayerError(
                    f"cannot prove {what}: the model itself fails on a probe input ({first_line(err)[:160]}); "
                    "it cannot be trained as it is") from None
            try:
                got = _step(candidate, probe, training)
            except RuntimeError as err:
                raise UnsupportableLayerError(f"{what} broke the model: it fails on a probe input where the model "
                                              f"runs ({first_line(err)[:160]}); the model is left as it was") from None
            part, error = _compare(want, got)
            if part is None:
                worst = max(worst, error)
                continue
            mode = "training" if training else "evaluation"
            where = f"; first differing module: {first_differing_module(original, changed, probe, training)}" \
                if part == "output" else ""
            raise UnsupportableLayerError(
                f"{what} changed what the model computes: its {part} differs ({mode} mode, relative difference "
                f"{error:.3g} on probe {index + 1} of {len(probes)}{where}); the model is left as it was")
    return worst
