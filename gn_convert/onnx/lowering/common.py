"""What every lowering pass shares: the model's opset, its value types and shapes, a call's
channel count, and dropping our domain once no call is left."""

from __future__ import annotations

from typing import Any

import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx.shape_inference
from numpy.typing import NDArray

from gn_convert.onnx.op import DOMAIN, OP_TYPE
from gn_convert.onnx.targets import TARGET_KEY

FLOAT = onnx.TensorProto.FLOAT


def model_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version.

    Raises:
        ValueError: if the model imports no default-domain opset.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the model imports no default-domain opset")


def drop_custom_domain(model: onnx.ModelProto) -> None:
    """Remove the op's function and opset import (precondition: no call node is left)."""
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(node.domain == DOMAIN for node in model.graph.node):
        imports = [entry for entry in model.opset_import if entry.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)


class Constants:
    """Shared initializers added by the pass, one per distinct value."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.names: dict[str, str] = {}

    def get(self, key: str, value: NDArray[Any]) -> str:
        """The name of the initializer ``key`` holding ``value``, added on first use."""
        if key not in self.names:
            name = f"gn_convert.lowering/{key}"
            self.graph.initializer.append(onh.from_array(value, name))
            self.names[key] = name
        return self.names[key]


def call_channels(node: onnx.NodeProto, shapes: dict[str, list[int | str]],
              inits: dict[str, onnx.TensorProto]) -> int | None:
    """The channel count C of a call, from its scale's initializer or inferred shape."""
    scale = node.input[1]
    if scale in inits and len(inits[scale].dims) == 1:
        return int(inits[scale].dims[0])
    dims = shapes.get(scale)
    return int(dims[0]) if dims and isinstance(dims[0], int) else None


def value_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list[int | str]]]:
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


def set_target(model: onnx.ModelProto, target: str) -> None:
    """Record the lowering in the exporter's target key, where the model has it."""
    props = {p.key: p.value for p in model.metadata_props}
    if TARGET_KEY in props:
        props[TARGET_KEY] = target
        oh.set_model_props(model, props)
