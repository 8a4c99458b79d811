"""One module's forward with its in-place tensor operations applied to copies (``torch.fx``): the
fallback of :func:`gn_convert.surgery.dp.make_dp_ready` for the rare module that modifies, in its own
forward, a tensor Opacus hands it as a view (its input).

The pass traces the module's own ``forward`` (children are leaves; parameters and buffers are
proxied), and before every in-place operation on an activation inserts ``clone()`` of the tensor it
modifies, so the operation (the same kernel, in place) runs on the copy, and every later read of the
tensor reads the copy: ``x.relu_(); return self.conv(x) + x`` becomes
``c = x.clone(); r = c.relu_(); return self.conv(r) + r``. In-place updates of parameters and
buffers (``self.calls += 1``, ``self.seen.mul_(0.9)``) are left as they are.

What counts as in place: ``x += y`` (and the other augmented assignments, recorded by a proxy that
knows them), tensor methods ``x.add_(..)``, ``x.zero_()``, ``x.copy_(..)`` (every ``Tensor`` method
ending in ``_`` that writes data; ``requires_grad_`` and ``share_memory_`` do not), ``torch.relu_(x)``,
an ``inplace`` argument that is true (by keyword or position), and calls of descendant modules whose
``inplace`` flag is on (``self.acts[0](x)`` on ``ReLU(inplace=True)`` modifies ``x``).

Preconditions, each checked; a module that breaks one is refused by name
(:class:`~gn_convert.errors.UnsupportableLayerError`):

- the forward traces with ``torch.fx`` (no data-dependent control flow, no item assignment such as
  ``out[:, :2] += 1``), and to the same graph in training and in evaluation mode;
- no in-place operation modifies memory shared with another tensor read afterwards (a slice, a
  view): a copy cannot follow what a view of the original sees;
- the graph reads no tensor that is neither a parameter nor a buffer of the module.

torch.fx records calls, not grad mode (a ``torch.no_grad()`` block disappears) nor Python-side
effects; what it loses is caught by :func:`gn_convert.surgery.equivalence.assert_same_function`,
which compares gradients and buffers as well as outputs.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from gn_convert.errors import UnsupportableLayerError

IN_PLACE_OPERATORS: frozenset[Callable[..., Any]] = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
})
NOT_DATA_WRITES = frozenset({"requires_grad_", "share_memory_", "retain_grad_", "record_stream_"})
"""Tensor methods ending in ``_`` that write no tensor data."""
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
    """Traces one module's own ``forward``: every child module is a leaf; parameters and buffers are
    graph inputs (``get_attr``), so their in-place updates are recorded, not run; augmented
    assignments are kept."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)


def _inplace_argument(target: Callable[..., Any], node: fx.Node) -> bool:
    """Whether a call passes ``inplace=True``, by keyword or by position."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return False
    index = parameters.index("inplace") if "inplace" in parameters else -1
    return 0 <= index < len(node.args) and node.args[index] is True


def _mutated_argument(node: fx.Node, in_place_modules: frozenset[str]) -> fx.Node | None:
    """The tensor node that ``node`` modifies in place, or None."""
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(first, fx.Node):
        return None
    target = node.target
    if node.op == "call_function" and callable(target):
        name = getattr(target, "__name__", "")
        if target in IN_PLACE_OPERATORS or _inplace_argument(target, node):
            return first
        if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is target:
            return first  # torch.relu_(x)
    if node.op == "call_method" and isinstance(target, str) and target.endswith("_") \
            and not target.startswith("_") and target not in NOT_DATA_WRITES and hasattr(torch.Tensor, target):
        return first  # x.add_(y), x.zero_()
    if node.op == "call_module" and target in in_place_modules:
        return first  # self.relu(x) on ReLU(inplace=True): x is modified and returned
    return None


def _is_view(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s result may share memory with its first argument."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity)


def _clone_before(graph: fx.Graph, node: fx.Node, tensor: fx.Node) -> fx.Node:
    """Insert ``tensor.clone()`` before ``node`` and make ``node`` modify the clone instead."""
    with graph.inserting_before(node):
        clone = graph.call_method("clone", (tensor,))
    if node.args and node.args[0] is tensor:
        node.args = (clone, *node.args[1:])
    else:
        node.kwargs = {k: clone if v is tensor else v for k, v in node.kwargs.items()}
    return clone


def functionalize(graph: fx.Graph, modules: dict[str, nn.Module], in_place_modules: frozenset[str],
                  where: str) -> int:
    """Make ``graph``'s in-place operations on activations act on copies; redirect later reads to them.

    Args:
        graph: a graph traced by :class:`_ShallowTracer` (modified in place).
        modules: the traced module's descendants by qualified name (to recognise ``nn.Identity``).
        in_place_modules: qualified names of descendants whose ``inplace`` flag is on.
        where: the module's qualified name, for the error.

    Returns:
        How many in-place operations now act on copies (0: nothing to change).

    Raises:
        UnsupportableLayerError: an in-place operation modifies memory shared with a tensor read later.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    identity: dict[fx.Node, fx.Node] = {}   # in-place result -> the node that first held that tensor
    memory: dict[fx.Node, fx.Node] = {}     # view or in-place result -> the node that first held its memory
    latest: dict[fx.Node, fx.Node] = {}     # tensor -> the node holding its newest value
    changes = 0

    def newest(arg: fx.Node) -> fx.Node:
        return latest.get(identity.get(arg, arg), arg)

    for node in list(graph.nodes):
        node.args = fx.node.map_arg(node.args, newest)
        node.kwargs = fx.node.map_arg(node.kwargs, newest)
        mutated = _mutated_argument(node, in_place_modules)
        if mutated is None:
            if _is_view(node, modules) and node.args and isinstance(node.args[0], fx.Node):
                memory[node] = memory.get(node.args[0], node.args[0])
            continue
        tensor, shared = identity.get(mutated, mutated), memory.get(mutated, mutated)
        if shared.op == "get_attr":  # a parameter or buffer updated in place: kept as it is
            identity[node], memory[node] = tensor, shared
            continue
        aliases = [other for other, base in memory.items() if base == shared and identity.get(other, other) != tensor]
        aliases += [shared] if shared != tensor else []
        read_later = [a for a in aliases if any(order.get(user, -1) > order[node] for user in a.users)]
        if read_later:
            raise UnsupportableLayerError(
                f"cannot make {where} DP-ready: `{node.format_node()}` modifies in place memory shared with "
                f"{read_later[0].name} (a slice or view) that is read afterwards; write that step out of place "
                "in the model's code")
        clone = _clone_before(graph, node, mutated)
        changes += 1
        identity[node], memory[node], memory[clone], latest[tensor] = tensor, clone, clone, node
    graph.lint()
    return changes


