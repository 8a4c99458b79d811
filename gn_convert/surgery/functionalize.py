"""One module's forward, with its in-place tensor operations made out of place (``torch.fx``).

Opacus's per-sample hooks hand each module's output on as a view, and an in-place operation on
that view fails the backward pass. This pass traces one module's own ``forward`` (children are
leaves) and rewrites every in-place operation into its out-of-place form **and every later read
of the mutated tensor into a read of the new value**, which is what makes the rewrite keep the
function: ``out.add_(x); F.relu(out, inplace=True); return out`` becomes
``a = out.add(x); r = F.relu(a); return r``.

What counts as in place: ``x += y`` (and the other augmented assignments, recorded by a proxy
that knows them), ``x.add_(..)``-style methods, ``torch.relu_(x)``-style functions,
``inplace=True`` keyword arguments, and calls of child modules whose ``inplace`` flag was on
(``self.relu(x)`` on ``ReLU(inplace=True)`` mutates ``x``).

Preconditions, each checked; a module that breaks one is refused by name
(:class:`~gn_convert.errors.UnsupportableLayerError`):

- the forward traces with ``torch.fx`` (no data-dependent control flow, no item assignment
  such as ``out[:, :2] += 1``);
- the traced graph is the same in training and evaluation mode;
- no in-place operation mutates a tensor that shares memory with another one still read
  afterwards (a slice, a view, ``nn.Identity``'s output): a slice's mutation changes its base,
  which a rewrite of values cannot follow.

The rewrite is checked by value, on a probe input, by :func:`gn_convert.surgery.dp.make_dp_ready`.
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from gn_convert.errors import UnsupportableLayerError

IN_PLACE_OPERATORS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
}
# source text that may modify a tensor in place: worth tracing
_SUSPECT = re.compile(r"[-+*/%&|^]=(?!=)|<<=|>>=|\w_\(|inplace\s*=\s*True")
# operations whose result may share memory with their first argument
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "expand", "expand_as", "narrow", "select", "chunk", "split", "tensor_split", "unbind",
    "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "detach", "contiguous", "to",
    "type", "float", "double", "half", "bfloat16", "type_as", "__getitem__", "unfold", "view_as_real",
    "view_as_complex", "real", "imag",
})
_VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.t, torch.narrow, torch.select, torch.chunk, torch.split, torch.tensor_split,
    torch.unbind, torch.movedim, torch.moveaxis, torch.swapaxes, torch.diagonal, torch.as_strided, torch.detach,
    getattr,
})


class _InPlaceProxy(fx.Proxy):
    """A proxy that records ``x += y`` as ``operator.iadd`` (plain fx records ``x = x + y``)."""


def _augmented(op: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _op in IN_PLACE_OPERATORS:
    setattr(_InPlaceProxy, f"__{_op.__name__.strip('_')}__", _augmented(_op))


class _ShallowTracer(fx.Tracer):
    """Traces one module's own ``forward``: every child module is a leaf; augmented assignments are kept."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)


def _mutated_argument(node: fx.Node, in_place_children: frozenset[str]) -> fx.Node | None:
    """The tensor node that ``node`` modifies in place, or None when it modifies nothing we rewrite."""
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", "")
        if target in IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return first
        if (name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is target
                and callable(getattr(torch, name[:-1], None))):
            return first  # torch.relu_(x)
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_") and hasattr(torch.Tensor, node.target[:-1]):
        return first  # x.add_(y)
    if node.op == "call_module" and node.target in in_place_children:
        return first  # self.relu(x) on ReLU(inplace=True): x is modified and returned
    return None


def _make_out_of_place(node: fx.Node) -> bool:
    """Turn one in-place node into its out-of-place form; False for a child module's call, which
    needs no change (its ``inplace`` flag is turned off by the caller)."""
    if node.op == "call_function" and node.target in IN_PLACE_OPERATORS:
        node.target = IN_PLACE_OPERATORS[node.target]
    elif node.op == "call_function" and node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_function" and callable(node.target):
        node.target = getattr(torch, node.target.__name__[:-1])
    elif node.op == "call_method" and isinstance(node.target, str):
        node.target = node.target[:-1]
    else:
        return False
    return True


