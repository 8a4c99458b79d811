"""The export targets: the forms an exported model can take, in one map that imports no onnx.

The CLI reads its ``choices=`` and help from :data:`TARGETS` without importing onnx; the export
runs each target's lowering pass (``module:function``, imported when used).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from gn_convert.errors import ExportError

TARGET_KEY = "gn_convert.target"
"""The ``metadata_props`` key that records which target a file is in."""
STANDARD_OPSET = 21
"""The only opset whose ``GroupNormalization`` takes per-channel scale and bias."""


@dataclass(frozen=True)
class Target:
    """One form of exported model.

    Attributes:
        name: the target's name (``--target``).
        summary: what it is and which runtimes it is for (the CLI's help).
        lowering: the pass that produces it from a traced model, as ``module:function``.
        custom_op: whether the file keeps ``ai.gn_convert::GroupNorm`` nodes.
        opset: the default-domain opset it requires, when it requires one.
    """

    name: str
    summary: str
    lowering: str
    custom_op: bool = False
    opset: int | None = None

    def lower(self, model: Any) -> Any:
        """Run this target's lowering pass on an ``onnx.ModelProto``."""
        module, _, function = self.lowering.partition(":")
        return getattr(importlib.import_module(module), function)(model)


_PASSES = "gn_convert.onnx.lowering"

#: target name -> :class:`Target`; the first is the default
TARGETS: dict[str, Target] = {target.name: target for target in (
    Target("function", "one ai.gn_convert::GroupNorm node per layer with its function attached (LayerNormalization "
           "body by default): onnxruntime (fastest with `gn-convert native`)", f"{_PASSES}.function:attach_function",
           custom_op=True),
    Target("inlined", "standard ops only, the function body inlined: OpenVINO, TensorRT, runtimes without "
           "model-local functions", f"{_PASSES}.inline:inline_function"),
    Target("standard", "one standard GroupNormalization-21 node per layer (onnxruntime expands it imprecisely "
           "for inputs with a large mean)", f"{_PASSES}.standard:to_standard", opset=STANDARD_OPSET),
    Target("fast", "InstanceNormalization + BatchNormalization affine: onnxruntime CPU without the native kernel",
           f"{_PASSES}.fast:to_fast"),
    Target("blocked", "standard ops that onnxruntime's CPU keeps on its blocked (NCHWc) layout, no reorder of the "
           "activation around GroupNorm (4-D layers whose C is a multiple of 16; the others as fast): onnxruntime CPU "
           "without the native kernel",
           f"{_PASSES}.blocked:to_blocked"),
    Target("openvino", "GroupNorm from per-channel statistics, no reshape of the activation (OpenVINO keeps its "
           "blocked layout): OpenVINO CPU with a static batch, the fastest there (with a dynamic batch: inlined)",
           f"{_PASSES}.channel_stats:to_channel_stats"),
    Target("ms-groupnorm", "onnxruntime's CUDA contrib com.microsoft.GroupNorm (NHWC, one-pass variance): "
           "onnxruntime CUDA only", f"{_PASSES}.ms_groupnorm:to_ms_groupnorm"),
)}
DEFAULT_TARGET = next(iter(TARGETS))
OPENVINO_TARGETS: tuple[str, ...] = ("openvino", "inlined")
"""The targets gn-convert offers OpenVINO users, fastest first: each compiles and runs on OpenVINO's CPU with
a static and a dynamic batch (``tests/test_openvino.py``). ``function`` does not load there (OpenVINO runs no
model-local functions) and ``standard`` crashes OpenVINO 2026.4 when compiled with a static batch
(``scripts/openvino_segfault_repro.py``)."""


def get_target(name: str, opset: int | None = None) -> Target:
    """The :class:`Target` named ``name``, checked against the model's opset.

    Raises:
        ExportError: an unknown name, or an opset the target cannot use.
    """
    target = TARGETS.get(name)
    if target is None:
        raise ExportError(f"unknown export target {name!r}; choose one of {', '.join(TARGETS)}")
    if target.opset is not None and opset is not None and opset != target.opset:
        raise ExportError(f"target {name} needs opset {target.opset}, not {opset}")
    return target


def describe() -> str:
    """One line per target, for help texts."""
    return "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values())

