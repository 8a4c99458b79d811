"""``check_parity``: does the ONNX model compute what the PyTorch model computes?"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from gn_convert.errors import GnConvertError, ParityError, first_line
from gn_convert.modes import eval_mode
from gn_convert.onnx.op import groupnorm_nodes
from gn_convert.onnx.reading import groupnorm_layers, read_model
from gn_convert.parity.inputs import InputSet, image_set, random_sets
from gn_convert.parity.localise import layer_values, localise
from gn_convert.parity.metrics import compare
from gn_convert.parity.providers import LEVELS, Availability, availability, levels_for, parse_providers, session_kwargs
from gn_convert.parity.report import InvarianceResult, ParityReport, ParityRow
from gn_convert.parity.tolerances import HARD_INPUT_FACTOR, REFERENCE_NOISE_FACTOR, Tolerance, tolerance_for
from gn_convert.runtime import open_session, run_session

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _sample_shape(onnx_model: onnx.ModelProto, input_shape: Sequence[int] | None) -> tuple[tuple[int, ...], int | None]:
    """The per-sample input shape (C, ...) and the static batch size (None when dynamic)."""
    if len(onnx_model.graph.input) != 1:
        raise ParityError(f"the ONNX model has {len(onnx_model.graph.input)} inputs; parity checks one-input models")
    dims = _dims(onnx_model.graph.input[0])
    if input_shape is None:
        recorded = {p.key: p.value for p in onnx_model.metadata_props}.get("gn_convert.input_shape", "")
        input_shape = tuple(int(d) for d in recorded.split(",") if d) or None
    given = list(input_shape) if input_shape is not None else [None] * len(dims)
    if len(given) != len(dims):
        raise ParityError(f"input shape {tuple(given)} has rank {len(given)}, the ONNX input has rank {len(dims)}")
    sample = []
    for axis, (static, wanted) in enumerate(zip(dims[1:], given[1:]), start=1):
        if static is None and wanted is None:
            raise ParityError(f"the ONNX input's axis {axis} is dynamic; pass input_shape=(N, C, ...) / --input-shape")
        sample.append(int(static) if static is not None else int(wanted))  # type: ignore[arg-type] # checked above
    return tuple(sample), dims[0]


def _dtype(onnx_model: onnx.ModelProto) -> str:
    elem = onnx_model.graph.input[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(
        elem, onnx.helper.tensor_dtype_to_np_dtype(elem).name)


def _reference(model: nn.Module, x: torch.Tensor) -> list[NDArray[Any]]:
    """The model's outputs on ``x``: one tensor, or each tensor of a tuple, in order."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        out = model(x.to(device))
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not outputs or not all(isinstance(o, torch.Tensor) for o in outputs):
        raise ParityError(f"the PyTorch model returns {type(out).__name__}; parity needs a tensor or a tuple of tensors "
                          "(a dict output: compare the task's exportable module, gn_convert.tasks)")
    return [o.detach().float().cpu().numpy() for o in outputs]


def _recorded_batchnorm(onnx_model: onnx.ModelProto) -> int:
    """BatchNorm layers gn-convert's exporter recorded in the file's metadata (0 when none or not ours)."""
    summary = next((p.value for p in onnx_model.metadata_props if p.key == "gn_convert.group_summary"), "")
    found = re.search(r"(\d+) BatchNorm layers", summary)
    return int(found.group(1)) if found else 0


