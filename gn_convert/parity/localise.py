"""Find the first GroupNorm layer whose ONNX output departs from the PyTorch layer's output.

Every GroupNorm output is exposed as an extra graph output on a copy of the ONNX model and
compared with the output of the PyTorch module of the same name, captured by a forward hook.
The exporter names each layer's ONNX output in the model's metadata
(``gn_convert.groupnorm_layers``), so this works for every export target; for other files,
nodes named after a module are used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from gn_convert.onnx.reading import groupnorm_layers
from gn_convert.parity.metrics import compare
from gn_convert.parity.providers import Availability, session_kwargs
from gn_convert.runtime import open_session, run_session
from gn_convert.surgery.observe import register_output_hook


@dataclass(frozen=True)
class LayerError:
    """One layer's output error (max abs over max |torch output|)."""

    layer: str
    max_rel: float
    max_abs: float


@dataclass
class Localisation:
    """The per-layer comparison of one failing provider and optimisation level.

    Attributes:
        first_failing: the first layer (in graph order) above ``tolerance``, or None.
        tolerance: the ``max_rel`` bound applied per layer.
        layers: every compared layer, in graph order.
    """

    first_failing: str | None
    tolerance: float
    layers: list[LayerError] = field(default_factory=list)


def layer_values(model: onnx.ModelProto, module_names: set[str]) -> list[tuple[str, str]]:
    """``(torch layer, ONNX value)`` for every GroupNorm layer that the torch model has."""
    recorded = groupnorm_layers(model)
    if not recorded:  # not written by gn-convert: nodes named after modules
        recorded = [(node.name, node.output[0]) for node in model.graph.node
                    if node.op_type in ("GroupNorm", "GroupNormalization")]
    return [(layer, value) for layer, value in recorded if layer.split("#")[0] in module_names]


def _with_outputs(model: onnx.ModelProto, values: list[str]) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    elem = copy.graph.input[0].type.tensor_type.elem_type
    existing = {out.name for out in copy.graph.output}
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(v, elem, None) for v in values if v not in existing)
    data: bytes = copy.SerializeToString()
    return data


def torch_layer_outputs(model: nn.Module, layers: list[str], x: torch.Tensor,
                   call: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> dict[str, NDArray[Any]]:
    """Each named layer's output (``name#k``: the k-th call) via forward hooks."""
    modules = dict(model.named_modules())
    calls: dict[str, list[NDArray[Any]]] = defaultdict(list)

    def hook(name: str) -> Any:
        return lambda _m, _i, out: calls[name].append(out.detach().cpu().numpy().copy())  # before in-place ops

    handles = [register_output_hook(modules[n], hook(n)) for n in {layer.split("#")[0] for layer in layers}]
    try:
        with torch.no_grad():
            (call or _call)(model, x)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for layer in layers:
        base, _, k = layer.partition("#")
        index = int(k) if k else 0
        if index < len(calls[base]):
            found[layer] = calls[base][index]
    return found


def _call(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def localise(model: nn.Module, onnx_model: onnx.ModelProto, x: torch.Tensor, provider: Availability, level: str,
             max_rel: float, call: Callable[[nn.Module, torch.Tensor], Any] | None = None,
             keep: Callable[[str], bool] | None = None) -> Localisation:
    """Compare every GroupNorm output of the ONNX model with the torch layer's output.

    Args:
        model: the PyTorch model (eval mode).
        onnx_model: the exported model.
        x: the input that made the check fail (float32, the model's device); the ONNX model's one input.
        provider: the provider (and its kernel library, for ``cpu-native``).
        level: ``off``, ``all`` or ``blocked`` (:data:`gn_convert.parity.providers.BLOCKED`).
        max_rel: the per-layer bound.
        call: how the PyTorch model takes ``x`` (default ``model(x)``; a detection model ``model([x])``).
        keep: which layers to compare (default all; a detection model's heads run on data-dependent boxes).

    Returns:
        The per-layer errors and the first layer above ``max_rel``.
    """
    pairs = [(layer, value) for layer, value in layer_values(onnx_model, {name for name, _ in model.named_modules()})
             if keep is None or keep(layer)]
    sess = open_session(_with_outputs(onnx_model, [v for _, v in pairs]), provider=provider.name,
                        cache=False, **session_kwargs(provider, level))  # a one-off model: not worth caching
    feed: NDArray[Any] = x.cpu().numpy().astype(_numpy_type(sess))
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, run_session(sess, {sess.get_inputs()[0].name: feed})))
    reference = torch_layer_outputs(model, [layer for layer, _ in pairs], x, call)
    result = Localisation(None, max_rel)
    for layer, value in pairs:
        if layer not in reference:
            continue
        metrics = compare(reference[layer], got[value])
        result.layers.append(LayerError(layer, metrics.max_rel, metrics.max_abs))
        if result.first_failing is None and not metrics.max_rel <= max_rel:
            result.first_failing = layer
    return result


def _numpy_type(sess: Any) -> type:
    return np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