def _is_view(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s result may share memory with its first argument."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity)


def functionalize(graph: fx.Graph, modules: dict[str, nn.Module], in_place_children: frozenset[str],
                  where: str) -> int:
    """Rewrite ``graph``'s in-place operations out of place and redirect later reads to the new values.

    Args:
        graph: a graph traced by :class:`_ShallowTracer` (modified in place).
        modules: the traced module's children by name (to recognise ``nn.Identity``).
        in_place_children: names of children whose ``inplace`` flag was on.
        where: the module's qualified name, for the error.

    Returns:
        How many nodes changed: operations made out of place plus reads redirected (0: the
        graph computes as the module did without any rewrite).

    Raises:
        UnsupportableLayerError: an in-place operation mutates memory shared with a tensor read later.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    identity: dict[fx.Node, fx.Node] = {}   # in-place result -> the node that first held that tensor
    memory: dict[fx.Node, fx.Node] = {}     # view or in-place result -> the node that first held its memory
    latest: dict[fx.Node, fx.Node] = {}     # tensor -> the node holding its newest value
    changes = 0

    def newest(arg: fx.Node) -> fx.Node:
        nonlocal changes
        new = latest.get(identity.get(arg, arg), arg)
        changes += new is not arg
        return new

    for node in list(graph.nodes):
        node.args = fx.node.map_arg(node.args, newest)
        node.kwargs = fx.node.map_arg(node.kwargs, newest)
        mutated = _mutated_argument(node, in_place_children)
        if mutated is None:
            if _is_view(node, modules) and node.args and isinstance(node.args[0], fx.Node):
                memory[node] = memory.get(node.args[0], node.args[0])
            continue
        tensor, shared = identity.get(mutated, mutated), memory.get(mutated, mutated)
        aliases = [other for other, base in memory.items() if base == shared and identity.get(other, other) != tensor]
        aliases += [shared] if shared != tensor else []
        read_later = [a for a in aliases if any(order[user] > order[node] for user in a.users)]
        if read_later:
            raise UnsupportableLayerError(
                f"cannot make {where} DP-ready: `{node.format_node()}` modifies in place memory shared with "
                f"{read_later[0].name} (a slice or view) that is read afterwards; write that step out of place "
                "in the model's code")
        changes += _make_out_of_place(node)
        identity[node], memory[node], latest[tensor] = tensor, shared, node
    graph.lint()
    return changes


def rewritten(module: nn.Module, where: str, in_place_children: frozenset[str]) -> fx.GraphModule | None:
    """``module`` with its forward's in-place operations out of place, or None when nothing needs it.

    Args:
        module: the module whose own ``forward`` is traced (children are not entered).
        where: its qualified name in the model, for errors.
        in_place_children: names of its children whose ``inplace`` flag was on.

    Raises:
        UnsupportableLayerError: its forward may modify tensors in place and cannot be rewritten
            safely (see the module docstring).
    """
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = "+="  # unknown: treat as in place
    suspect = bool(_SUSPECT.search(source))  # then a forward that cannot be traced is refused
    label = f"{where or 'the model'} ({type(module).__name__})"
    graphs = []
    for training in (True, False):  # the rewrite must not freeze train/eval behaviour into the graph
        was = module.training
        module.train(training)
        try:
            graphs.append(_ShallowTracer().trace(module))
        except Exception as err:  # noqa: BLE001 - any tracing failure means we cannot rewrite it safely
            if not suspect:
                return None  # nothing in place in its own code; the probe check covers helpers it calls
            raise UnsupportableLayerError(
                f"cannot make {label} DP-ready: its forward may modify tensors in place and torch.fx cannot "
                f"trace it ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
        finally:
            module.train(was)
    children = dict(module.named_children())
    changes = [functionalize(graph, children, in_place_children, label) for graph in graphs]
    if not any(changes):
        return None  # the module is kept as it is (its mode-dependent code included)
    if str(graphs[0]) != str(graphs[1]):
        raise UnsupportableLayerError(f"cannot make {label} DP-ready: its forward modifies tensors in place "
                                      "and depends on training mode")
    new = fx.GraphModule(module, graphs[0], class_name=type(module).__name__)
    for name, child in module.named_children():  # children, parameters and buffers the forward never touches
        if name not in new._modules:
            new.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        if name not in new._parameters:
            new.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        if name not in new._buffers:
            new.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    return new.train(module.training)
