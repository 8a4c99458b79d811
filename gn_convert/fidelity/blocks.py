"""Blocks of any ``nn.Module``: the units block-wise reconstruction fits one at a time.

A block is the smallest module that contains norm layers and owns its own forward, so that
everything between its input and its output (a residual join included) is inside it:

- containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are opened: each child is
  a candidate on its own (torchvision's ``layer1`` becomes its ``BasicBlock``s);
- the model itself is opened: its children are candidates (a ResNet's ``bn1`` next to ``conv1``);
- any other module that contains a norm layer is a block (a ``BasicBlock``, an ``MBConvBlock``);
- a norm layer reached directly is a block of its own (a stem's ``bn1``), together with the
  module that runs just before it when that module has parameters and feeds it directly (the
  stem's ``conv1``: checked on the example, the pair must reproduce the norm layer's output).

Blocks are returned in the order the forward pass runs them, found from one forward pass on an
example input; modules the pass never runs are left out. Parameters outside every block (a
stem convolution, the classifier) are not fitted by reconstruction; distillation trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gn_convert.fidelity.pairs import capture_span, forward_hooks
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
        name: qualified module name of its (last) module, the same in teacher and student.
        norms: qualified names of the norm layers inside it.
        modules: the modules it runs in sequence, the input going into the first (usually just
            ``(name,)``; a stem's ``("conv1", "bn1")``).
    """

    name: str
    norms: tuple[str, ...]
    modules: tuple[str, ...] = ()

    def parts(self, model: nn.Module) -> list[nn.Module]:
        """The block's modules in ``model``, in order."""
        modules = dict(model.named_modules())
        return [modules[n] for n in (self.modules or (self.name,))]

    def forward(self, parts: list[nn.Module], inputs: tuple[Any, ...]) -> Any:
        """Run the block's modules on the first one's positional inputs."""
        out = parts[0](*inputs)
        for part in parts[1:]:
            out = part(out)
        return out


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
    leaves = [n for n, m in modules.items() if n and not any(True for _ in m.children())]
    order: list[str] = []
    ran: list[str] = []

    def seen(name: str, into: list[str]):  # noqa: ANN202 - a forward hook
        return lambda *_: into.append(name) if name not in into else None

    hooks = [(modules[n], seen(n, order)) for n in names] + [(modules[n], seen(n, ran)) for n in leaves]
    with forward_hooks(hooks), eval_mode(model), torch.no_grad():
        model(example[:1])
    blocks = []
    for name in order:
        prefix = f"{name}."
        norms = tuple(n for n, m in modules.items() if is_norm(m) and (n == name or n.startswith(prefix)))
        blocks.append(Block(name, norms, _with_feeder(model, modules, name, ran, names, example)))
    return blocks


def _with_feeder(model: nn.Module, modules: dict[str, nn.Module], name: str, ran: list[str], blocks: list[str],
                 example: torch.Tensor) -> tuple[str, ...]:
    """``(feeder, name)`` for a lone norm layer whose preceding module feeds it directly, else ``(name,)``."""
    if not is_norm(modules[name]) or name not in ran or ran.index(name) == 0:
        return (name,)
    feeder = ran[ran.index(name) - 1]
    inside_block = any(feeder == b or feeder.startswith(f"{b}.") for b in blocks)
    if inside_block or is_norm(modules[feeder]) or not any(True for _ in modules[feeder].parameters()):
        return (name,)
    with eval_mode(model), torch.no_grad():
        inputs, output = capture_span(model, modules[feeder], modules[name], example[:1])
        direct = modules[name](modules[feeder](*inputs))
    return (feeder, name) if torch.allclose(direct, output, rtol=1e-4, atol=1e-5) else (name,)
