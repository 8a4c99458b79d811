"""The ``ms-groupnorm`` pass: onnxruntime's CUDA contrib ``com.microsoft.GroupNorm``.

Each 4-D call becomes ``com.microsoft.GroupNorm`` (CUDA only, NHWC only) between two Transposes.
That kernel computes the variance in one pass (sum and sum of squares, as read in onnxruntime's
source; not measured here, for want of a GPU), so it loses our body's robustness to inputs with
a large mean: use it for speed on inputs of moderate mean only. Calls it cannot take get the
:mod:`~gn_convert.onnx.lowering.fast` form.
"""

from __future__ import annotations

import onnx
import onnx.helper as oh

from gn_convert.onnx.lowering.common import FLOAT, call_channels, drop_custom_domain, set_target, value_types
from gn_convert.onnx.lowering.fast import to_fast
from gn_convert.onnx.op import DEFAULT_EPSILON, groupnorm_nodes, is_groupnorm_node

MS_DOMAIN = "com.microsoft"


def _ms_call(node: onnx.NodeProto, channels: int | None, dtype: int) -> list[onnx.NodeProto] | None:
    """``com.microsoft.GroupNorm`` between NCHW<->NHWC Transposes, or None where it does not apply."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    groups, eps = int(attrs["num_groups"]), float(attrs.get("epsilon", DEFAULT_EPSILON))
    if channels is None or channels % groups:
        return None
    name, (x, scale, bias), y = node.name or node.output[0], node.input, node.output[0]
    nodes = [oh.make_node("Transpose", [x], [f"{name}/nhwc"], name=f"{name}/to_nhwc", perm=[0, 2, 3, 1])]
    if dtype != FLOAT:  # the contrib op takes gamma and beta in float32 whatever the data type
        nodes += [oh.make_node("Cast", [v], [f"{name}/{k}_f32"], name=f"{name}/cast_{k}", to=FLOAT)
                  for k, v in (("scale", scale), ("bias", bias))]
        scale, bias = f"{name}/scale_f32", f"{name}/bias_f32"
    nodes += [
        oh.make_node("GroupNorm", [f"{name}/nhwc", scale, bias], [f"{name}/normed_nhwc"], name=f"{name}/norm",
                     domain=MS_DOMAIN, groups=groups, epsilon=eps, activation=0, channels_last=1),
        oh.make_node("Transpose", [f"{name}/normed_nhwc"], [y], name=f"{name}/to_nchw", perm=[0, 3, 1, 2]),
    ]
    return nodes


def to_ms_groupnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower each 4-D custom GroupNorm call to onnxruntime's CUDA contrib ``com.microsoft.GroupNorm``.

    Preconditions: 4-D input (the contrib op is NHWC 2-D only) and a static channel count;
    other calls get the :func:`to_fast` form. The result runs on onnxruntime's CUDA provider
    only (there is no CPU kernel). Its variance is one-pass (see the module docs).

    Args:
        model: a model in the ``function`` form.

    Returns:
        A new model; calls that do not qualify are lowered by :func:`to_fast`.
    """
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    types, shapes = value_types(lowered)
    inits = {init.name: init for init in lowered.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in lowered.graph.node:
        rank = len(shapes.get(node.input[0], [])) if is_groupnorm_node(node) else 0
        ms = _ms_call(node, call_channels(node, shapes, inits), types.get(node.input[0], FLOAT) or FLOAT) \
            if rank == 4 else None
        nodes += ms if ms is not None else [node]
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    if not any(entry.domain == MS_DOMAIN for entry in lowered.opset_import):
        lowered.opset_import.append(oh.make_opsetid(MS_DOMAIN, 1))
    if groupnorm_nodes(lowered):
        lowered = to_fast(lowered)
    drop_custom_domain(lowered)
    set_target(lowered, "ms-groupnorm")
    return lowered
