"""A lowering of the custom GroupNorm op to the standard ops onnxruntime's CPU runs fastest.

onnxruntime runs our op by inlining its function body: about ten elementwise and reduction
kernels per call, each a full pass over the activation. This pass instead rewrites each
``ai.gn_convert::GroupNorm`` call (``X``: ``(N, C, D1, ...)``, ``num_groups`` = G) as::

    Reshape(X, [0, G, (C/G)*D1*...]) -> InstanceNormalization(scale=1, bias=0) -> Reshape(Shape(X))
        -> BatchNormalization(scale, bias, mean=0, var=1, epsilon=0)

onnxruntime's InstanceNormalization kernel computes each (sample, group) row's mean, then the
mean of squared deviations (two passes, as our function body does), then writes the
normalised row. The per-channel affine is one BatchNormalization with mean 0 and variance 1
(``X * scale + bias`` in one pass; epsilon 0 keeps it exact), where torch's export uses Mul
then Add (two passes). When G == C the affine goes into InstanceNormalization itself (one
node, no reshapes).

What this cannot remove: onnxruntime runs convolutions in its blocked NCHWc layout and has no
NCHWc kernel for any normalisation with per-sample statistics, so every GroupNorm costs a
reorder out of and back into that layout, and InstanceNormalization's CPU kernel is
single-threaded. On ResNet-50 the form measured 1.17x the BatchNorm original's CPU time at
batch 1 and 1.29x at batch 8 (function form: 1.29x, 1.41x; scripts/PERF.md).

Precision: statistics in float32 with two passes, as in the function body (robust to inputs
with a large mean: relative error 4e-5 at mean 1000, as the function form). Float16 and
bfloat16 inputs are cast to float32 around the nodes, as the function body does. The speed of
every form tried is in ``scripts/PERF.md``.

Use :func:`to_fast` on a ``function``-form model, or ``lower_onnx(..., target="fast")`` on a file.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx.helper as oh

from gn_convert.onnx.lowering.common import (
    FLOAT,
    Constants,
    call_channels,
    drop_custom_domain,
    model_opset,
    set_target,
    value_types,
)
from gn_convert.onnx.op import DEFAULT_EPSILON, is_groupnorm_node

log = logging.getLogger(__name__)

MIN_OPSET = 15
"""BatchNormalization-15 takes scale/bias and mean/var of different types; Reshape-14 allowzero."""


def _lower_call(node: onnx.NodeProto, channels: int | None, dtype: int, consts: Constants,
                item: list[int | str] | None = None) -> list[onnx.NodeProto]:
    """The replacement nodes of one call (precondition: ``node`` is a custom GroupNorm call); ``item``: the input's
    shape after the batch axis, when inferred."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    groups, eps = int(attrs["num_groups"]), float(attrs.get("epsilon", DEFAULT_EPSILON))
    name, (x, scale, bias), y = node.name or node.output[0], node.input, node.output[0]
    nodes: list[onnx.NodeProto] = []
    if dtype != FLOAT:  # compute in float32, as the function body does
        nodes += [oh.make_node("Cast", [v], [f"{name}/{k}_f32"], name=f"{name}/cast_{k}", to=FLOAT)
                  for k, v in (("x", x), ("scale", scale), ("bias", bias))]
        x, scale, bias, y = f"{name}/x_f32", f"{name}/scale_f32", f"{name}/bias_f32", f"{name}/y_f32"
    if channels is not None and channels == groups:  # instance norm: the affine fits in one node
        nodes.append(oh.make_node("InstanceNormalization", [x, scale, bias], [y], name=f"{name}/norm", epsilon=eps))
    else:
        ones = consts.get(f"ones_{groups}", np.ones(groups, np.float32))
        zeros = consts.get(f"zeros_{groups}", np.zeros(groups, np.float32))
        if channels is None:
            raise ValueError(f"the channel count of {scale!r} is unknown; the fast lowering needs static C")
        shape_nodes, grouped = _grouped_shape(name, x, groups, item, consts)
        nodes += [
            *shape_nodes,
            oh.make_node("Reshape", [x, grouped], [f"{name}/grouped"], name=f"{name}/group"),
            oh.make_node("InstanceNormalization", [f"{name}/grouped", ones, zeros], [f"{name}/normed_g"],
                         name=f"{name}/norm", epsilon=eps),
            oh.make_node("Shape", [x], [f"{name}/shape"], name=f"{name}/shape"),
            oh.make_node("Reshape", [f"{name}/normed_g", f"{name}/shape"], [f"{name}/normed"], name=f"{name}/ungroup"),
            _affine(name, f"{name}/normed", scale, bias, y, channels, consts),
        ]
    if dtype != FLOAT:
        nodes.append(oh.make_node("Cast", [y], [node.output[0]], name=f"{name}/cast_y", to=dtype))
    return nodes