def _check_match(model: nn.Module, onnx_model: onnx.ModelProto, sample: tuple[int, ...]) -> None:
    """Refuse an ONNX file that is not an export of this model (inputs, outputs, layers)."""
    try:
        out = _reference(model, torch.zeros(1, *sample))
    except ParityError:
        raise
    except Exception as exc:  # the model rejects the ONNX model's input shape
        raise ParityError(f"the ONNX model does not match the PyTorch model: its input (N, {', '.join(map(str, sample))}) "
                          f"fails in PyTorch ({type(exc).__name__}: {first_line(exc, 120)})") from None
    if len(onnx_model.graph.output) != len(out):
        raise ParityError(f"the ONNX model has {len(onnx_model.graph.output)} outputs, the PyTorch model {len(out)}")
    for value, ref in zip(onnx_model.graph.output, out):
        dims = _dims(value)
        if len(dims) != ref.ndim or any(d is not None and d != s for d, s in zip(dims[1:], ref.shape[1:])):
            raise ParityError(f"the ONNX model does not match the PyTorch model: output {value.name} {dims} vs "
                              f"{list(ref.shape)}")
    names = {name for name, _ in model.named_modules()}
    has_groupnorm = any(isinstance(m, nn.GroupNorm) for m in model.modules())
    if has_groupnorm and not groupnorm_layers(onnx_model) and not groupnorm_nodes(onnx_model):
        what = "it was not written by gn-convert"
        batchnorm = sum(node.op_type == "BatchNormalization" for node in onnx_model.graph.node)
        recorded = _recorded_batchnorm(onnx_model)
        if batchnorm or recorded:  # a baseline export folds BatchNorm into the convolutions: its metadata says so
            found = f"{batchnorm} BatchNormalization nodes" if batchnorm else \
                f"{recorded} BatchNorm layers, folded into its convolutions"
            what = f"{found}: it looks like the BatchNorm original (a baseline such as bn.onnx), not the converted model"
        raise ParityError(f"the ONNX file has no GroupNorm layer ({what}); pass the model.onnx that "
                          "`gn-convert MODEL` or `gn-convert export` wrote")
    matched = layer_values(onnx_model, names)
    missing = [layer for layer, _ in groupnorm_layers(onnx_model)
               if layer.split("#")[0] not in names and not layer.startswith("node_")]
    if missing:
        raise ParityError(f"the ONNX model does not match the PyTorch model: it has GroupNorm layer {missing[0]}, "
                          f"which the PyTorch model lacks ({len(matched)} layers match)")


class ReferenceNoise:
    """How far the float32 reference is from a copy of the model in another precision, per input set.

    - ``float64`` (default): the reference's own error against float64, which bounds how closely any
      float32 implementation can be expected to agree with the reference;
    - ``bfloat16``: the same model run by PyTorch in bfloat16 against the float32 reference, which bounds
      how closely a runtime computing in bfloat16 (OpenVINO's default on CPUs with AVX512-BF16 or AMX) can.

    Computed on first use only (a copy of the model in that precision runs on the CPU).
    """

    def __init__(self, model: nn.Module, sets: list[InputSet], refs: dict[str, list[NDArray[Any]]]) -> None:
        self.model, self.sets, self.refs = model, {s.name: s for s in sets}, refs
        self.copies: dict[torch.dtype, nn.Module] = {}
        self.cache: dict[tuple[str, torch.dtype], tuple[float, float]] = {}

    def __call__(self, name: str, precision: torch.dtype = torch.float64) -> tuple[float, float]:
        """(max relative error, smallest per-sample cosine) of input set ``name`` in ``precision``."""
        key = (name, precision)
        if key not in self.cache:
            if precision not in self.copies:
                self.copies[precision] = copy.deepcopy(self.model).cpu().to(precision).eval()
            with torch.no_grad():
                out = self.copies[precision](self.sets[name].data.to(precision))
            outputs = list(out) if isinstance(out, (tuple, list)) else [out]
            found = [compare(o.double().numpy(), ref) for o, ref in zip(outputs, self.refs[name])]
            self.cache[key] = (max(f.max_rel for f in found), min(f.cosine for f in found))
        return self.cache[key]


