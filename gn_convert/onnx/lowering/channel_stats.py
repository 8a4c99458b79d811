"""The ``openvino`` pass: GroupNorm from per-channel statistics, so OpenVINO keeps its blocked layout.

OpenVINO's CPU plugin runs convolutions on a blocked layout (``nChw16c`` with AVX-512) and its
reductions and elementwise kernels on that layout too, broadcasting a ``[N, C, 1, 1]`` operand
per channel. Every other GroupNorm form reshapes the activation to ``(N, G, ...)`` (OpenVINO lowers
``GroupNormalization`` and the function bodies to that Reshape and its MVN kernel), and a Reshape
runs on the plain layout only: two reorders of the full activation per layer, more than half of
what GroupNorm costs there (ResNet-50, batch 8: 95 + 7 reorders, 158 of 212 ms of overhead;
scripts/PERF.md). This pass writes each call so that every op on the full tensor keeps the layout::

    m_c = ReduceMean(X, spatial axes)                 per-channel means             [N, C, 1, 1]
    m   = per channel(group mean(m_c))                each group's mean, per channel
    v_c = ReduceMean((X - m)^2, spatial axes)         per-channel mean squared deviation from m
    v   = per channel(group mean(v_c))                the group's variance (two-pass)
    a   = scale / sqrt(v + eps);  b = bias - m * a    per sample and channel         [N, C, 1, 1]
    Y   = X * a + b                                   one pass, which OpenVINO fuses with the
                                                      activation or residual Add after it

Measured (OpenVINO 2026.4.1 CPU, f32, 2 threads, scripts/PERF.md, "OpenVINO"): with a static batch,
ResNet-50 at 1.27x / 1.35x its BatchNorm original (batch 1 / 8) against 1.47x / 1.44x for ``inlined``;
with a dynamic batch OpenVINO neither fuses these elementwise ops nor keeps their broadcast operands
blocked, and this form is the slowest (1.88x / 2.01x, ``inlined`` 1.51x / 1.52x).

A call whose groups hold one channel (instance norm) becomes one InstanceNormalization, which
OpenVINO runs as its MVN kernel directly on the blocked layout. Group means are taken on the
``[N, C, 1, ...]`` statistics (:mod:`~gn_convert.onnx.lowering.calls`), never on the activation.

Precision: the variance is two-pass (deviations from the group mean, computed in float32 as the
function body does), so inputs with a large mean keep their precision (``tests/test_openvino.py``:
within the bounds every body meets at input mean 1000). The output ``X * a + b`` rounds ``X * a`` and
``m * a`` separately, so at input mean 1000 it is less precise than the function body, within the
same bound: up to 6.4e-5 from float64 on one layer, and 1.0e-4 from PyTorch on MobileNetV3-Large's
large-mean parity inputs (``inlined``: 1.4e-5; the bound is 1e-3).

It also avoids an OpenVINO 2026.4 crash: a static-shape ``GroupNormalization`` whose output and an
elementwise ancestor of its input meet in one elementwise op (every residual block) crashes the CPU
plugin's snippets tokenizer (``scripts/openvino_segfault_repro.py``); this form has no
GroupNormalization node.

Calls that do not qualify get the :mod:`~gn_convert.onnx.lowering.fast` form (float16/bfloat16
inputs, an unknown rank or channel count). The file is portable: every op is standard ONNX, and
onnxruntime runs it as well (slower than ``function`` there). Use :func:`to_channel_stats` on a
``function``-form model, or ``lower_onnx(..., target="openvino")``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

from gn_convert.onnx.lowering.calls import Call, group_mean, lower_calls, per_channel
from gn_convert.onnx.lowering.common import (
    FLOAT,
    Constants,
    call_channels,
)
from gn_convert.onnx.op import DEFAULT_EPSILON

OUTPUT_SUFFIX = "/normalised"
"""Name suffix of the last node of each call in this form (what the writer's call count counts)."""


def _eligible(node: onnx.NodeProto, types: dict[str, int], shapes: dict[str, list[int | str]],
              inits: dict[str, onnx.TensorProto]) -> Call | str:
    """The call, when it can take this form; otherwise why not."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    groups, dims, channels = int(attrs["num_groups"]), shapes.get(node.input[0]), call_channels(node, shapes, inits)
    if dims is None or len(dims) < 3:
        return "input rank unknown"
    if (types.get(node.input[0]) or FLOAT) != FLOAT:
        return "not float32"
    if channels is None or channels % groups:
        return "channel count unknown"
    x, scale, bias = node.input
    return Call(node.name or node.output[0], x, scale, bias, node.output[0], groups,
                float(attrs.get("epsilon", DEFAULT_EPSILON)), (dims[0], channels, *dims[2:]))


def _statistics(call: Call, consts: Constants) -> tuple[list[onnx.NodeProto], str, str]:
    """The group mean and variance of each sample, spread over its channels: ``[N, C, 1, ...]`` each."""
    axes = consts.get(f"spatial_axes_rank{call.rank}", np.arange(2, call.rank, dtype=np.int64))
    nodes = [call.node("ReduceMean", [call.x, axes], "mean_c", keepdims=1)]
    grouped, mean_g = group_mean(call, "mean", call.v("mean_c"), consts)
    back, mean = per_channel(call, "mean", mean_g, consts)
    nodes += grouped + back + [
        call.node("Sub", [call.x, mean], "centered"),
        call.node("Mul", [call.v("centered"), call.v("centered")], "squared"),
        call.node("ReduceMean", [call.v("squared"), axes], "var_c", keepdims=1),
    ]
    grouped, var_g = group_mean(call, "var", call.v("var_c"), consts)
    back, var = per_channel(call, "var", var_g, consts)
    return nodes + grouped + back, mean, var


def _lower_call(call: Call, consts: Constants) -> list[onnx.NodeProto]:
    """The replacement nodes of one call: InstanceNormalization when G == C, else the form above."""
    if call.per_group == 1:
        return [oh.make_node("InstanceNormalization", [call.x, call.scale, call.bias], [call.y],
                             name=call.name + OUTPUT_SUFFIX, epsilon=call.eps)]
    nodes, mean, var = _statistics(call, consts)
    eps = consts.get(f"epsilon_{call.eps!r}", np.array(call.eps, np.float32))
    column = consts.get(f"column_{call.channels}_rank{call.rank}",
                        np.array([call.channels] + [1] * (call.rank - 2), np.int64))
    return nodes + [
        call.node("Add", [var, eps], "var_eps"),
        call.node("Sqrt", [call.v("var_eps")], "std"),
        call.node("Reshape", [call.scale, column], "gamma"),
        call.node("Reshape", [call.bias, column], "beta"),
        call.node("Div", [call.v("gamma"), call.v("std")], "gain"),
        call.node("Mul", [mean, call.v("gain")], "mean_gain"),
        call.node("Sub", [call.v("beta"), call.v("mean_gain")], "shift"),
        call.node("Mul", [call.x, call.v("gain")], "scaled"),
        oh.make_node("Add", [call.v("scaled"), call.v("shift")], [call.y], name=call.name + OUTPUT_SUFFIX),
    ]


def to_channel_stats(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every eligible custom GroupNorm call by the per-channel-statistics form above, the others by
    the fast form.

    Preconditions: default-domain opset >= 18. A call is eligible when its input is float32 of known
    rank (3 or more) and its channel count is static; other axes may be symbolic. Node order, value
    names and metadata are kept; the custom function and opset import are dropped.

    Args:
        model: a model in the ``function`` form.

    Returns:
        A new model in standard ops only.

    Raises:
        ValueError: the opset is too old, or a call left to the fast form has an unknown channel count.
    """
    return lower_calls(model, "openvino", _eligible, lambda call, consts: (_lower_call(call, consts), []),
                       OUTPUT_SUFFIX, "from per-channel statistics")
