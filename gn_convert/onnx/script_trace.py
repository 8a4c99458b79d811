"""Trace a model with torch's TorchScript-based ONNX exporter, for models the dynamo exporter cannot take.

torchvision's detection models take a list of images and return, per image, detections whose count
depends on the data (non-maximum suppression): torch.export fails on them ("Could not guard on
data-dependent expression"), while torchvision's own ONNX path, the TorchScript-based exporter,
exports them with the image's height and width dynamic. This module runs that exporter with a
symbolic for ``aten::group_norm`` that emits one ``ai.gn_convert::GroupNorm`` node (the same node
the dynamo translation emits), and turns the exporter's node names
(``/backbone/body/layer1/layer1.0/bn1/GroupNorm``) into the module scopes that
:mod:`gn_convert.onnx.naming` reads, so the rest of the export (function, lowering, checks, layer
names for localisation) is shared.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from gn_convert.errors import ExportError, first_line
from gn_convert.modes import eval_mode
from gn_convert.onnx.naming import SCOPES_KEY, name_groupnorm_nodes
from gn_convert.onnx.op import DOMAIN, OP_TYPE, register_schema
from gn_convert.onnx.trace import Traced, groupnorm_layer_names

SCRIPT_OPSET = 18
"""The TorchScript exporter's opset: the lowest the GroupNorm function body is written for."""
IMAGE_INPUT = "image"
_REPEAT = re.compile(r"^(\d+)_\d+$")


def _group_norm_symbolic(g: Any, x: Any, num_groups: Any, weight: Any, bias: Any, eps: Any, _cudnn: Any) -> Any:
    """``aten::group_norm`` as one custom node (affine-less layers get ones and zeros)."""
    from torch.onnx import symbolic_helper

    groups = symbolic_helper._get_const(num_groups, "i", "num_groups")  # type: ignore[no-untyped-call]
    epsilon = symbolic_helper._get_const(eps, "f", "eps")  # type: ignore[no-untyped-call]
    channels = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([1])),
                    g.op("Constant", value_t=torch.tensor([2])))
    if symbolic_helper._is_none(weight):
        weight = g.op("Expand", g.op("CastLike", g.op("Constant", value_t=torch.tensor(1.0)), x), channels)
    if symbolic_helper._is_none(bias):
        bias = g.op("Expand", g.op("CastLike", g.op("Constant", value_t=torch.tensor(0.0)), x), channels)
    out = g.op(f"{DOMAIN}::{OP_TYPE}", x, weight, bias, num_groups_i=int(groups), epsilon_f=float(epsilon))
    rank = x.type().dim()
    # the type of X without its traced sizes: a size recorded here would be a static shape in the file, which
    # onnxruntime's memory planner trusts, while the image's height and width (hence these sizes) are dynamic
    return out.setType(x.type().with_sizes([None] * rank) if rank is not None else x.type())


def scopes_from_name(node_name: str) -> list[str]:
    """The qualified module scopes in a TorchScript export's node name, then the op's own name:
    ``/backbone/body/layer1/layer1.0/bn1/GroupNorm`` -> ``['', 'backbone', 'backbone.body',
    'backbone.body.layer1', 'backbone.body.layer1.0', 'backbone.body.layer1.0.bn1', 'GroupNorm']``
    (a part that repeats its parent's name with a suffix, ``layer1.0`` under ``layer1``, names the
    parent's child; ``conv.10_2``, the exporter's name for the third call of a shared layer ``conv.10``
    (FCOS's head runs on every FPN level), names ``conv.10``)."""
    parts = [p for p in node_name.split("/") if p]
    if not parts:
        return []
    scopes, path = [""], ""
    for parent, part in zip(["", *parts[:-2]], parts[:-1]):
        relative = part[len(parent) + 1:] if parent and part.startswith(parent + ".") else part
        relative = _REPEAT.sub(r"\1", relative)  # "10_2": the exporter's name for a shared layer's third call
        path = f"{path}.{relative}" if path else relative
        scopes.append(path)
    return [*scopes, parts[-1]]


def _record_scopes(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        entry = node.metadata_props.add()
        entry.key, entry.value = SCOPES_KEY, repr(scopes_from_name(node.name))


def trace_images(model: nn.Module, image_shape: Sequence[int], output_names: Sequence[str]) -> Traced:
    """Export a model that takes a list of images (one image ``(C, H, W)``, height and width dynamic).

    Args:
        model: a model whose forward takes a list of ``(C, H, W)`` tensors (torchvision detection).
        image_shape: the example image's shape ``(C, H, W)``.
        output_names: names of the model's outputs in order (``boxes``, ``labels``, ``scores``, ...).

    Raises:
        ExportError: the exporter fails, or a GroupNorm layer was not exported as the custom op.
    """
    from torch.onnx import register_custom_op_symbolic

    register_schema()
    register_custom_op_symbolic("aten::group_norm", _group_norm_symbolic, SCRIPT_OPSET)
    image = torch.rand(*image_shape, generator=torch.Generator().manual_seed(0))
    dynamic = {IMAGE_INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in output_names}}
    with eval_mode(model), warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")  # the exporter's tracer warnings on torchvision's Python control flow
        path = Path(folder) / "traced.onnx"
        try:
            torch.onnx.export(model, ([image],), str(path), dynamo=False, opset_version=SCRIPT_OPSET,
                              input_names=[IMAGE_INPUT], output_names=list(output_names), dynamic_axes=dynamic)
        except Exception as exc:  # torch raises many types; the message is what matters
            raise ExportError(f"torch cannot export {type(model).__name__}: {first_line(exc)}") from exc
        proto = onnx.load(str(path))
    _record_scopes(proto)
    try:
        naming = name_groupnorm_nodes(proto, groupnorm_layer_names(model))
    except ValueError as exc:
        raise ExportError(f"{exc}; please report it") from None
    return Traced(proto, naming, tuple(int(d) for d in image_shape))
