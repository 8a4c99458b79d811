"""Lowering passes over an exported model: attach, inline, or replace the custom GroupNorm op.

Each pass is one rule with stated preconditions, applied to every ``ai.gn_convert::GroupNorm``
node of the main graph:

- :func:`attach_function`: add the op's FunctionProto, authored at the model's own
  default-domain opset (the form ``target="function"`` ships).
- :func:`inline_function`: replace each call by the function body in standard ops, for
  runtimes without model-local functions (OpenVINO).
- :func:`to_standard`: replace each call by the standard ``GroupNormalization``-21 node.
"""

from __future__ import annotations

import logging

import onnx
import onnx.inliner

from .op import DEFAULT_EPSILON, DOMAIN, OP_TYPE, function_proto, groupnorm_nodes, is_groupnorm_node, opset_import

log = logging.getLogger(__name__)

STANDARD_OPSET = 21
"""The only opset whose ``GroupNormalization`` takes per-channel scale and bias."""


def model_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version.

    Raises:
        ValueError: if the model imports no default-domain opset.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the model imports no default-domain opset")


def _has_function(model: onnx.ModelProto) -> bool:
    return any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions)


def _drop_custom_domain(model: onnx.ModelProto) -> None:
    """Remove the op's function and opset import (precondition: no call node is left)."""
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(node.domain == DOMAIN for node in model.graph.node):
        imports = [entry for entry in model.opset_import if entry.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the op's FunctionProto to a model that calls the op (in place).

    Preconditions: the model's default-domain opset is at least 18. Nothing is attached to
    a model without custom nodes, nor twice.

    Args:
        model: the exported model.

    Returns:
        ``model`` itself.
    """
    if not groupnorm_nodes(model) or _has_function(model):
        return model
    model.functions.append(function_proto(model_opset(model)))
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(opset_import())
    return model


def inline_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline every custom GroupNorm call into standard ops.

    Preconditions: the function is attached at the model's opset (attached here if it is
    missing); the inliner silently skips a function authored at another opset, so the
    result is checked for leftover calls.

    Args:
        model: a model in the ``function`` form.

    Returns:
        A new model without custom nodes, functions of ours, or our opset import.

    Raises:
        ValueError: if a custom node survived inlining.
    """
    source = onnx.ModelProto()
    source.CopyFrom(model)
    attach_function(source)
    inlined = onnx.inliner.inline_local_functions(source)
    if groupnorm_nodes(inlined):
        raise ValueError("the GroupNorm function was not inlined (function opset differs from the model's)")
    _drop_custom_domain(inlined)
    _name_inlined_nodes(source, inlined)
    return inlined


def _name_inlined_nodes(source: onnx.ModelProto, inlined: onnx.ModelProto) -> None:
    """Name each inlined body node ``<layer>/<body value>`` (``layer1.0.bn1/mean``).

    onnx's inliner leaves the nodes it creates unnamed. It replaces each call by the body's
    nodes, in order, so the calls of ``source`` line up with runs of ``inlined``; when they do
    not (another function was inlined too), the nodes keep empty names.
    """
    body = [node.output[0] for node in function_proto(model_opset(source)).node]
    if any(node.domain not in ("", "ai.onnx", DOMAIN) for node in source.graph.node):
        return
    names: list[tuple[int, str]] = []
    position = 0
    for node in source.graph.node:
        if not is_groupnorm_node(node):
            position += 1
            continue
        last = position + len(body) - 1
        if last >= len(inlined.graph.node) or inlined.graph.node[last].output[0] != node.output[0]:
            log.debug("inlined nodes do not line up with the calls; leaving them unnamed")
            return
        names.extend((position + k, f"{node.name}/{value}") for k, value in enumerate(body))
        position += len(body)
    for index, name in names:
        inlined.graph.node[index].name = name


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
    _drop_custom_domain(lowered)
    return lowered
