"""A lowering of the custom GroupNorm op to the standard ops onnxruntime's CPU runs fastest.

onnxruntime runs our op by inlining its function body: about ten elementwise and reduction
kernels per call, each a full pass over the activation. This pass instead rewrites each
``ai.gn_convert::GroupNorm`` call (``X``: ``(N, C, D1, ...)``, ``num_groups`` = G) as::

    Reshape(X, [0, G, -1]) -> InstanceNormalization(scale=1, bias=0) -> Reshape(Shape(X))
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

Use :func:`to_fast` on a ``function``-form model, or :func:`lower_fast` on a file.

For onnxruntime's CUDA provider, :func:`to_ms_groupnorm` lowers each call to the contrib op
``com.microsoft.GroupNorm`` (CUDA only, NHWC only) between two Transposes. That kernel
computes the variance in one pass (sum and sum of squares, as read in onnxruntime's source;
not measured here, for want of a GPU), so it loses our body's robustness to inputs with a
large mean; use it for speed on inputs of moderate mean only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx.shape_inference

from .lower import _drop_custom_domain, model_opset
from .op import DEFAULT_EPSILON, groupnorm_nodes, is_groupnorm_node

log = logging.getLogger(__name__)

FAST_TARGET = "fast"
"""The value of the ``gn_convert.target`` metadata key of a model lowered by this pass."""
MS_TARGET = "ms-groupnorm"
"""The ``gn_convert.target`` of a model lowered by :func:`to_ms_groupnorm`."""
MS_DOMAIN = "com.microsoft"
MIN_OPSET = 15
"""BatchNormalization-15 takes scale/bias and mean/var of different types; Reshape-14 allowzero."""
_FLOAT = onnx.TensorProto.FLOAT


class _Constants:
    """Shared initializers added by the pass, one per distinct value."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.names: dict[str, str] = {}

    def get(self, key: str, value: np.ndarray) -> str:
        """The name of the initializer ``key`` holding ``value``, added on first use."""
        if key not in self.names:
            name = f"gn_convert.fast/{key}"
            self.graph.initializer.append(onh.from_array(value, name))
            self.names[key] = name
        return self.names[key]


def _channels(node: onnx.NodeProto, shapes: dict[str, list[int | str]],
              inits: dict[str, onnx.TensorProto]) -> int | None:
    """The channel count C of a call, from its scale's initializer or inferred shape."""
    scale = node.input[1]
    if scale in inits and len(inits[scale].dims) == 1:
        return int(inits[scale].dims[0])
    dims = shapes.get(scale)
    return int(dims[0]) if dims and isinstance(dims[0], int) else None


def _value_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list[int | str]]]:
    """Element types and shapes of the main graph's values, from strict-free shape inference."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:  # inference needs dims and types, not the weights
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.DEFAULT
        del init.external_data[:]
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    types: dict[str, int] = {}
    shapes: dict[str, list[int | str]] = {}
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    for value in values:
        tensor = value.type.tensor_type
        types[value.name] = tensor.elem_type
        if tensor.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    for init in model.graph.initializer:
        types[init.name] = init.data_type
        shapes[init.name] = list(init.dims)
    return types, shapes


def _lower_call(node: onnx.NodeProto, channels: int | None, dtype: int, consts: _Constants) -> list[onnx.NodeProto]:
    """The replacement nodes of one call (precondition: ``node`` is a custom GroupNorm call)."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    groups, eps = int(attrs["num_groups"]), float(attrs.get("epsilon", DEFAULT_EPSILON))
    name, (x, scale, bias), y = node.name or node.output[0], node.input, node.output[0]
    nodes: list[onnx.NodeProto] = []
    if dtype != _FLOAT:  # compute in float32, as the function body does
        nodes += [oh.make_node("Cast", [v], [f"{name}/{k}_f32"], name=f"{name}/cast_{k}", to=_FLOAT)
                  for k, v in (("x", x), ("scale", scale), ("bias", bias))]
        x, scale, bias, y = f"{name}/x_f32", f"{name}/scale_f32", f"{name}/bias_f32", f"{name}/y_f32"
    if channels is not None and channels == groups:  # instance norm: the affine fits in one node
        nodes.append(oh.make_node("InstanceNormalization", [x, scale, bias], [y], name=f"{name}/norm", epsilon=eps))
    else:
        ones = consts.get(f"ones_{groups}", np.ones(groups, np.float32))
        zeros = consts.get(f"zeros_{groups}", np.zeros(groups, np.float32))
        grouped = consts.get(f"grouped_shape_{groups}", np.array([0, groups, -1], np.int64))
        nodes += [
            oh.make_node("Reshape", [x, grouped], [f"{name}/grouped"], name=f"{name}/group"),
            oh.make_node("InstanceNormalization", [f"{name}/grouped", ones, zeros], [f"{name}/normed_g"],
                         name=f"{name}/norm", epsilon=eps),
            oh.make_node("Shape", [x], [f"{name}/shape"], name=f"{name}/shape"),
            oh.make_node("Reshape", [f"{name}/normed_g", f"{name}/shape"], [f"{name}/normed"], name=f"{name}/ungroup"),
            _affine(name, f"{name}/normed", scale, bias, y, channels, consts),
        ]
    if dtype != _FLOAT:
        nodes.append(oh.make_node("Cast", [y], [node.output[0]], name=f"{name}/cast_y", to=dtype))
    return nodes


