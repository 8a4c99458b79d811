"""The ``ai.gn_convert::GroupNorm`` operator: its schema and its ONNX function body.

The op normalises ``X`` of shape ``(N, C, D1, ..., Dk)`` (rank >= 3) over groups of
``C / num_groups`` channels and all spatial positions, per sample, then applies a
per-channel affine::

    Y = (X - mean_g) / sqrt(var_g + epsilon) * scale[c] + bias[c]

Inputs ``X`` (float16, bfloat16 or float32), ``scale`` and ``bias`` (``C`` values, the same
type as ``X``); attributes ``num_groups`` (required int, divides ``C``) and ``epsilon`` (float,
default 1e-5); output ``Y`` of ``X``'s shape and type.

The function body computes in float32 whatever the input type, and computes the variance in
two passes (mean first, then the mean of squared deviations). The standard
``GroupNormalization``-21 body uses ``E[x^2] - E[x]^2``, which cancels catastrophically for
inputs with a large mean. The body's rank is static: its output has the rank of ``X`` (the
reshape back uses ``Shape(X)``, whose length is the rank), which runtimes that need a known
rank for the following Conv (OpenVINO) rely on.

The op lives in our own domain and is deliberately not called ``GroupNormalization``:
TensorRT's ONNX parser picks built-in importers by op type alone, ignoring the domain.
"""

from __future__ import annotations

import onnx
import onnx.defs
import onnx.parser
from onnx.defs import OpSchema

DOMAIN = "ai.gn_convert"
OP_TYPE = "GroupNorm"
DOMAIN_VERSION = 1
DEFAULT_EPSILON = 1e-5
MIN_OPSET = 18
"""Lowest default-domain opset the body is written for (``ReduceMean`` takes axes as input)."""

TYPES = ("tensor(float16)", "tensor(bfloat16)", "tensor(float)")

_DOC = __doc__.split("\n\n", 2)[1]

_HEAD = """
<domain: "{domain}", opset_import: ["" : {opset}]>
{op_type} <num_groups, epsilon: float = {epsilon!r}> (X, scale, bias) => (Y)
{{
    x = Cast <to = 1> (X)
    gamma = Cast <to = 1> (scale)
    beta = Cast <to = 1> (bias)
    groups = Constant <value_int: int = @num_groups> ()
    zero_axis = Constant <value_ints = [0]> ()
    groups_1d = Unsqueeze (groups, zero_axis)
    keep_dim = Constant <value_ints = [0]> ()
    spatial_dims = Shape <start = 2> (X)
    rest = ReduceProd <keepdims = 1> (spatial_dims)
    channels_1d = Shape <start = 1, end = 2> (X)
    per_group = Div (channels_1d, groups_1d)
    grouped_shape = Concat <axis = 0> (keep_dim, groups_1d, per_group, rest)
    xg = Reshape (x, grouped_shape)
"""
"""Every body: float32 copies, then X reshaped to (N, G, C/G, D1 * ... * Dk): axes 2 and 3 of a (sample, group)
are its row. The sizes are computed, never ``-1``: a batch of no samples (a detection head on an image without
boxes) leaves nothing to infer ``-1`` from, and onnxruntime refuses such a Reshape (its graph optimiser
also writes one when a row's size is a product it does not fold)."""

_BODY = _HEAD + """    reduce_axis = Constant <value_ints = [2, 3]> ()
    mean = ReduceMean <keepdims = 1> (xg, reduce_axis)
    centered = Sub (xg, mean)
    squared = Mul (centered, centered)
    var = ReduceMean <keepdims = 1> (squared, reduce_axis)
    eps = Constant <value_float: float = @epsilon> ()
    var_eps = Add (var, eps)
    std = Sqrt (var_eps)
    normed = Div (centered, std)
    batch_channels = Shape <start = 0, end = 2> (X)
    channel_shape = Concat <axis = 0> (batch_channels, rest)
    normed_nc = Reshape (normed, channel_shape)
    one_axis = Constant <value_ints = [1]> ()
    gamma_c = Unsqueeze (gamma, one_axis)
    beta_c = Unsqueeze (beta, one_axis)
    scaled = Mul (normed_nc, gamma_c)
    shifted = Add (scaled, beta_c)
    x_shape = Shape (X)
    y = Reshape (shifted, x_shape)
    Y = CastLike (y, X)
}}
"""

