"""Checks every written ONNX artifact must pass before it is moved into place.

- ``onnx.checker.check_model(path, full_check=True)`` (by path, so that models with external
  data are checked too);
- strict type and shape inference, with data propagation (on the graph with its large
  weights' bytes taken out: inference reads only their types and shapes);
- node counts: no ``BatchNormalization`` left unless allowed; for the ``function`` form one
  custom node per exported GroupNorm call and the function attached; for the ``inlined`` and
  ``standard`` forms no custom node and no function of ours left, and for ``standard`` one
  ``GroupNormalization`` per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.checker
import onnx.shape_inference

from .errors import ExportError
from .external import weights_detached
from .op import DOMAIN, groupnorm_nodes


@dataclass(frozen=True)
class NodeCounts:
    """Counts of the nodes that matter in a written artifact.

    Attributes:
        custom: ``ai.gn_convert::GroupNorm`` nodes.
        standard_groupnorm: standard ``GroupNormalization`` nodes.
        batchnorm: ``BatchNormalization`` nodes.
        total: all nodes of the main graph.
    """

    custom: int
    standard_groupnorm: int
    batchnorm: int
    total: int


def count_nodes(model: onnx.ModelProto) -> NodeCounts:
    """Count the custom, standard GroupNorm, BatchNorm and all nodes of the main graph."""
    ops = [(node.domain, node.op_type) for node in model.graph.node]
    return NodeCounts(
        custom=len(groupnorm_nodes(model)),
        standard_groupnorm=ops.count(("", "GroupNormalization")),
        batchnorm=ops.count(("", "BatchNormalization")),
        total=len(ops),
    )


def check_onnx(path: Path, model: onnx.ModelProto) -> None:
    """Run onnx's full checker on the file and strict shape inference on the model.

    Args:
        path: the written file (its external data, if any, beside it).
        model: the same model, loaded with or without its external data.

    Raises:
        ExportError: when either check fails.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported model fails onnx's checker: {_first_line(exc)}; please report it") from exc
    try:  # on the graph without its large weights: shape inference needs only their types and shapes
        with weights_detached(model):
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"the exported model fails shape inference: {_first_line(exc)}; please report it") from exc


def check_counts(model: onnx.ModelProto, target: str, calls: int, allow_batchnorm: bool) -> NodeCounts:
    """Assert the node counts of one export target.

    Args:
        model: the artifact's model.
        target: ``function``, ``inlined`` or ``standard``.
        calls: GroupNorm calls the exporter translated (one per layer, more for shared ones).
        allow_batchnorm: whether ``BatchNormalization`` nodes may remain.

    Returns:
        The counts.

    Raises:
        ExportError: when a count is wrong.
    """
    counts = count_nodes(model)
    if counts.batchnorm and not allow_batchnorm:
        raise ExportError(f"the exported model still has {counts.batchnorm} BatchNormalization nodes; "
                          "convert every BatchNorm layer, or pass allow_batchnorm=True")
    ours = [f.name for f in model.functions if f.domain == DOMAIN]
    if target == "function":
        if counts.custom != calls:
            raise ExportError(f"expected {calls} custom GroupNorm nodes, found {counts.custom}; please report it")
        if counts.custom and not ours:
            raise ExportError("the GroupNorm function is not attached to the model; please report it")
    else:
        if counts.custom or ours:
            raise ExportError(f"{counts.custom} custom GroupNorm nodes are left in the {target} form; please report it")
    if target == "standard" and counts.standard_groupnorm != calls:
        raise ExportError(f"expected {calls} GroupNormalization nodes, found {counts.standard_groupnorm}; "
                          "please report it")
    return counts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
