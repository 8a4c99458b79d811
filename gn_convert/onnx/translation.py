"""The torch -> ONNX translation of ``aten.group_norm`` into one ``ai.gn_convert::GroupNorm`` node.

torch's dynamo exporter keeps an aten op from being decomposed when it has an entry in
``custom_translation_table``; this module provides that entry. The translation emits a
single call node; the op's FunctionProto is attached to the model after export (see
:mod:`gn_convert.onnx.export`), because the exporter's version-conversion pass inlines local
functions and fails on a call node whose function it cannot see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript
import torch
from onnxscript import opset18 as op

from gn_convert.onnx.op import DOMAIN, DOMAIN_VERSION, OP_TYPE, register_schema

register_schema()
custom_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _affine_or_constant(x: Any, value: Any, fill: float) -> Any:
    """Return ``value`` or, when it is None (``affine=False``), ``fill`` repeated C times."""
    if value is not None:
        return value
    channels = op.Shape(x, start=1, end=2)
    return op.Expand(op.CastLike(op.Constant(value_float=fill), x), channels)  # type: ignore[type-var]


def group_norm(
    x: Any,
    num_groups: int,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    cudnn_enabled: bool = True,
) -> Any:
    """Translate ``aten::group_norm(input, num_groups, weight, bias, eps, cudnn_enabled)``.

    Args:
        x: the input, shape (N, C, ...).
        num_groups: the number of groups.
        weight: per-channel scale, or None for a GroupNorm without affine (ones are used).
        bias: per-channel bias, or None (zeros are used).
        eps: epsilon added to the variance.
        cudnn_enabled: ignored.

    Returns:
        The output of one ``ai.gn_convert::GroupNorm`` node.
    """
    del cudnn_enabled
    scale = _affine_or_constant(x, weight, 1.0)
    shift = _affine_or_constant(x, bias, 0.0)
    node = getattr(custom_opset, OP_TYPE)
    return node(x, scale, shift, num_groups=int(num_groups), epsilon=float(eps))


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    return {torch.ops.aten.group_norm.default: group_norm}