_AFFINE_TAIL = """    x_shape = Shape (X)
    normed = Reshape (normed_g, x_shape)
    channels = Shape (gamma)
    channel_zeros = ConstantOfShape <value = float[1] {{0.0}}> (channels)
    channel_ones = ConstantOfShape <value = float[1] {{1.0}}> (channels)
    y = BatchNormalization <epsilon = 0.0> (normed, gamma, beta, channel_zeros, channel_ones)
    Y = CastLike (y, X)
}}
"""
"""The rows back to X's shape, then the per-channel affine as one exact BatchNormalization."""

_INSTANCE_BODY = _HEAD + """    group_ones = ConstantOfShape <value = float[1] {{1.0}}> (groups_1d)
    group_zeros = ConstantOfShape <value = float[1] {{0.0}}> (groups_1d)
    normed_g = InstanceNormalization <epsilon: float = @epsilon> (xg, group_ones, group_zeros)
""" + _AFFINE_TAIL

_LAYER_BODY = _HEAD + """    row_shape = Shape <start = 2> (xg)
    row_ones = ConstantOfShape <value = float[1] {{1.0}}> (row_shape)
    normed_g = LayerNormalization <axis = 2, epsilon: float = @epsilon> (xg, row_ones)
""" + _AFFINE_TAIL

_TWO_LEVEL_BODY = _BODY.replace("""    reduce_axis = Constant <value_ints = [2, 3]> ()
    mean = ReduceMean <keepdims = 1> (xg, reduce_axis)
    centered = Sub (xg, mean)
    squared = Mul (centered, centered)
    var = ReduceMean <keepdims = 1> (squared, reduce_axis)""", """    inner_axis = Constant <value_ints = [3]> ()
    outer_axis = Constant <value_ints = [2]> ()
    channel_means = ReduceMean <keepdims = 1> (xg, inner_axis)
    mean = ReduceMean <keepdims = 1> (channel_means, outer_axis)
    centered = Sub (xg, mean)
    squared = Mul (centered, centered)
    channel_vars = ReduceMean <keepdims = 1> (squared, inner_axis)
    var = ReduceMean <keepdims = 1> (channel_vars, outer_axis)""")
"""``two-pass`` with each row reduced in two levels: each channel's mean (and mean squared deviation)
over axis 3 first, then the mean of those over axis 2 (channels of a group are the same size, so it
is the row's)."""

BODIES = {"layer-norm": _LAYER_BODY, "instance-norm": _INSTANCE_BODY, "two-pass": _BODY, "two-level": _TWO_LEVEL_BODY}
"""Function bodies by name; the first is the default. Each reshapes X to (N, G, C/G, D1 * ... * Dk) and
normalises every (sample, group) row (axes 2 and 3), then applies the per-channel affine as one
BatchNormalization with mean 0, variance 1 and epsilon 0 (exact), except ``two-pass``.

- ``layer-norm`` (default): LayerNormalization over each row. onnxruntime's CPU kernel is
  multi-threaded over rows and the most precise of the three (7e-6 from float64 at input mean
  1000, one node, against 8e-5 for ``instance-norm``).
- ``instance-norm``: InstanceNormalization over each row (the ``fast`` lowering's form; the
  CPU kernel is single-threaded).
- ``two-pass``: ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, then Mul and Add (about ten
  passes over the activation; the body before issue 16).
- ``two-level``: ``two-pass`` reducing each row in two levels (each channel's spatial positions,
  then the group's channels). onnxruntime's float32 reductions lose precision on long rows: a
  GroupNorm of 16 channels at 80x80 (a detection backbone at 320 pixels; 102,400 values a row) is
  3.4e-5 from float64 with every one-level body, 2.7e-7 with this one (torch: 1e-7), at the
  one-level bodies' speed for that layer (scripts/PERF.md). The default for dense tasks
  (segmentation, detection, video: :mod:`gn_convert.tasks`), whose rows are long.

All compute the variance from deviations in float32; OpenVINO runs each inlined. On
onnxruntime CPU, ResNet-50's default artifact costs, relative to the BatchNorm original
(batch 1 / 8, wall clock, quiet machine, scripts/PERF.md): one thread ``layer-norm``
1.23x / 1.34x, ``instance-norm`` 1.22x / 1.32x, ``two-pass`` 1.30x / 1.45x; two threads
``layer-norm`` 1.35-1.67x / 1.49x, ``instance-norm`` 1.45-1.77x / 1.50-1.60x, ``two-pass``
1.60-1.64x / 1.50-1.62x."""
DEFAULT_BODY = next(iter(BODIES))
BODY_KEY = "gn_convert.body"
"""The metadata key recording which body a function-form (or inlined) file carries."""


