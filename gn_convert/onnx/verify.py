"""Checks every written ONNX artifact must pass before it is moved into place.

- ``onnx.checker.check_model(path, full_check=True)`` (by path, so that models with external
  data are checked too);
- strict type and shape inference, with data propagation (on the graph with its large
  weights' bytes taken out: inference reads only their types and shapes);
- node counts: no ``BatchNormalization`` left unless allowed; for the ``function`` form one
  custom node per exported GroupNorm call and the function attached; for the ``inlined`` and
  ``standard`` forms no custom node and no function of ours left, and for ``standard`` one
  ``GroupNormalization`` per call (one InstanceNormalization for ``fast``, one contrib GroupNorm or
  InstanceNormalization for ``ms-groupnorm``, one marked Resize or InstanceNormalization for ``blocked``, one
  marked Add or InstanceNormalization for ``openvino``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.checker
import onnx.shape_inference

from gn_convert.errors import ExportError, first_line
from gn_convert.onnx.external import weights_detached
from gn_convert.onnx.lowering.blocked import RESIZE_SUFFIX
from gn_convert.onnx.lowering.channel_stats import OUTPUT_SUFFIX
from gn_convert.onnx.op import BODY_KEY, DOMAIN, groupnorm_nodes


@dataclass(frozen=True)
class NodeCounts:
    """Counts of the nodes that matter in a written artifact.

    Attributes:
        custom: ``ai.gn_convert::GroupNorm`` nodes.
        standard_groupnorm: standard ``GroupNormalization`` nodes.
        batchnorm: ``BatchNormalization`` nodes.
        total: all nodes of the main graph.
        instance_norm: ``InstanceNormalization`` nodes (one per call in the ``fast`` form).
        ms_groupnorm: ``com.microsoft.GroupNorm`` nodes (the ``ms-groupnorm`` form).
        blocked_groupnorm: calls in the ``blocked`` form (its Resize nodes named ``<layer>/scale_hw``).
        channel_stats: calls in the ``openvino`` form computed from per-channel statistics (their last node
            named ``<layer>/normalised``; its calls with one channel a group are InstanceNormalization nodes).
    """

    custom: int
    standard_groupnorm: int
    batchnorm: int
    total: int
    instance_norm: int = 0
    ms_groupnorm: int = 0
    blocked_groupnorm: int = 0
    channel_stats: int = 0


def count_nodes(model: onnx.ModelProto) -> NodeCounts:
    """Count the custom, standard GroupNorm, BatchNorm and all nodes of the main graph."""
    ops = [(node.domain, node.op_type) for node in model.graph.node]
    return NodeCounts(
        custom=len(groupnorm_nodes(model)),
        standard_groupnorm=ops.count(("", "GroupNormalization")),
        batchnorm=ops.count(("", "BatchNormalization")),
        total=len(ops),
        instance_norm=ops.count(("", "InstanceNormalization")),
        ms_groupnorm=ops.count(("com.microsoft", "GroupNorm")),
        blocked_groupnorm=sum(1 for node in model.graph.node
                              if node.op_type == "Resize" and node.name.endswith(RESIZE_SUFFIX)),
        channel_stats=sum(1 for node in model.graph.node
                          if node.op_type != "InstanceNormalization" and node.name.endswith(OUTPUT_SUFFIX)),
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
        raise ExportError(f"the exported model fails onnx's checker: {first_line(exc)}; please report it") from exc
    try:  # on the graph without its large weights: shape inference needs only their types and shapes
        with weights_detached(model):
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"the exported model fails shape inference: {first_line(exc)}; please report it") from exc


def _calls_in(counts: NodeCounts, target: str, body: str) -> int | None:
    """How many GroupNorm calls a model of ``target`` form shows (None: not countable there)."""
    inlined = counts.instance_norm if body == "instance-norm" else None
    return {"function": counts.custom, "standard": counts.standard_groupnorm, "fast": counts.instance_norm,
            "ms-groupnorm": counts.ms_groupnorm + counts.instance_norm, "inlined": inlined,
            "blocked": counts.blocked_groupnorm + counts.instance_norm,
            "openvino": counts.channel_stats + counts.instance_norm}.get(target)


def check_counts(model: onnx.ModelProto, target: str, calls: int, allow_batchnorm: bool) -> NodeCounts:
    """Assert the node counts of one export target.

    Args:
        model: the artifact's model.
        target: the form ``model`` is in (a name of :data:`gn_convert.onnx.targets.TARGETS`).
        calls: GroupNorm calls the exporter translated (one per layer, more for shared ones).
        allow_batchnorm: whether ``BatchNormalization`` nodes of the original model may remain
            (the ``fast`` forms, and the inlined ``instance-norm`` and ``layer-norm`` bodies, add one
            per call for the affine, ``blocked`` and ``openvino`` one per call they leave in the fast form;
            those are not counted against it).

    Returns:
        The counts.

    Raises:
        ExportError: when a count is wrong.
    """
    counts = count_nodes(model)
    body = next((p.value for p in model.metadata_props if p.key == BODY_KEY), "two-pass")
    affine = calls if target in ("fast", "ms-groupnorm", "blocked", "openvino") \
        or (target == "inlined" and body != "two-pass") else 0
    if counts.batchnorm > affine and not allow_batchnorm:
        raise ExportError(f"the exported model still has {counts.batchnorm - affine} BatchNormalization nodes; "
                          "convert every BatchNorm layer, or pass allow_batchnorm=True")
    ours = [f.name for f in model.functions if f.domain == DOMAIN]
    if target == "function":
        if counts.custom and not ours:
            raise ExportError("the GroupNorm function is not attached to the model; please report it")
    elif counts.custom or ours:
        raise ExportError(f"{counts.custom} custom GroupNorm nodes are left in the {target} form; please report it")
    found = _calls_in(counts, target, body)
    if found is not None and found != calls:
        raise ExportError(f"expected {calls} GroupNorm calls in the {target} form, found {found}; please report it")
    return counts
