"""DP-ready models: a converted network that Opacus validates and trains with DP-SGD as it is.

Opacus computes per-sample gradients with a full backward hook on every module that has
trainable parameters. Such a hook returns the module's output as a view, and an in-place
operation on that view fails the first training step ("Output 0 of BackwardHookFunction is a
view and is being modified inplace", Opacus issue 828): torchvision's ``ReLU(inplace=True)``
after a norm layer, and ``out += identity`` in ResNet blocks, both do it. :func:`make_dp_ready`

- refuses a model that still has BatchNorm layers (Opacus refuses them),
- turns every activation module's ``inplace`` flag off,
- rewrites, module by module, the forward code that modifies a tensor in place (``+=``,
  ``x.add_(..)``, ``F.relu(x, inplace=True)``) into its out-of-place form, with ``torch.fx``;
  only modules whose ``forward`` does so are replaced (by a ``GraphModule`` holding the same
  children, parameters and buffers under the same names), so every other module keeps its class,
- and puts the model in training mode (Opacus validates a training model).

:func:`check_dp_ready` proves it on an input: one forward and backward pass with a full
backward hook on every parametrised module, as Opacus registers them.
"""

from __future__ import annotations

import inspect
import logging
import operator
import re
import warnings

import torch
from torch import fx, nn

from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.registry import is_batchnorm

log = logging.getLogger(__name__)

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_}
_AUGMENTED = re.compile(r"[-+*/&|]=(?!=)")  # x += y: torch.fx records it as the out-of-place x + y
_SUSPECT = re.compile(r"[-+*/&|]=(?!=)|\w_\(|inplace\s*=\s*True")


class _ShallowTracer(fx.Tracer):
    """Traces one module's own ``forward``: every child module is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _out_of_place(node: fx.Node) -> bool:
    """Rewrite one node to its out-of-place form; True when it changed."""
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[node.target]
        return True
    if node.op == "call_function" and node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
        return True
    if node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"):
        plain = getattr(torch, node.target.__name__[:-1], None)
        if plain is not None and not node.target.__name__.startswith("_"):
            node.target = plain
            return True
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        if hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]
            return True
    return False


def _rewritten(module: nn.Module) -> fx.GraphModule | None:
    """``module`` with its forward's in-place operations made out-of-place, or None when it has none."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = "+="  # unknown: trace to find out
    if not _SUSPECT.search(source):
        return None
    graphs = []
    for training in (True, False):  # the rewrite must not freeze train/eval behaviour into the graph
        was = module.training
        module.train(training)
        try:
            graphs.append(_ShallowTracer().trace(module))
        except Exception as err:  # noqa: BLE001 - any tracing failure means we cannot rewrite it safely
            raise UnsupportableLayerError(
                f"cannot make {type(module).__name__} DP-ready: its forward may modify tensors in place and "
                f"torch.fx cannot trace it ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
        finally:
            module.train(was)
    changed = [sum(_out_of_place(node) for node in graph.nodes) for graph in graphs]
    if not changed[0] and not _AUGMENTED.search(source):
        return None
    if str(graphs[0]) != str(graphs[1]):
        raise UnsupportableLayerError(f"cannot make {type(module).__name__} DP-ready: its forward modifies tensors "
                                      "in place and depends on training mode")
    rewritten = fx.GraphModule(module, graphs[0], class_name=type(module).__name__)
    for name, child in module.named_children():  # children, parameters and buffers the forward never touches
        if name not in rewritten._modules:
            rewritten.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        if name not in rewritten._parameters:
            rewritten.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        if name not in rewritten._buffers:
            rewritten.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    log.debug("%s: forward rewritten out of place", type(module).__name__)
    return rewritten.train(module.training)


def make_dp_ready(model: nn.Module) -> nn.Module:
    """Make a converted model trainable under Opacus's ``PrivacyEngine`` (in place; see the module docstring).

    Returns:
        ``model`` itself, or a ``GraphModule`` when its own ``forward`` had to be rewritten;
        in training mode.

    Raises:
        UnsupportableLayerError: BatchNorm layers remain, or a module's in-place forward
            cannot be rewritten safely.
    """
    left = [name for name, m in model.named_modules() if is_batchnorm(m)]
    if left:
        raise UnsupportableLayerError(f"{len(left)} BatchNorm layer(s) remain ({', '.join(left[:3])}); Opacus refuses "
                                      "BatchNorm: convert every layer before making the model DP-ready")
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    count = 0
    for name, module in sorted(model.named_modules(), key=lambda item: -item[0].count(".")):  # innermost first
        new = _rewritten(module)
        if new is None:
            continue
        count += 1
        if not name:
            model = new
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    log.info("DP-ready: activations out of place, %d module forward(s) rewritten without in-place ops", count)
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
