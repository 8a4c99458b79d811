"""DP-ready models: a converted network that Opacus validates and trains with DP-SGD as it is, and
that computes exactly what it computed before: the same outputs and the same gradients.

Opacus computes per-sample gradients with a full backward hook on every module that has trainable
parameters of its own. Inside ``nn.Module.__call__`` such a hook hands the module's output on as a
view (``BackwardHookFunction``), and an in-place operation on that view fails the first training
step ("Output 0 of BackwardHookFunction is a view and is being modified inplace", Opacus issue
828): torchvision's ``ReLU(inplace=True)`` after a norm layer, and ``out += identity`` in ResNet
blocks, both do it. :func:`make_dp_ready`

- refuses a model that still has BatchNorm layers (Opacus refuses them);
- gives every module with trainable parameters of its own a call that returns a copy
  (``clone()``) of each output tensor, made after the hooked call returns and only while the module
  has backward hooks (an Opacus run); a copy is the identity in the forward and the backward pass,
  so nothing else changes: not the forward code, not an ``inplace`` flag, not a module's type,
  attributes, hooks or state_dict keys (:class:`CopiedOutputs`, set as the instance's ``_call_impl``);
- only where a module's own forward still modifies a view in place (its input, which the hook also
  wraps), rewrites that module's forward so the operation acts on a copy
  (:mod:`gn_convert.surgery.functionalize`), module by module, innermost first, until one pass
  under the hooks runs;
- **proves the result computes what the model computed**: outputs, parameter gradients and buffers
  on several probe inputs, in training and evaluation mode, on copies
  (:mod:`gn_convert.surgery.equivalence`), and one forward and backward pass under full backward
  hooks, as Opacus registers them (:func:`check_dp_ready`);
- and only then changes the caller's model the same way and puts it in training mode (Opacus
  validates a training model). A refusal names the module and leaves the model as it was.

Opacus's other mode, ``grad_sample_mode="ew"`` (expanded weights, no module hooks), trains an
unchanged model without any of this; measured here it is slower (docs/DP.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_internals

from gn_convert.errors import UnsupportableLayerError, first_line
from gn_convert.surgery.equivalence import assert_same_function, probe_inputs, tensors_of
from gn_convert.surgery.functionalize import install_forward, rewritten_graph
from gn_convert.surgery.registry import is_batchnorm

log = logging.getLogger(__name__)


def _copied(value: Any) -> Any:
    """``value`` with every tensor replaced by a copy (tuples and lists rebuilt, other values kept)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        items = [_copied(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def _has_backward_hooks(module: nn.Module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks
                or getattr(module_internals, "_global_backward_hooks", None)
                or getattr(module_internals, "_global_backward_pre_hooks", None))


class CopiedOutputs:
    """A module's call (its ``_call_impl``) that returns copies of the output tensors while the module
    has backward hooks, so that code after the call never modifies the hook's view in place.

    ``nn.Module.__call__`` calls ``self._call_impl``; an instance attribute of that name takes its
    place for this module alone, outside the hooked part of the call (hooks run inside
    ``type(module)._call_impl``). Pickles and deep-copies with the module.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = type(self.module)._call_impl(self.module, *args, **kwargs)  # type: ignore[no-untyped-call]
        return _copied(output) if _has_backward_hooks(self.module) else output

    def __reduce__(self) -> tuple[Any, ...]:
        return CopiedOutputs, (self.module,)


def hooked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules Opacus hooks: those with trainable parameters of their own."""
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            yield name, module


def copy_hooked_outputs(model: nn.Module) -> int:
    """Give every module Opacus hooks a :class:`CopiedOutputs` call (in place); how many were given one."""
    count = 0
    for _, module in hooked_modules(model):
        if not isinstance(module.__dict__.get("_call_impl"), CopiedOutputs):
            module._call_impl = CopiedOutputs(module)  # type: ignore[method-assign]
            count += 1
    return count


def is_dp_ready(model: nn.Module) -> bool:
    """Whether every module Opacus hooks returns copies of its outputs (see :func:`make_dp_ready`)."""
    return all(isinstance(m.__dict__.get("_call_impl"), CopiedOutputs) for _, m in hooked_modules(model))


class _Failure(Exception):
    """A pass under backward hooks failed: the error's first line and the modules that were running."""

    def __init__(self, message: str, running: list[str]) -> None:
        super().__init__(message)
        self.message, self.running = message, running


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Put back, after the block, each module's mode, every buffer's value and every gradient (None)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        model.zero_grad(set_to_none=True)


def _hooked_pass(model: nn.Module, example: torch.Tensor, hooks: bool = True) -> None:
    """One forward and backward pass of ``model`` in training mode, with (by default) a full backward
    hook on every module Opacus hooks; the model's mode, buffers and gradients are put back after.

    Raises:
        _Failure: the pass failed; with the modules running when it did (outermost first).
    """
    with _state_kept(model):
        _pass(model, example, hooks)


def _pass(model: nn.Module, example: torch.Tensor, hooks: bool) -> None:
    running: list[str] = []
    handles = [m.register_full_backward_hook(lambda *_: None) for _, m in hooked_modules(model)] if hooks else []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: running.append(name)))
        handles.append(module.register_forward_hook(lambda *_: running.pop() and None))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the input needs no grad
            output = model.train()(example.clone())
            terms = [t.float().sum() for t in tensors_of(output) if t.requires_grad]
            if terms:
                torch.autograd.backward(torch.stack(terms).sum())
    except RuntimeError as err:
        raise _Failure(first_line(err)[:200], list(running)) from None
    finally:
        for handle in handles:
            handle.remove()


