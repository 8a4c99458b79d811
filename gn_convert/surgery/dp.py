"""DP-ready models: a converted network that Opacus validates and trains with DP-SGD as it is.

Opacus computes per-sample gradients with a full backward hook on every module that has
trainable parameters. Such a hook returns the module's output as a view, and an in-place
operation on that view fails the first training step ("Output 0 of BackwardHookFunction is a
view and is being modified inplace", Opacus issue 828): torchvision's ``ReLU(inplace=True)``
after a norm layer, and ``out += identity`` in ResNet blocks, both do it. :func:`make_dp_ready`

- refuses a model that still has BatchNorm layers (Opacus refuses them),
- turns every activation module's ``inplace`` flag off,
- rewrites, module by module, the forward code that modifies a tensor in place into its
  out-of-place form, every later read of that tensor reading the new value
  (:mod:`gn_convert.surgery.functionalize`); only modules that need it are replaced (by a
  ``GraphModule`` holding the same children, parameters and buffers under the same names),
- **proves the result computes what the model computed**: both are run on a probe input in
  training and in evaluation mode and must agree, or the first differing module is named
  (:mod:`gn_convert.surgery.equivalence`),
- and puts the model in training mode (Opacus validates a training model).

:func:`check_dp_ready` proves trainability on an input: one forward and backward pass with a
full backward hook on every parametrised module, as Opacus registers them.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.equivalence import assert_same_function, probe_input
from gn_convert.surgery.functionalize import rewritten
from gn_convert.surgery.registry import is_batchnorm

log = logging.getLogger(__name__)


def make_dp_ready(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """Make a converted model trainable under Opacus's ``PrivacyEngine`` (in place; see the module docstring).

    Args:
        model: a model without BatchNorm layers.
        example: a probe input of the model's shape for the equivalence proof; None builds a
            seeded random one from the first layer (a batch of 2 at 64 pixels for a Conv2d).

    Returns:
        ``model`` itself, or a ``GraphModule`` when its own ``forward`` had to be rewritten;
        in training mode.

    Raises:
        UnsupportableLayerError: BatchNorm layers remain, a module's in-place forward cannot be
            rewritten safely, or the rewritten model computes something else on the probe input
            (each names the module).
    """
    left = [name for name, m in model.named_modules() if is_batchnorm(m)]
    if left:
        raise UnsupportableLayerError(f"{len(left)} BatchNorm layer(s) remain ({', '.join(left[:3])}); Opacus refuses "
                                      "BatchNorm: convert every layer before making the model DP-ready")
    example = probe_input(model) if example is None else example
    original = copy.deepcopy(model)
    in_place = {name for name, m in model.named_modules() if getattr(m, "inplace", None) is True}
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            setattr(module, "inplace", False)  # noqa: B010 (nn.Module's attributes are untyped)
    count = 0
    for name, module in sorted(model.named_modules(), key=lambda item: -item[0].count(".")):  # innermost first
        children = frozenset(child for child, _ in module.named_children() if f"{name}.{child}".lstrip(".") in in_place)
        new = rewritten(module, name, children)
        if new is None:
            continue
        count += 1
        if not name:
            model = new
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    difference = assert_same_function(original, model, example, "make_dp_ready")
    log.info("DP-ready: activations out of place, %d module forward(s) rewritten without in-place ops; outputs "
             "equal on a probe input in both modes (relative difference %.2g)", count, difference)
    return model.train()


def check_dp_ready(model: nn.Module, example: torch.Tensor) -> None:
    """One forward and backward pass under full backward hooks on every parametrised module.

    Args:
        model: the model (its mode is kept; gradients are cleared afterwards).
        example: an input batch of at least one sample.

    Raises:
        UnsupportableLayerError: the pass fails as Opacus's first DP-SGD step would.
    """
    handles = [m.register_full_backward_hook(lambda *_: None) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the input needs no grad
            output = model(example)
            (output if isinstance(output, torch.Tensor) else output[0]).float().sum().backward()
    except RuntimeError as err:
        raise UnsupportableLayerError(f"the model is not DP-ready: {str(err).splitlines()[0][:200]}; "
                                      "convert it with dp_ready=True (--dp-ready)") from None
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