def _affine(name: str, normed: str, scale: str, bias: str, y: str, channels: int | None,
            consts: _Constants) -> onnx.NodeProto:
    """``y = normed * scale[c] + bias[c]`` as one BatchNormalization (mean 0, variance 1, epsilon 0: exact).

    One pass, where Mul then Add (torch's export) are two. A depthwise 1x1 Conv, which
    onnxruntime runs in its NCHWc layout with the Relu and residual Add fused, measured slower
    (scripts/PERF.md).
    """
    if channels is None:
        raise ValueError(f"the channel count of {scale!r} is unknown; the fast lowering needs static C")
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
    types, shapes = _value_types(lowered)
    inits = {init.name: init for init in lowered.graph.initializer}
    consts = _Constants(lowered.graph)
    nodes: list[onnx.NodeProto] = []
    calls = 0
    for node in lowered.graph.node:
        if not is_groupnorm_node(node):
            nodes.append(node)
            continue
        calls += 1
        dtype = types.get(node.input[0], _FLOAT) or _FLOAT
        nodes += _lower_call(node, _channels(node, shapes, inits), dtype, consts)
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    _drop_custom_domain(lowered)
    _set_target(lowered, FAST_TARGET)
    log.info("fast lowering: %d GroupNorm calls -> InstanceNormalization form", calls)
    return lowered


def lower_fast(source: str | Path, path: str | Path) -> Path:
    """Write the fast form of an exported file (checked by onnx's checker, written atomically).

    Args:
        source: an ONNX file with custom GroupNorm calls (``gn-convert export``'s function form).
        path: the file to write.

    Returns:
        The written path.

    Raises:
        OnnxFileError: ``source`` is not a readable ONNX file.
        ExportError: ``source`` has no custom GroupNorm call, or the result fails onnx's checker.
        OutputError: ``path`` cannot be written.
    """
    from .errors import ExportError
    from .export import write_model
    from .reading import read_model
    from .verify import count_nodes

    model = read_model(source)
    if not groupnorm_nodes(model):
        raise ExportError(f"{source} has no ai.gn_convert::GroupNorm call to lower; pass a function-form file")
    try:
        lowered = to_fast(model)
    except ValueError as exc:
        raise ExportError(f"cannot lower {source}: {exc}") from None
    files, _ = write_model(lowered, path, "inlined", calls=0, allow_batchnorm=True)
    log.info("wrote %s (%d nodes)", files[0], count_nodes(lowered).total)
    return files[0]


def _ms_call(node: onnx.NodeProto, channels: int | None, dtype: int) -> list[onnx.NodeProto] | None:
    """``com.microsoft.GroupNorm`` between NCHW<->NHWC Transposes, or None where it does not apply."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    groups, eps = int(attrs["num_groups"]), float(attrs.get("epsilon", DEFAULT_EPSILON))
    if channels is None or channels % groups:
        return None
    name, (x, scale, bias), y = node.name or node.output[0], node.input, node.output[0]
    nodes = [oh.make_node("Transpose", [x], [f"{name}/nhwc"], name=f"{name}/to_nhwc", perm=[0, 2, 3, 1])]
    if dtype != _FLOAT:  # the contrib op takes gamma and beta in float32 whatever the data type
        nodes += [oh.make_node("Cast", [v], [f"{name}/{k}_f32"], name=f"{name}/cast_{k}", to=_FLOAT)
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
    types, shapes = _value_types(lowered)
    inits = {init.name: init for init in lowered.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in lowered.graph.node:
        rank = len(shapes.get(node.input[0], [])) if is_groupnorm_node(node) else 0
        ms = _ms_call(node, _channels(node, shapes, inits), types.get(node.input[0], _FLOAT) or _FLOAT) \
            if rank == 4 else None
        nodes += ms if ms is not None else [node]
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    if not any(entry.domain == MS_DOMAIN for entry in lowered.opset_import):
        lowered.opset_import.append(oh.make_opsetid(MS_DOMAIN, 1))
    if groupnorm_nodes(lowered):
        lowered = to_fast(lowered)
    _drop_custom_domain(lowered)
    _set_target(lowered, MS_TARGET)
    return lowered


def _set_target(model: onnx.ModelProto, target: str) -> None:
    """Record the lowering in the exporter's ``gn_convert.target`` key, where the model has it."""
    props = {p.key: p.value for p in model.metadata_props}
    if "gn_convert.target" in props:
        props["gn_convert.target"] = target
        oh.set_model_props(model, props)
