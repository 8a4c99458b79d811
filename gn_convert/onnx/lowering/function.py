"""The ``function`` pass: attach the op's FunctionProto to a model that calls it."""

from __future__ import annotations

import onnx

from gn_convert.onnx.lowering.common import model_opset
from gn_convert.onnx.op import (
    BODIES,
    BODY_KEY,
    DEFAULT_BODY,
    DOMAIN,
    OP_TYPE,
    function_proto,
    groupnorm_nodes,
    opset_import,
)


def has_function(model: onnx.ModelProto) -> bool:
    """Whether the op's FunctionProto is attached to ``model``."""
    return any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions)


def _record_body(model: onnx.ModelProto, body: str) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props[BODY_KEY] = body
    onnx.helper.set_model_props(model, props)


def body_of(model: onnx.ModelProto) -> str:
    """The body a model's GroupNorm function carries (files without the record: ``two-pass``)."""
    return next((p.value for p in model.metadata_props if p.key == BODY_KEY), "two-pass")


def attach_function(model: onnx.ModelProto, body: str = DEFAULT_BODY) -> onnx.ModelProto:
    """Attach the op's FunctionProto to a model that calls the op (in place), and record its body.

    Preconditions: the model's default-domain opset is at least 18. Nothing is attached to
    a model without custom nodes, nor twice.

    Args:
        model: the exported model.
        body: a key of :data:`gn_convert.onnx.op.BODIES`.

    Returns:
        ``model`` itself.
    """
    if not groupnorm_nodes(model) or has_function(model):
        return model
    model.functions.append(function_proto(model_opset(model), body))
    _record_body(model, body)
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(opset_import())
    return model


def set_body(model: onnx.ModelProto, body: str) -> onnx.ModelProto:
    """Replace the attached GroupNorm FunctionProto by the body named ``body`` (in place).

    Args:
        model: a ``function``-form model.
        body: a key of :data:`gn_convert.onnx.op.BODIES`.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: unknown body, or no GroupNorm function attached.
    """
    if body not in BODIES:
        raise ValueError(f"unknown GroupNorm body {body!r}; choose one of {', '.join(BODIES)}")
    for index, function in enumerate(model.functions):
        if function.domain == DOMAIN and function.name == OP_TYPE:
            model.functions[index].CopyFrom(function_proto(model_opset(model), body))
            _record_body(model, body)
            return model
    raise ValueError("the model has no GroupNorm function to replace; pass a function-form file")
