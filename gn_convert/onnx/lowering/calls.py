"""One GroupNorm call as the statistics-based lowerings see it, and the group statistics they share.

The ``blocked`` and ``openvino`` passes both compute per-channel statistics ``[N, C, 1, ...]`` on
the full activation and take their group means off it: :func:`group_mean` folds the channels of
each group (``[N, C, 1, ...]`` -> ``[N, G, 1]``), :func:`per_channel` spreads a group value back
over its channels (``[N, G, 1]`` -> ``[N, C, 1, ...]``). Both are tiny tensors; nothing here
touches the activation itself. :func:`lower_calls` is the pass both share: it walks the graph,
hands each eligible call to the form's builder and leaves the others to the fast form.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh

from gn_convert.onnx.lowering.common import Constants, drop_custom_domain, model_opset, set_target, value_types
from gn_convert.onnx.lowering.fast import to_fast
from gn_convert.onnx.op import groupnorm_nodes, is_groupnorm_node

log = logging.getLogger(__name__)

MIN_OPSET = 18
"""ReduceMean takes its axes as an input from opset 18 (the function target's floor too)."""


@dataclass(frozen=True)
class Call:
    """One custom GroupNorm call: its values, its attributes and the shape of its input.

    Attributes:
        name: the node's name (its output's name when it has none); every value it adds is ``name/tag``.
        x, scale, bias, y: the call's inputs and output.
        groups: ``num_groups``.
        eps: ``epsilon``.
        shape: ``X``'s shape, ``(N, C, ...)``: C static, other axes static or symbolic.
    """

    name: str
    x: str
    scale: str
    bias: str
    y: str
    groups: int
    eps: float
    shape: tuple[int | str, ...]

    @property
    def channels(self) -> int:
        """C, the input's channel count."""
        return int(self.shape[1])

    @property
    def per_group(self) -> int:
        """Channels in each group."""
        return self.channels // self.groups

    @property
    def rank(self) -> int:
        """The input's rank (3 or more)."""
        return len(self.shape)

    def v(self, tag: str) -> str:
        """The name of this call's value ``tag``."""
        return f"{self.name}/{tag}"

    def node(self, op: str, inputs: list[str], tag: str, **attrs: Any) -> onnx.NodeProto:
        """A node named like the one value it writes."""
        return oh.make_node(op, inputs, [self.v(tag)], name=self.v(tag), **attrs)


def group_mean(call: Call, tag: str, value: str, consts: Constants) -> tuple[list[onnx.NodeProto], str]:
    """``value`` ``[N, C, 1, ...]`` to its group means ``[N, G, 1]`` (itself when G == C)."""
    if call.per_group == 1:
        return [], value
    rows = consts.get(f"rows_{call.groups}x{call.per_group}", np.array([0, call.groups, call.per_group], np.int64))
    axis = consts.get("axis_2", np.array([2], np.int64))
    return [call.node("Reshape", [value, rows], f"{tag}_rows"),
            call.node("ReduceMean", [call.v(f"{tag}_rows"), axis], f"{tag}_g", keepdims=1)], call.v(f"{tag}_g")


def per_channel(call: Call, tag: str, value: str, consts: Constants) -> tuple[list[onnx.NodeProto], str]:
    """Group values ``[N, G, 1]`` back to ``[N, C, 1, ...]`` of the input's rank (nothing to do when G == C)."""
    if call.per_group == 1:
        return [], value
    wide = consts.get(f"expand_{call.groups}x{call.per_group}", np.array([1, call.groups, call.per_group], np.int64))
    ones = [1] * (call.rank - 2)
    flat = consts.get(f"channel_shape_{call.channels}" + ("" if call.rank == 4 else f"_rank{call.rank}"),
                      np.array([0, call.channels, *ones], np.int64))
    return [call.node("Expand", [value, wide], f"{tag}_wide"),
            call.node("Reshape", [call.v(f"{tag}_wide"), flat], f"{tag}_ch")], call.v(f"{tag}_ch")


Eligible = Callable[[onnx.NodeProto, dict[str, int], dict[str, list[int | str]], dict[str, onnx.TensorProto]],
                    "Call | str"]
"""A form's test of one GroupNorm node: its :class:`Call` when the form can take it, otherwise why not."""
Builder = Callable[[Call, Constants], tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]]
"""A form's builder: the nodes that replace one call, and any value_info they need."""


def lower_calls(model: onnx.ModelProto, target: str, eligible: Eligible, build: Builder, marker: str,
                form: str) -> onnx.ModelProto:
    """Replace every eligible custom GroupNorm call by ``build``'s form, the others by the fast form.

    Node order, value names and metadata are kept; the custom function and opset import are dropped.

    Args:
        model: a model in the ``function`` form.
        target: the target's name (written to the metadata, named in errors and the log).
        eligible: the form's test of one node.
        build: the form's builder.
        marker: the name suffix of the one node per call that the log counts.
        form: the log's words for this form (``"in the blocked form"``).

    Returns:
        A new model in standard ops only.

    Raises:
        ValueError: the opset is older than 18, or a call left to the fast form has an unknown channel count.
    """
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"the {target} lowering needs opset >= {MIN_OPSET}, the model has opset {opset}")
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    types, shapes = value_types(lowered)
    inits = {init.name: init for init in lowered.graph.initializer}
    consts = Constants(lowered.graph)
    nodes: list[onnx.NodeProto] = []
    declined: Counter[str] = Counter()
    for node in lowered.graph.node:
        call = eligible(node, types, shapes, inits) if is_groupnorm_node(node) else None
        if not isinstance(call, Call):
            declined.update([call] if call else [])
            nodes.append(node)
            continue
        more, infos = build(call, consts)
        nodes += more
        lowered.graph.value_info.extend(infos)
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    if groupnorm_nodes(lowered):
        lowered = to_fast(lowered)
    drop_custom_domain(lowered)
    set_target(lowered, target)
    done = sum(1 for node in nodes if node.name.endswith(marker))
    log.info("%s lowering: %d GroupNorm calls %s%s", target, done, form,
             "".join(f"; {count} in the fast form ({why})" for why, count in declined.items()))
    return lowered