def _grouped_shape(name: str, x: str, groups: int, item: list[int | str] | None,
                   consts: Constants) -> tuple[list[onnx.NodeProto], str]:
    """The nodes and the name of the grouped shape, never with ``-1``: a batch of no samples (a detection head
    on an image without boxes) leaves nothing to infer ``-1`` from, and onnxruntime refuses such a Reshape.
    ``[0, G, C/G * D1 * ... * Dk]`` (0: the batch, copied) when ``item`` (the shape after the batch) is static;
    else ``[0, G, C/G, prod(Shape(X)[2:])]`` computed from ``Shape(X)`` as the function body's: onnxruntime's
    optimiser folded a shape with one computed entry (a three-axis row, or C/G as a constant) back into ``-1``."""
    if item and all(isinstance(d, int) and d > 0 for d in item):
        row = math.prod(int(d) for d in item) // groups
        return [], consts.get(f"grouped_shape_{groups}_{row}", np.array([0, groups, row], np.int64))
    head = consts.get(f"batch_groups_{groups}", np.array([0, groups], np.int64))
    count = consts.get(f"groups_{groups}", np.array([groups], np.int64))
    return [oh.make_node("Shape", [x], [f"{name}/channels"], name=f"{name}/channels", start=1, end=2),
            oh.make_node("Div", [f"{name}/channels", count], [f"{name}/per_group"], name=f"{name}/per_group"),
            oh.make_node("Shape", [x], [f"{name}/spatial"], name=f"{name}/spatial", start=2),
            oh.make_node("ReduceProd", [f"{name}/spatial"], [f"{name}/rest"], name=f"{name}/rest", keepdims=1),
            oh.make_node("Concat", [head, f"{name}/per_group", f"{name}/rest"], [f"{name}/grouped_shape"],
                         name=f"{name}/grouped_shape", axis=0)], f"{name}/grouped_shape"


def _affine(name: str, normed: str, scale: str, bias: str, y: str, channels: int,
            consts: Constants) -> onnx.NodeProto:
    """``y = normed * scale[c] + bias[c]`` as one BatchNormalization (mean 0, variance 1, epsilon 0: exact).

    One pass, where Mul then Add (torch's export) are two. A depthwise 1x1 Conv, which
    onnxruntime runs in its NCHWc layout with the Relu and residual Add fused, measured slower
    (scripts/PERF.md).
    """
    mean = consts.get(f"mean_{channels}", np.zeros(channels, np.float32))
    var = consts.get(f"var_{channels}", np.ones(channels, np.float32))
    return oh.make_node("BatchNormalization", [normed, scale, bias, mean, var], [y], name=f"{name}/affine",
                        epsilon=0.0)


def to_fast(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every custom GroupNorm call by the InstanceNormalization form above.

    Preconditions: default-domain opset >= 15; each call's channel count is static (known
    from its scale's initializer or by shape inference). Node order, value names and metadata
    are kept; the custom function and opset import are dropped.

    Args:
        model: a model in the ``function`` form (or any model with custom GroupNorm calls).

    Returns:
        A new model in standard ops only.

    Raises:
        ValueError: the opset is too old, or a call's channel count is unknown.
    """
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"the fast lowering needs opset >= {MIN_OPSET}, the model has opset {opset}")
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    types, shapes = value_types(lowered)
    inits = {init.name: init for init in lowered.graph.initializer}
    consts = Constants(lowered.graph)
    nodes: list[onnx.NodeProto] = []
    calls = 0
    for node in lowered.graph.node:
        if not is_groupnorm_node(node):
            nodes.append(node)
            continue
        calls += 1
        dtype = types.get(node.input[0], FLOAT) or FLOAT
        nodes += _lower_call(node, call_channels(node, shapes, inits), dtype, consts, shapes.get(node.input[0], [])[1:])
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    drop_custom_domain(lowered)
    set_target(lowered, "fast")
    log.info("fast lowering: %d GroupNorm calls -> InstanceNormalization form", calls)
    return lowered
