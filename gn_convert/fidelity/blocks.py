"""Blocks of any ``nn.Module``: the units block-wise reconstruction fits one at a time.

A block is the smallest module that contains norm layers and owns its own forward, so that
everything between its input and its output (a residual join included) is inside it:

- containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are opened: each child is
  a candidate on its own (torchvision's ``layer1`` becomes its ``BasicBlock``s);
- the model itself is opened: its children are candidates (a ResNet's ``bn1`` next to ``conv1``);
- any other module that contains a norm layer is a block (a ``BasicBlock``, an ``MBConvBlock``);
- a norm layer reached directly is a block of its own (a stem's ``bn1``).

Blocks are returned in the order the forward pass runs them, found from one forward pass on an
example input; modules the pass never runs are left out. Parameters outside every block (a
stem convolution, the classifier) are not fitted by reconstruction; distillation trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gn_convert.fidelity.pairs import forward_hooks
from gn_convert.modes import eval_mode
from gn_convert.surgery.registry import is_batchnorm

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm layer gn-convert converts, or a GroupNorm it made."""
    return isinstance(module, nn.GroupNorm) or is_batchnorm(module)


@dataclass(frozen=True)
class Block:
    """One reconstruction unit.

    Attributes:
        name: qualified module name (the same in the teacher and the converted student).
        norms: qualified names of the norm layers inside it.
    """

    name: str
    norms: tuple[str, ...]


def _has_norm(module: nn.Module) -> bool:
    return any(is_norm(m) for m in module.modules())


def _candidates(module: nn.Module, prefix: str, root: bool) -> list[str]:
    if is_norm(module):
        return [prefix]
    if not _has_norm(module):
        return []
    if root or isinstance(module, _CONTAINERS):
        found: list[str] = []
        for name, child in module.named_children():
            found += _candidates(child, f"{prefix}.{name}" if prefix else name, False)
        return found
    return [prefix]


def find_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """The model's blocks in execution order (see the module docstring).

    Args:
        model: a BatchNorm teacher or its converted student (the same names either way).
        example: an input batch, to find the execution order (one forward pass, eval mode).

    Returns:
        The blocks, each with the norm layers it holds.
    """
    names = _candidates(model, "", True)
    modules = dict(model.named_modules())
    order: list[str] = []

    def seen(name: str):  # noqa: ANN202 - a forward hook
        return lambda *_: order.append(name) if name not in order else None

    with forward_hooks([(modules[n], seen(n)) for n in names]), eval_mode(model), torch.no_grad():
        model(example[:1])
    blocks = []
    for name in order:
        prefix = f"{name}."
        norms = tuple(n for n, m in modules.items() if is_norm(m) and (n == name or n.startswith(prefix)))
        blocks.append(Block(name, norms))
    return blocks