def _trace(module: nn.Module, training: bool, label: str) -> fx.Graph:
    """The module's own forward in one mode, traced on a copy (tracing runs Python code, which may
    change attributes; the copy takes it)."""
    scratch = copy.deepcopy(module).train(training)
    try:
        return _ShallowTracer().trace(scratch)
    except Exception as err:  # noqa: BLE001 - any tracing failure means we cannot rewrite it safely
        raise UnsupportableLayerError(
            f"cannot make {label} DP-ready: its forward modifies in place a tensor Opacus hands it as a view, and "
            f"torch.fx cannot trace it ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def rewritten_graph(module: nn.Module, where: str) -> fx.Graph | None:
    """``module``'s forward with its in-place operations on activations acting on copies, or None when
    its own forward has none.

    Args:
        module: the module whose own ``forward`` is traced (children are not entered); not modified.
        where: its qualified name in the model, for errors.

    Raises:
        UnsupportableLayerError: the forward cannot be rewritten safely (see the module docstring).
    """
    label = f"{where or 'the model'} ({type(module).__name__})"
    descendants = dict(module.named_modules())
    in_place = frozenset(name for name, m in descendants.items() if name and getattr(m, "inplace", None) is True)
    graphs = [_trace(module, training, label) for training in (True, False)]
    changes = [functionalize(graph, descendants, in_place, label) for graph in graphs]
    if not any(changes):
        return None
    if str(graphs[0]) != str(graphs[1]):
        raise UnsupportableLayerError(f"cannot make {label} DP-ready: its forward modifies tensors in place "
                                      "and depends on training mode")
    names = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    foreign = [str(n.target) for n in graphs[0].nodes if n.op == "get_attr" and n.target not in names]
    if foreign:
        raise UnsupportableLayerError(f"cannot make {label} DP-ready: its forward reads {foreign[0]}, a tensor that "
                                      "is neither a parameter nor a buffer, which a rewrite would freeze")
    return graphs[0]


class RewrittenForward:
    """A module's ``forward`` replaced by a rewritten graph, run with the module itself as ``self``:
    the module keeps its type, attributes, hooks, children and state_dict keys. Set as the instance's
    ``forward`` attribute; pickles (and deep-copies) with the module."""

    def __init__(self, module: nn.Module, graph: fx.Graph) -> None:
        self.module = module
        self.code = fx.GraphModule(module, copy.deepcopy(graph), class_name=type(module).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.code).forward(self.module, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore_forward, (self.module, self.code)


def _restore_forward(module: nn.Module, code: fx.GraphModule) -> RewrittenForward:
    forward = RewrittenForward.__new__(RewrittenForward)
    forward.module, forward.code = module, code
    return forward


def install_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Run ``graph`` as ``module``'s forward from now on (see :class:`RewrittenForward`)."""
    module.forward = RewrittenForward(module, graph)
