"""Export a GroupNorm model to ONNX, in the form each runtime needs.

One trace, then one lowering pass per target (:mod:`gn_convert.onnx.targets` lists them;
:mod:`gn_convert.onnx.lowering` holds the passes):

- ``function`` (default): one ``ai.gn_convert::GroupNorm`` node per GroupNorm call, with the
  op's FunctionProto (two-pass variance, fp32 statistics) attached at the model's opset.
  onnxruntime runs it by inlining the function at load time, or on the native kernel.
- ``inlined``: the function body in standard ops, for runtimes that do not run model-local
  functions (OpenVINO, TensorRT).
- ``standard``: one standard ``GroupNormalization`` (opset 21) node per call. onnxruntime has no
  kernel: it expands the op's standard body, which computes the variance as E[x^2] - E[x]^2
  and loses all precision on inputs with a large mean (max error about 1.7 at mean 1000,
  against 4e-4 for our body). Prefer ``function`` or ``inlined`` for onnxruntime.
- ``fast``: InstanceNormalization per group, then the affine as a BatchNormalization: the
  standard-op form onnxruntime's CPU runs fastest without the native kernel (scripts/PERF.md).
- ``blocked``: standard ops that onnxruntime's CPU keeps on its blocked NCHWc layout, so that no
  full activation is reordered around a GroupNorm (:mod:`gn_convert.onnx.lowering.blocked`).
- ``ms-groupnorm``: onnxruntime's CUDA-only contrib op (one-pass variance).

Every artifact is written into a hidden folder beside its destination, checked there
(``onnx.checker`` full check, strict shape inference, node counts per target) and only then
moved into place. Models over 2 GB keep their weights in ``<file>.data`` beside the model file.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from gn_convert._version import __version__
from gn_convert.atomic import staged_files
from gn_convert.errors import ExportError
from gn_convert.onnx.lowering.common import model_opset
from gn_convert.onnx.lowering.function import attach_function
from gn_convert.onnx.op import DEFAULT_BODY, groupnorm_nodes
from gn_convert.onnx.reading import LAYERS_KEY, groupnorm_layers, read_model
from gn_convert.onnx.targets import DEFAULT_TARGET, STANDARD_OPSET, TARGET_KEY, get_target
from gn_convert.onnx.trace import OUTPUT_NAME, trace
from gn_convert.onnx.verify import NodeCounts, count_nodes
from gn_convert.onnx.write import lower, set_metadata, write_model
from gn_convert.surgery.registry import is_batchnorm

log = logging.getLogger(__name__)

DEFAULT_OPSET = STANDARD_OPSET
"""Opset 21 for every target, so that one traced file can be lowered to any target."""
MAX_NAMES_SHOWN = 3


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the model file.
        files: every file written (the model file, then its external data, if any).
        target: the form written (a name of :data:`gn_convert.onnx.targets.TARGETS`).
        opset: default-domain opset of the model.
        input_shape: the example input shape (N, C, ...); N is symbolic when ``dynamic_batch``.
        dynamic_batch: whether the batch axis is symbolic (named ``batch``).
        dtype: ``float32`` or ``float16``.
        layers: the GroupNorm layers in graph order, each ``(torch module name, ONNX value)``.
        counts: node counts of the written model.
        seconds: wall time of the export.
    """

    path: Path
    files: list[Path]
    target: str
    opset: int
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    dtype: str
    layers: list[tuple[str, str]] = field(default_factory=list)
    counts: NodeCounts | None = None
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        """Total size of the written files."""
        return sum(path.stat().st_size for path in self.files)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data.update(path=str(self.path), files=[str(p) for p in self.files], size_bytes=self.size_bytes,
                    input_shape=list(self.input_shape), layers=len(self.layers))
        return data


def _check_no_batchnorm(model: nn.Module) -> None:
    names = [name for name, module in model.named_modules() if is_batchnorm(module)]
    if names:
        more = f" (+{len(names) - MAX_NAMES_SHOWN} more)" if len(names) > MAX_NAMES_SHOWN else ""
        raise ExportError(f"the model still has {len(names)} BatchNorm layers ({', '.join(names[:MAX_NAMES_SHOWN])}"
                          f"{more}); convert it first, or export it as a baseline (allow_batchnorm=True, --baseline)")