def _where(running: list[str]) -> str:
    return f" (in {running[-1] or 'the model'})" if running else ""


def check_dp_ready(model: nn.Module, example: torch.Tensor) -> None:
    """Prove on a copy of ``model`` that it trains under Opacus's hooks: one forward and backward pass
    with a full backward hook on every module that has trainable parameters of its own.

    Args:
        model: the model (not run, not modified).
        example: an input batch of at least one sample, on the model's device.

    Raises:
        UnsupportableLayerError: the pass fails as Opacus's first DP-SGD step would (naming the
            module that was running).
    """
    try:
        _hooked_pass(copy.deepcopy(model), example)
    except _Failure as failure:
        raise UnsupportableLayerError(f"the model is not DP-ready: {failure.message}{_where(failure.running)}; "
                                      "convert it with dp_ready=True (--dp-ready)") from None


def _rewrite_until_trainable(candidate: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Rewrite, innermost first, the forward of each module found running where a hooked pass fails,
    until a pass runs; the rewritten graphs by module name.

    Raises:
        UnsupportableLayerError: the model fails on ``example`` without hooks too (the probe does not
            fit it), or a failing module cannot be rewritten.
    """
    try:
        _hooked_pass(candidate, example, hooks=False)
    except _Failure as failure:
        raise UnsupportableLayerError(
            f"cannot make the model DP-ready: it fails on the probe input in training mode "
            f"({failure.message}{_where(failure.running)}); pass an example input it accepts "
            "(example= / example_input=)") from None
    rewrites: dict[str, Any] = {}
    for _ in range(sum(1 for _ in candidate.modules()) + 1):
        try:
            _hooked_pass(candidate, example)
            return rewrites
        except _Failure as failure:
            refusals = []
            for name in reversed(failure.running):
                if name in rewrites:
                    continue
                try:
                    graph = rewritten_graph(candidate.get_submodule(name), name)
                except UnsupportableLayerError as err:
                    refusals.append(str(err))
                    continue
                if graph is not None:
                    install_forward(candidate.get_submodule(name), graph)
                    rewrites[name] = graph
                    break
            else:
                reason = refusals[0] if refusals else "no in-place operation in its own code could be moved to a copy"
                raise UnsupportableLayerError(f"cannot make the model DP-ready: under Opacus's hooks, "
                                              f"{failure.message}{_where(failure.running)}; {reason}") from None
    raise UnsupportableLayerError("cannot make the model DP-ready: rewriting did not converge")


def make_dp_ready(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """Make a converted model trainable under Opacus's ``PrivacyEngine``, computing exactly what it
    computed (see the module docstring); everything is proved on copies before the model is changed.

    Args:
        model: a model without BatchNorm layers.
        example: an input of the model's shape for the proof; None builds a seeded random one from
            the first layer (a batch of 2 at 64 pixels for a convolution).

    Returns:
        ``model`` itself (its type, modules, hooks and state_dict keys unchanged), in training mode.

    Raises:
        UnsupportableLayerError: BatchNorm layers remain, a module's in-place forward cannot be made
            safe, or the result computes something else on a probe (each names the module); the
            model is then left as it was.
    """
    left = [name for name, m in model.named_modules() if is_batchnorm(m)]
    if left:
        raise UnsupportableLayerError(f"{len(left)} BatchNorm layer(s) remain ({', '.join(left[:3])}); Opacus refuses "
                                      "BatchNorm: convert every layer before making the model DP-ready")
    probes = probe_inputs(model, example)
    candidate = copy.deepcopy(model)
    copy_hooked_outputs(candidate)
    rewrites = _rewrite_until_trainable(candidate, probes[0])
    difference = assert_same_function(model, candidate, probes, "make_dp_ready", copy_changed=False)
    count = copy_hooked_outputs(model)
    for name, graph in rewrites.items():
        install_forward(model.get_submodule(name), graph)
    log.info("DP-ready: %d module(s) return copies of their outputs under Opacus's hooks, %d forward(s) rewritten "
             "(%s); outputs, gradients and buffers equal on %d probes in both modes (relative difference %.2g)",
             count, len(rewrites), ", ".join(rewrites) or "none", len(probes), difference)
    return model.train()