def _batches(static: int | None, batch: int) -> list[int]:
    return [static] if static is not None else sorted({1, batch})


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    *,
    providers: Sequence[str] | str = ("cpu",),
    levels: Sequence[str] = ("off", "all"),
    batch: int = DEFAULT_BATCH,
    images: str | Path | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    tolerances: dict[tuple[str, str], Tolerance] | None = None,
    localise_failures: bool = True,
    native_library: str | Path | None = None,
) -> ParityReport:
    """Compare an ONNX model under onnxruntime with the PyTorch model it was exported from.

    Every requested provider runs with graph optimisations off and fully on, on seeded random
    inputs, inputs with a large mean and with a large scale, and images from ``images``, at
    batch 1 and ``batch`` (one file; a static-batch file runs at its own batch). The GroupNorm
    invariant (a sample's output does not depend on its batch) is checked on the ONNX model (one whose
    batch is dynamic: a file with a static batch runs at that batch only).
    When a provider fails, the first GroupNorm layer above tolerance is named.

    Args:
        model: the PyTorch model (run in eval mode, float32; its modes are restored).
        onnx_path: the exported file (any target: function, inlined, standard).
        providers: short names (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``openvino-default``) or
            ``"cpu,cuda"``; absent ones are reported as skipped, with the reason. ``openvino`` is OpenVINO's
            CPU runtime with the f32 precision hint, ``openvino-default`` at its default precision (bf16 on
            CPUs with AVX512-BF16 or AMX, whose rows are bounded by PyTorch's own bfloat16 run of the model).
        levels: onnxruntime optimisation levels, ``off`` and/or ``all`` (OpenVINO's rows are its shape modes
            instead: ``dynamic``, the file as it is, and ``static``, reshaped to each batch before compiling).
        batch: the larger batch size (default 8).
        images: a folder of images for one more input set.
        input_shape: ``(N, C, ...)`` for ONNX inputs with dynamic axes besides the batch
            (default: the shape the exporter recorded).
        seed: seed of the random inputs.
        tolerances: ``(provider, dtype) -> Tolerance`` overriding the defaults
            (:data:`gn_convert.parity.DEFAULT_TOLERANCES`).
        localise_failures: name the first failing GroupNorm layer of each failing run.
        native_library: the kernel library for ``cpu-native`` (default: one built here for
            this CPU; pass the library you ship to check that one). ``cpu-native`` at level
            ``all`` runs the plain kernel, as a server that registers the library does, and a
            further ``blocked`` row runs gn-convert's blocked-layout session where this CPU has it.

    Returns:
        The :class:`ParityReport`; ``report.passed`` is the verdict.

    Raises:
        OnnxFileError: ``onnx_path`` is not a readable ONNX file.
        ParityError: the file does not match the model, or an option is invalid.
    """
    names = parse_providers(providers)
    if not set(levels) <= set(LEVELS) or not levels:
        raise ParityError(f"optimisation levels must be among {', '.join(LEVELS)}")
    if batch < 2:
        raise ParityError(f"batch must be at least 2 (got {batch}); batch 1 always runs")
    onnx_model = read_model(onnx_path)
    sample, static = _sample_shape(onnx_model, input_shape)
    report = ParityReport(str(onnx_path), _dtype(onnx_model), sample)
    with eval_mode(model):
        _check_match(model, onnx_model, sample)
        largest = max(_batches(static, batch))
        sets = random_sets((largest, *sample), largest, seed)
        if images is not None:
            sets.append(image_set(images, (largest, *sample), largest))
        refs = {s.name: _reference(model, s.data) for s in sets}
        noise = ReferenceNoise(model, sets, refs)
        for name in names:
            found = availability(name, native_library)
            if not found.available:
                report.skipped[name] = found.reason
                continue
            tolerance = tolerance_for(name, report.dtype, tolerances)
            for level in levels_for(found, levels, rank=1 + len(sample)):
                given = (name, report.dtype) in (tolerances or {})  # a user's bound is taken literally
                try:
                    _run_provider(report, model, onnx_model, Path(onnx_path), found, level, tolerance, sets, refs,
                                  None if given else noise, _batches(static, batch), localise_failures)
                except GnConvertError as err:  # a provider that fails to start or to run is a failed row
                    report.errors[f"{name}/{level}"] = first_line(err)
    log.info("parity %s: %d comparisons, %d skipped", "passed" if report.passed else "FAILED",
             len(report.rows), len(report.skipped))
    return report


