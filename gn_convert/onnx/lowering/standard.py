"""The ``standard`` pass: replace each call by a standard ``GroupNormalization``-21 node."""

from __future__ import annotations

import onnx

from gn_convert.onnx.lowering.common import drop_custom_domain, model_opset
from gn_convert.onnx.op import DEFAULT_EPSILON, groupnorm_nodes
from gn_convert.onnx.targets import STANDARD_OPSET


def to_standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every custom GroupNorm call by a standard ``GroupNormalization``-21 node.

    Preconditions: the model's default-domain opset is exactly 21 (opset 18's
    GroupNormalization takes per-group scale and bias and is rejected by onnx's checker).
    Node names, inputs, outputs, ``num_groups`` and ``epsilon`` are kept;
    ``stash_type`` is float32.

    Args:
        model: a model in the ``function`` form.

    Returns:
        A new model in standard ops only.

    Raises:
        ValueError: if the model's opset is not 21.
    """
    opset = model_opset(model)
    if opset != STANDARD_OPSET:
        raise ValueError(f"GroupNormalization needs opset {STANDARD_OPSET}, the model has opset {opset}")
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    for node in groupnorm_nodes(lowered):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        node.op_type = "GroupNormalization"
        node.domain = ""
        del node.attribute[:]
        node.attribute.extend([
            onnx.helper.make_attribute("num_groups", int(attrs["num_groups"])),
            onnx.helper.make_attribute("epsilon", float(attrs.get("epsilon", DEFAULT_EPSILON))),
            onnx.helper.make_attribute("stash_type", onnx.TensorProto.FLOAT),
        ])
    drop_custom_domain(lowered)
    return lowered
