"""The ``blocked`` pass: a standard-op GroupNorm that onnxruntime's CPU keeps on its blocked layout.

onnxruntime's CPU provider runs convolutions on a blocked layout (NCHWc, block 8 with AVX2, 16 with
AVX-512) and keeps a tensor there only through the ops its NchwcTransformer knows: Conv (depthwise
too), the pools, the global pools (when the block divides C), Add/Sum of equal channel count (a
broadcast ``[N, C, 1, 1]`` operand is reshaped, not reordered), Mul of provably equal shapes,
Concat, Relu/Sigmoid/Tanh, BatchNormalization with constant parameters, and Resize (nearest,
constant integer scales). Every other op reads the plain layout, so onnxruntime reorders its input
out of the blocked one and the next Conv's input back in: every earlier GroupNorm form
(``function``'s bodies, ``fast``) pays those two reorders of the full activation per layer.

This pass rewrites each eligible call (4-D float32 ``X`` with static ``C``, ``H``, ``W``, and C a
multiple of 16) so that every op on the full ``[N, C, H, W]`` tensor is one of those::

    m    = GlobalAveragePool(X)                            per-channel means           (blocked)
    -m_g = Conv_dw(group mean of m, weight -1)             re-enters the layout        (blocked)
    d    = Add(X, -m_g)                                    broadcast Add               (blocked)
    q, e = GlobalAveragePool(Mul(d, d)), GlobalAveragePool(d)                          (blocked)
    r    = 1 / sqrt(q_g - e_g^2 + eps)                     group means, off the layout ([N, G, 1])
    a    = Conv_dw(r per channel, weight gamma)                                        (blocked)
    b    = Conv_dw(e_g * r per channel, weight -gamma, bias beta)                      (blocked)
    Y    = Add(Mul(d, Resize(a to H x W)), b)              equal-shape Mul, broadcast Add (blocked)

The variance is two-pass: the mean of squared deviations from the first pass's group mean; the
mean of those deviations (``e``: what float32 rounding left of the mean in the first pass)
corrects both the variance and the shift (the corrected two-pass algorithm), so an input with a
large mean loses no precision (1e-6 of the output from float64 at input mean 1000,
``tests/test_blocked_lowering.py``). Only the ``[N, C, 1, 1]`` statistics leave the blocked layout,
three small reorders out and three back in per call; the group means are taken off the layout and
a depthwise 1x1 Conv, which onnxruntime runs blocked, brings each result back.

onnxruntime proves a Mul's operands of equal shape only from their inferred shapes, and Resize's
inferred shape loses a symbolic batch, so the pass records ``d`` and the resized scale as
``[batch, C, H, W]`` in ``value_info`` (without it the Mul and both its operands leave the layout).
The gamma weights are ``Reshape``/``Neg`` of the scale initializer, which onnxruntime folds into
constants before its layout pass.

Calls that do not qualify get the :mod:`~gn_convert.onnx.lowering.fast` form: other ranks,
float16/bfloat16, a symbolic spatial size, and C not a multiple of 16 (onnxruntime pads a
convolution's output to the block, but keeps GlobalAveragePool blocked only when the block divides C;
on a block-16 CPU such a call in this form would reorder three full tensors out). The file is
portable: onnxruntime decides the layout where it runs. The speed of the form is in scripts/PERF.md.

Use :func:`to_blocked` on a ``function``-form model, or ``lower_onnx(..., target="blocked")``.
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

CHANNEL_MULTIPLE = 16
"""A call takes the blocked form when its C is a multiple of every NCHWc block (8 and 16)."""
RESIZE_SUFFIX = "/scale_hw"
"""Name suffix of the one Resize node of each blocked call (what the writer's call count counts)."""
UNKNOWN_BATCH = "gn_convert_batch"
"""The batch dimension recorded in ``value_info`` when the input's batch has neither value nor name."""


def _eligible(node: onnx.NodeProto, types: dict[str, int], shapes: dict[str, list[int | str]],
              inits: dict[str, onnx.TensorProto]) -> Call | str:
    """The call, when it can take the blocked form; otherwise why not."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    groups, dims, channels = int(attrs["num_groups"]), shapes.get(node.input[0]), call_channels(node, shapes, inits)
    if dims is None or len(dims) != 4:
        return "input not 4-D"
    if (types.get(node.input[0]) or FLOAT) != FLOAT:
        return "not float32"
    if channels is None or channels % groups:
        return "channel count unknown"
    if channels % CHANNEL_MULTIPLE:
        return f"C not a multiple of {CHANNEL_MULTIPLE}"
    height, width = dims[2], dims[3]
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        return "spatial size not static"
    batch = dims[0] if dims[0] not in (0, "") else UNKNOWN_BATCH
    x, scale, bias = node.input
    return Call(node.name or node.output[0], x, scale, bias, node.output[0], groups,
                 float(attrs.get("epsilon", DEFAULT_EPSILON)), (batch, channels, height, width))


def _centre(call: Call, consts: Constants) -> list[onnx.NodeProto]:
    """``centered = X - group mean`` (blocked), its squares, and both their per-channel means."""
    neg_ones = consts.get(f"neg_ones_{call.channels}x1x1x1", -np.ones((call.channels, 1, 1, 1), np.float32))
    nodes = [call.node("GlobalAveragePool", [call.x], "mean_c")]
    grouped, mean_g = group_mean(call, "mean", call.v("mean_c"), consts)
    back, mean_ch = per_channel(call, "mean", mean_g, consts)
    return nodes + grouped + back + [
        call.node("Conv", [mean_ch, neg_ones], "neg_mean", group=call.channels),
        call.node("Add", [call.x, call.v("neg_mean")], "centered"),
        call.node("Mul", [call.v("centered"), call.v("centered")], "squared"),
        call.node("GlobalAveragePool", [call.v("squared")], "sq_c"),
        call.node("GlobalAveragePool", [call.v("centered")], "rest_c"),
    ]


def _inverse_std(call: Call, consts: Constants) -> tuple[list[onnx.NodeProto], str, str]:
    """The group statistics off the layout: ``rstd`` and ``rest * rstd``, per group."""
    eps = consts.get(f"epsilon_{call.eps!r}", np.array(call.eps, np.float32))
    sq_nodes, sq_g = group_mean(call, "sq", call.v("sq_c"), consts)
    rest_nodes, rest_g = group_mean(call, "rest", call.v("rest_c"), consts)
    return sq_nodes + rest_nodes + [
        call.node("Mul", [rest_g, rest_g], "rest_sq"),  # what rounding left of the mean: tiny, no cancellation
        call.node("Sub", [sq_g, call.v("rest_sq")], "var"),
        call.node("Add", [call.v("var"), eps], "var_eps"),
        call.node("Sqrt", [call.v("var_eps")], "std"),
        call.node("Reciprocal", [call.v("std")], "rstd"),
        call.node("Mul", [rest_g, call.v("rstd")], "rest_rstd"),
    ], call.v("rstd"), call.v("rest_rstd")


def _normalise(call: Call, rstd: str, rest_rstd: str, consts: Constants) -> list[onnx.NodeProto]:
    """``Y = centered * (gamma * rstd) + (beta - gamma * rest * rstd)``, scale and shift back on the layout."""
    weight_shape = consts.get(f"weight_shape_{call.channels}", np.array([call.channels, 1, 1, 1], np.int64))
    scales = consts.get(f"scales_1x1x{call.shape[2]}x{call.shape[3]}",
                        np.array([1, 1, call.shape[2], call.shape[3]], np.float32))
    scale_nodes, rstd_ch = per_channel(call, "rstd", rstd, consts)
    shift_nodes, rest_ch = per_channel(call, "rest_rstd", rest_rstd, consts)
    resized = call.name + RESIZE_SUFFIX
    return scale_nodes + shift_nodes + [
        call.node("Reshape", [call.scale, weight_shape], "gamma_w"),
        call.node("Neg", [call.v("gamma_w")], "neg_gamma_w"),
        call.node("Conv", [rstd_ch, call.v("gamma_w")], "scale_c", group=call.channels),
        call.node("Conv", [rest_ch, call.v("neg_gamma_w"), call.bias], "shift_c", group=call.channels),
        oh.make_node("Resize", [call.v("scale_c"), "", scales], [resized], name=resized, mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        call.node("Mul", [call.v("centered"), resized], "scaled"),
        oh.make_node("Add", [call.v("scaled"), call.v("shift_c")], [call.y], name=call.v("shifted")),
    ]


def _lower_call(call: Call, consts: Constants) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """The replacement nodes of one call, and the value_info that proves its Mul's operands of equal shape."""
    stats, rstd, rest_rstd = _inverse_std(call, consts)
    nodes = _centre(call, consts) + stats + _normalise(call, rstd, rest_rstd, consts)
    infos = [oh.make_tensor_value_info(value, FLOAT, list(call.shape))
             for value in (call.v("centered"), call.name + RESIZE_SUFFIX)]
    return nodes, infos


def to_blocked(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every eligible custom GroupNorm call by the blocked-layout form above, the others by the fast form.

    Preconditions: default-domain opset >= 18. A call is eligible when its input is 4-D float32
    with static ``H`` and ``W`` and a static ``C`` that is a multiple of 16. Node order, value
    names and metadata are kept; the custom function and opset import are dropped.

    Args:
        model: a model in the ``function`` form.

    Returns:
        A new model in standard ops only.

    Raises:
        ValueError: the opset is too old, or a call left to the fast form has an unknown channel count.
    """
    return lower_calls(model, "blocked", _eligible, _lower_call, RESIZE_SUFFIX, "in the blocked form")