def group_summary(model: nn.Module) -> str:
    """One line on the model's norm layers: GroupNorm count per group count, BatchNorm left."""
    groups = Counter(m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm))
    batchnorm = sum(1 for m in model.modules() if is_batchnorm(m))
    per_group = ", ".join(f"G={g}: {n}" for g, n in sorted(groups.items()))
    return f"{sum(groups.values())} GroupNorm layers ({per_group or 'none'}), {batchnorm} BatchNorm layers"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    target: str = DEFAULT_TARGET,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    allow_batchnorm: bool = False,
    metadata: Mapping[str, str] | None = None,
    external_data: bool | None = None,
    body: str = DEFAULT_BODY,
    output_names: Sequence[str] = (OUTPUT_NAME,),
    images: bool = False,
) -> ExportReport:
    """Export a model with GroupNorm layers to ONNX, with one custom node per GroupNorm call.

    Args:
        model: any ``nn.Module`` (converted by :func:`gn_convert.convert` or built with
            ``nn.GroupNorm``); exported in eval mode, its modes are restored afterwards.
        path: the ``.onnx`` file to write (its folder is created if missing).
        target: ``function`` (default), ``inlined``, ``standard``, ``fast``, ``blocked`` or ``ms-groupnorm``;
            see the module docs.
        input_shape: example input ``(N, C, D1, ...)``, rank >= 3; None guesses
            ``(1, C, 224, 224)`` from the first convolution.
        dynamic_batch: make the batch axis symbolic (``batch``; default True).
        opset: default-domain opset, 18 to 21 (default 21; ``standard`` needs 21).
        fp16: export a float16 model (input, weights and output in float16; the GroupNorm
            statistics are still computed in float32).
        allow_batchnorm: export BatchNorm layers too (the BN original as a baseline, or
            layers the group plan left as BatchNorm); refused by default.
        metadata: extra ``metadata_props`` (source architecture, weights, group plan, ...).
        external_data: weights in ``<file>.data`` beside the model; None (default) decides by
            size (over 2 GB).
        body: the op's function body for the ``function`` and ``inlined`` targets, a key of
            :data:`gn_convert.onnx.op.BODIES` (default ``layer-norm``: as fast as any on
            onnxruntime CPU and the most precise; recorded in the metadata as ``gn_convert.body``).
        output_names: the names of the model's outputs (a tensor or a tuple of tensors), in order.
        images: the model takes a list of images (torchvision detection): ``input_shape`` is one
            image's ``(C, H, W)``, traced with torch's TorchScript-based exporter with height and width
            dynamic (:mod:`gn_convert.onnx.script_trace`); ``dynamic_batch`` and ``fp16`` do not apply.

    Returns:
        The :class:`ExportReport`; ``report.path`` is the written file.

    Raises:
        ExportError: the model has BatchNorm layers (and ``allow_batchnorm`` is False), torch
            cannot export it, or the written model fails a check.
        OutputError: ``path`` cannot be written. Nothing is left behind on any error.
    """
    start = time.perf_counter()
    if images:
        from gn_convert.onnx.script_trace import SCRIPT_OPSET, trace_images

        if input_shape is None or fp16:
            raise ExportError("a model that takes a list of images needs input_shape=(C, H, W), in float32")
        opset, dynamic_batch = SCRIPT_OPSET, False
    get_target(target, opset)
    if not allow_batchnorm:
        _check_no_batchnorm(model)
    path = Path(path)
    with staged_files(path) as stage:
        if images:
            assert input_shape is not None  # checked above
            traced = trace_images(model, input_shape, output_names)
        else:
            traced = trace(model, input_shape, dynamic_batch=dynamic_batch, opset=opset, fp16=fp16,
                           output_names=output_names)
        layers = [(node.name, node.output[0]) for node in groupnorm_nodes(traced.model)]
        if target in ("function", "inlined"):
            attach_function(traced.model, body)
        lowered = lower(traced.model, target)
        set_metadata(lowered, {
            "gn_convert.version": __version__,
            TARGET_KEY: target,
            "gn_convert.input_shape": ",".join(map(str, traced.input_shape)),
            "gn_convert.dynamic_batch": str(dynamic_batch).lower(),
            "gn_convert.dtype": "float16" if fp16 else "float32",
            "gn_convert.group_summary": group_summary(model),
            LAYERS_KEY: json.dumps(layers),
            **(metadata or {}),
        })
        files, counts = write_model(lowered, path, target, calls=traced.naming.num_nodes,
                                    allow_batchnorm=allow_batchnorm,
                                    external_data=external_data, stage=stage)
    report = ExportReport(files[0], files, target, opset, traced.input_shape, dynamic_batch,
                          "float16" if fp16 else "float32", layers, counts, round(time.perf_counter() - start, 3))
    log.info("exported %s (%s, %d GroupNorm nodes) in %.1f s", report.path, target, len(layers), report.seconds)
    return report


def lower_onnx(source: str | Path, path: str | Path, target: str, *, external_data: bool | None = None) -> ExportReport:
    """Write another target of a ``function``-form file without tracing the model again.

    Args:
        source: a file written by :func:`export_onnx` with ``target="function"``.
        path: the file to write.
        target: any target but ``function`` (``standard`` needs the source at opset 21).
        external_data: as in :func:`export_onnx`.

    Returns:
        The report of the written file (its input shape is the source's).

    Raises:
        OnnxFileError: ``source`` is not a readable ONNX file.
        ExportError: ``source`` is not in the function form, or a check failed.
    """
    start = time.perf_counter()
    model = read_model(source)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(TARGET_KEY, "function") != "function":
        raise ExportError(f"{source} is in the {props[TARGET_KEY]} form; lower from the function form")
    opset = model_opset(model)
    get_target(target, opset)
    calls, batchnorm = len(groupnorm_nodes(model)), count_nodes(model).batchnorm > 0
    if not calls:
        raise ExportError(f"{source} has no ai.gn_convert::GroupNorm call to lower; pass a function-form file")
    lowered = lower(model, target)
    set_metadata(lowered, {TARGET_KEY: target})
    files, counts = write_model(lowered, path, target, calls=calls, allow_batchnorm=batchnorm,
                                external_data=external_data)
    shape = tuple(int(d) for d in props.get("gn_convert.input_shape", "").split(",") if d)
    return ExportReport(files[0], files, target, opset, shape, props.get("gn_convert.dynamic_batch") == "true",
                        props.get("gn_convert.dtype", "float32"), groupnorm_layers(model),
                        counts, round(time.perf_counter() - start, 3))