def _precision(sess: Any) -> torch.dtype:
    """The precision whose reference noise bounds a session: bfloat16 where it computes in bfloat16
    (OpenVINO's default precision on CPUs with bfloat16 units), else float64."""
    return torch.bfloat16 if getattr(sess, "inference_precision", "f32") == "bf16" else torch.float64


def _within_noise(tol: Tolerance, noise: ReferenceNoise, name: str, precision: torch.dtype) -> Tolerance:
    """``tol`` loosened to the reference's noise in ``precision`` on input set ``name`` (bfloat16: the cosine's
    deficit, about half the squared error, by the square of the error's factor)."""
    factor = REFERENCE_NOISE_FACTOR ** 2 if precision == torch.bfloat16 else REFERENCE_NOISE_FACTOR
    return tol.within_noise(*noise(name, precision), cosine_factor=factor)


def _run_provider(report: ParityReport, model: nn.Module, onnx_model: onnx.ModelProto, path: Path,
                  provider: Availability, level: str, tolerance: Tolerance, sets: list[InputSet],
                  refs: dict[str, list[NDArray[Any]]], noise: ReferenceNoise | None, batches: list[int],
                  localise_failures: bool) -> None:
    """All comparisons and the invariant check of one provider at one optimisation level.

    Raises:
        SessionError, ProviderUnavailableError, NativeBuildError: the session cannot start or run.
    """
    name = provider.name
    sess = open_session(path, provider=name, **session_kwargs(provider, level))
    feed_type = np.float16 if report.dtype == "float16" else np.float32
    input_name = sess.get_inputs()[0].name
    output_names = [o.name for o in sess.get_outputs()] if len(sess.get_outputs()) > 1 else [""]

    def run(x: torch.Tensor) -> list[NDArray[Any]]:
        return list(run_session(sess, {input_name: x.numpy().astype(feed_type)}))

    first_failure: torch.Tensor | None = None
    first_tol = tolerance
    for inputs in sets:
        tol = tolerance.scaled(HARD_INPUT_FACTOR) if inputs.hard else tolerance
        for size in batches:
            x = inputs.data[:size]
            for output, want, got in zip(output_names, refs[inputs.name], run(x)):
                row = ParityRow(name, level, inputs.name, len(x), compare(want[:size], got), tol, output)
                if not row.passed and noise is not None:  # within the reference's own noise still passes
                    row.tolerance = _within_noise(tol, noise, inputs.name, _precision(sess))
                report.rows.append(row)
                if not row.passed and first_failure is None:
                    first_failure, first_tol = x, row.tolerance
    random = sets[0].data[: max(batches)]
    if len(random) > 1 and len(batches) > 1:  # a file with a static batch cannot run one sample alone
        together = run(random)
        alone = [run(random[i:i + 1]) for i in range(len(random))]
        changes = [float(np.abs(whole.astype(np.float64) - np.concatenate([a[k] for a in alone])).max()
                         / max(float(np.abs(whole).max()), 1e-30)) for k, whole in enumerate(together)]
        change = max(math.inf if math.isnan(c) else c for c in changes)  # a NaN in any output fails
        bound = tolerance.invariance_rel
        if noise is not None and _precision(sess) == torch.bfloat16:  # as far as it may differ from PyTorch there
            bound = max(bound, _within_noise(tolerance, noise, sets[0].name, torch.bfloat16).max_rel)
        report.invariance.append(InvarianceResult(name, level, len(random), change, bound))
    if first_failure is not None and localise_failures:
        report.localisation[f"{name}/{level}"] = localise(model, onnx_model, first_failure, provider, level,
                                                          first_tol.max_rel)
