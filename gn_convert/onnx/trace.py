"""Trace a torch module into an ONNX graph with one custom node per GroupNorm call.

This is the torch-facing half of the exporter: it runs ``torch.onnx.export(dynamo=True)``
with the custom translation of ``aten.group_norm``, names every custom node after its torch
module (see :mod:`gn_convert.onnx.naming`) and hands back a ``ModelProto`` without the op's
function attached. Everything after that (lowering, checks, writing) is plain ONNX work in
:mod:`gn_convert.onnx.export`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from gn_convert.errors import ExportError, first_line
from gn_convert.modes import eval_mode
from gn_convert.onnx.naming import LayerNaming, name_groupnorm_nodes
from gn_convert.onnx.op import MIN_OPSET
from gn_convert.onnx.translation import translation_table

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
DEFAULT_SIZE = 224
"""Spatial size used when no input shape is given (torchvision classifiers' usual crop)."""


@dataclass
class Traced:
    """The traced graph of one model.

    Attributes:
        model: the ONNX model; custom nodes named after their torch layers, no function yet.
        naming: how the custom nodes map to the model's GroupNorm layers.
        input_shape: the example input shape (N, C, ...) the model was traced with.
    """

    model: onnx.ModelProto
    naming: LayerNaming
    input_shape: tuple[int, ...]


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """Guess ``(1, C, 224, ...)`` from the model's first convolution.

    Args:
        model: the module to export.

    Returns:
        The shape, with the input rank of the first ``nn.Conv1d/2d/3d``.

    Raises:
        ExportError: when the model has no convolution to guess from.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = len(module.kernel_size)
            return (1, module.in_channels, *([DEFAULT_SIZE] * spatial))
    raise ExportError("cannot guess the input shape (the model has no convolution); pass input_shape=(N, C, ...)")


def check_input_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Validate an input shape ``(N, C, D1, ...)``: rank >= 3, positive sizes.

    Raises:
        ExportError: when the shape is not usable.
    """
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ExportError(f"input shape {shape!r} is not a sequence of integers; use N,C,H,W such as 1,3,224,224") from None
    if len(dims) < 3 or min(dims) < 1:
        raise ExportError(f"input shape {dims} must be (N, C, D1, ...) with rank >= 3 and sizes >= 1, such as 1,3,224,224")
    return dims


def groupnorm_layer_names(model: nn.Module) -> set[str]:
    """Qualified names of the model's ``nn.GroupNorm`` modules (subclasses included)."""
    return {name for name, module in model.named_modules() if isinstance(module, nn.GroupNorm)}


def _example(model: nn.Module, shape: tuple[int, ...], dynamic_batch: bool, dtype: torch.dtype) -> torch.Tensor:
    """A seeded example input on the model's device; batch 2 when the batch is dynamic.

    torch.export specialises a dimension of size 1, so a dynamic batch is traced at 2.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    batch = max(shape[0], 2) if dynamic_batch else shape[0]
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape[1:]), generator=gen).to(device=device, dtype=dtype)


def trace(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    dynamic_batch: bool = True,
    opset: int = 21,
    fp16: bool = False,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> Traced:
    """Export ``model`` with torch's dynamo exporter and name its custom GroupNorm nodes.

    Args:
        model: any module; it is traced in eval mode (its modes are restored afterwards).
        input_shape: example input ``(N, C, D1, ...)``; None guesses from the first conv.
        dynamic_batch: make the first input axis symbolic (``batch``).
        opset: default-domain opset of the graph (>= 18).
        fp16: trace a half-precision copy of the model, for a float16 graph.
        output_names: the names of the model's outputs (a tensor, or a tuple of tensors), in order.

    Returns:
        The traced graph, ready for the lowering passes (:mod:`gn_convert.onnx.lowering`).

    Raises:
        ExportError: when torch cannot export the model, or a GroupNorm layer was not
            exported as the custom op.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for the GroupNorm function body; use {MIN_OPSET} or later")
    shape = check_input_shape(input_shape) if input_shape is not None else default_input_shape(model)
    source = copy.deepcopy(model).half() if fp16 else model
    example = _example(source, shape, dynamic_batch, torch.float16 if fp16 else torch.float32)
    dynamic = ({0: BATCH_DIM},) if dynamic_batch else None
    with eval_mode(source):  # torch's exporter warns a lot; the CLI filters that, a library must not
        try:
            program = torch.onnx.export(
                source, (example,), dynamo=True, custom_translation_table=translation_table(),
                opset_version=opset, dynamic_shapes=dynamic, input_names=[INPUT_NAME],
                output_names=list(output_names), optimize=True, verbose=False,
            )
        except Exception as exc:  # torch raises many types; the message is what matters
            raise ExportError(f"torch cannot export {type(model).__name__}: {first_line(exc)}") from exc
    if program is None:  # only for dynamo=False, which is never asked for here
        raise ExportError(f"torch returned no ONNX program for {type(model).__name__}")
    proto = program.model_proto
    try:
        naming = name_groupnorm_nodes(proto, groupnorm_layer_names(source))
    except ValueError as exc:
        raise ExportError(f"{exc}; please report it") from None
    log.info("traced %s: %d nodes, %d GroupNorm calls", type(model).__name__, len(proto.graph.node), naming.num_nodes)
    return Traced(proto, naming, shape)
