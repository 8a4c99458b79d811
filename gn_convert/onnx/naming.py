"""Name each exported GroupNorm node after the torch module it came from.

torch's dynamo exporter records, on every ONNX node, the module scopes the op was called in
(metadata key ``pkg.torch.onnx.name_scopes``, e.g. ``['', 'layer1', 'layer1.0',
'layer1.0.bn1', 'group_norm_3']``: the root, each qualified module name, then the FX node).
The innermost scope that is a GroupNorm layer of the model names the node, so a parity tool
can map ONNX nodes to torch layers. A layer called twice gets ``name``, ``name#1``, ...; a
``group_norm`` called functionally (no GroupNorm module) keeps the exporter's name.
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from dataclasses import dataclass, field

import onnx

from gn_convert.onnx.op import groupnorm_nodes

log = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class LayerNaming:
    """How the custom nodes of an exported model map to the model's GroupNorm layers.

    Attributes:
        calls: exported calls per layer name (more than one for a shared layer).
        functional: custom nodes that come from no GroupNorm module.
        unused: GroupNorm layers that the forward pass never calls.
    """

    calls: Counter[str] = field(default_factory=Counter)
    functional: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        """Custom nodes accounted for: one per call plus the functional ones."""
        return sum(self.calls.values()) + len(self.functional)


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The module scopes the exporter recorded on a node (empty when there are none)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes] if isinstance(scopes, (list, tuple)) else []
    return []


def layer_of(node: onnx.NodeProto, layer_names: set[str]) -> str | None:
    """The innermost GroupNorm layer scope of a node, or None.

    Args:
        node: an exported node.
        layer_names: qualified names of the model's GroupNorm modules.

    Returns:
        The qualified layer name, or None when the node was called outside any such layer.
    """
    scopes = node_scopes(node)[:-1]  # the last entry is the FX node's own name
    for scope in reversed(scopes):
        if scope in layer_names:
            return scope
    return None


def name_groupnorm_nodes(model: onnx.ModelProto, layer_names: set[str]) -> LayerNaming:
    """Rename every custom GroupNorm node after its torch layer.

    Args:
        model: the exported model, still holding the exporter's node metadata.
        layer_names: qualified names of the model's GroupNorm modules.

    Returns:
        The mapping that was applied, with shared, functional and unused layers.

    Raises:
        ValueError: if a layer was exported as something other than the custom op
            (decomposed), or the exporter recorded no module scopes at all.
    """
    naming = LayerNaming()
    nodes = groupnorm_nodes(model)
    if nodes and not any(node_scopes(n) for n in model.graph.node):
        raise ValueError("the exporter recorded no module scopes on the nodes; cannot name them")
    for node in nodes:
        layer = layer_of(node, layer_names)
        if layer is None:
            naming.functional.append(node.name)
            continue
        count = naming.calls[layer]
        node.name = layer if count == 0 else f"{layer}#{count}"
        naming.calls[layer] += 1
    missing = layer_names - set(naming.calls)
    scoped = {layer for n in model.graph.node if (layer := layer_of(n, missing)) is not None}
    if scoped:
        raise ValueError(f"GroupNorm layer(s) {', '.join(sorted(scoped))} were decomposed, not exported as the custom op")
    naming.unused = sorted(missing)
    _log_irregular(naming)
    return naming


def _log_irregular(naming: LayerNaming) -> None:
    shared = sorted(name for name, count in naming.calls.items() if count > 1)
    if shared:
        log.info("GroupNorm layers called more than once (nodes suffixed #k): %s", ", ".join(shared))
    if naming.functional:
        log.info("group_norm calls outside a GroupNorm module keep their names: %s", ", ".join(naming.functional))
    if naming.unused:
        log.info("GroupNorm layers never called in forward: %s", ", ".join(naming.unused))
