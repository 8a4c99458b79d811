"""The ``inlined`` pass: replace each call by the function body in standard ops.

For runtimes that do not run model-local functions (OpenVINO, TensorRT).
"""

from __future__ import annotations

import logging

import onnx
import onnx.inliner

from gn_convert.onnx.lowering.common import drop_custom_domain, model_opset
from gn_convert.onnx.lowering.function import attach_function
from gn_convert.onnx.op import DOMAIN, function_proto, groupnorm_nodes, is_groupnorm_node

log = logging.getLogger(__name__)


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
    drop_custom_domain(inlined)
    _name_inlined_nodes(source, inlined)
    return inlined


def _name_inlined_nodes(source: onnx.ModelProto, inlined: onnx.ModelProto) -> None:
    """Name each inlined body node ``<layer>/<body value>`` (``layer1.0.bn1/mean``).

    onnx's inliner leaves the nodes it creates unnamed. It replaces each call by the body's
    nodes, in order, so the calls of ``source`` line up with runs of ``inlined``; when they do
    not (another function was inlined too), the nodes keep empty names.
    """
    attached = next((f for f in source.functions if f.domain == DOMAIN), None)
    function = attached if attached is not None else function_proto(model_opset(source))
    body = [node.output[0] for node in function.node]
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