def function_proto(opset: int, body: str = DEFAULT_BODY) -> onnx.FunctionProto:
    """Build the op's FunctionProto, authored at a given default-domain opset.

    The opset must equal the default-domain opset of the model the function is attached to:
    a mismatch fails ``onnx.checker.check_model(full_check=True)`` and makes
    ``onnx.inliner.inline_local_functions`` skip the function silently.

    Args:
        opset: the model's default-domain (``ai.onnx``) opset, at least 18.
        body: a key of :data:`BODIES`.

    Returns:
        A FunctionProto for ``ai.gn_convert::GroupNorm`` with ``epsilon`` defaulting to 1e-5.

    Raises:
        ValueError: if ``opset`` is below 18.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"the GroupNorm function body needs opset >= {MIN_OPSET}, got {opset}")
    if body not in BODIES:
        raise ValueError(f"unknown GroupNorm body {body!r}; choose one of {', '.join(BODIES)}")
    text = BODIES[body].format(domain=DOMAIN, opset=opset, op_type=OP_TYPE, epsilon=DEFAULT_EPSILON)
    function = onnx.parser.parse_function(text)
    function.doc_string = _DOC
    return function


def _infer_output(ctx: onnx.shape_inference.InferenceContext) -> None:
    """Type and shape inference: ``Y`` has ``X``'s type and shape; check ``num_groups``."""
    x_type = ctx.get_input_type(0)
    groups_attr = ctx.get_attribute("num_groups")
    if groups_attr is None or groups_attr.i < 1:
        raise onnx.shape_inference.InferenceError(f"{OP_TYPE}: num_groups must be a positive int")
    shape = x_type.tensor_type.shape if x_type.tensor_type.HasField("shape") else None
    if shape is not None:
        if len(shape.dim) < 3:
            raise onnx.shape_inference.InferenceError(f"{OP_TYPE}: X must have rank >= 3, got {len(shape.dim)}")
        channels = shape.dim[1]
        if channels.HasField("dim_value") and channels.dim_value % groups_attr.i:
            raise onnx.shape_inference.InferenceError(
                f"{OP_TYPE}: num_groups={groups_attr.i} does not divide C={channels.dim_value}"
            )
    ctx.set_output_type(0, x_type)


def schema() -> OpSchema:
    """Describe the op as an ``onnx.defs.OpSchema`` (with its type and shape inference).

    Returns:
        The schema of ``ai.gn_convert::GroupNorm`` version 1.
    """
    param = OpSchema.FormalParameter
    op_schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        _DOC,
        inputs=[
            param("X", "T", "input of shape (N, C, D1, ..., Dk), rank >= 3"),
            param("scale", "T", "per-channel scale, shape (C,)"),
            param("bias", "T", "per-channel bias, shape (C,)"),
        ],
        outputs=[param("Y", "T", "normalised output, the shape of X")],
        type_constraints=[("T", list(TYPES), "input, scale, bias and output type")],
        attributes=[
            OpSchema.Attribute("num_groups", OpSchema.AttrType.INT, "number of groups; divides C"),
            OpSchema.Attribute(
                "epsilon",
                onnx.helper.make_attribute("epsilon", DEFAULT_EPSILON),
                "added to the variance before the square root",
            ),
        ],
    )
    op_schema.set_type_and_shape_inference_function(_infer_output)
    return op_schema


def register_schema() -> None:
    """Register the op's schema in this process, once.

    onnx's checker and shape inference, onnxscript and torch's exporter all look the schema
    up. Calling this again (or re-importing the module) does nothing.
    """
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    onnx.defs.register_schema(schema())


def opset_import() -> onnx.OperatorSetIdProto:
    """The ``opset_import`` entry a model using the op needs."""
    return onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)



def is_groupnorm_node(node: onnx.NodeProto) -> bool:
    """Whether a node is an ``ai.gn_convert::GroupNorm`` call."""
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def groupnorm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The custom GroupNorm nodes of a model's main graph, in graph order.

    Args:
        model: an exported model.

    Returns:
        The nodes themselves (editing them edits the model). Exported by
        :func:`~gn_convert.onnx.export_onnx`, each node's ``name`` is the qualified torch module
        name of its GroupNorm layer (``layer1.0.bn1``).
    """
    return [node for node in model.graph.node if is_groupnorm_node(node)]


register_schema()
