"""The coverage sweep's per-model routine, shared by ``scripts/sweep.py`` and the coverage test.

:func:`classification_row` converts one torchvision (or ``timm/...``) classification model
(untrained weights, BatchNorm statistics made non-trivial on real photo crops), counts its
activation modules before and after (a norm layer that carries an activation must keep it),
exports the ``function`` and ``inlined`` targets and checks their parity; it returns one
catalog row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gn_convert.load.names import build_model
from gn_convert.modes import training_mode
from gn_convert.onnx.export import export_onnx, lower_onnx
from gn_convert.parity.check import check_parity
from gn_convert.surgery.plan import plan as make_plan
from gn_convert.surgery.replace import convert
from gn_convert.testing.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine
from gn_convert.testing.photos import nontrivial_batchnorm, photo_crops

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.GELU, nn.Mish,
               nn.Sigmoid, nn.Tanh, nn.PReLU, nn.ELU, nn.CELU, nn.SELU)
"""Activation module types counted before and after conversion."""
SIZES = (64, 128, 224, 299)
"""Input sides tried in order: the smallest one the model accepts is used (for speed)."""


def first_output(output: Any) -> torch.Tensor:
    """The main tensor of a model's output (a tensor, GoogLeNet/Inception tuples, a dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return first_output(next(iter(output.values())))
    if isinstance(output, (list, tuple)) and output:
        return first_output(output[0])
    raise TypeError(f"cannot read a tensor from a {type(output).__name__}")


class MainOutput(nn.Module):
    """Wrap a model so that it returns one tensor (segmentation dicts, FPN dicts, aux tuples)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return first_output(self.model(x))


def smallest_size(model: nn.Module, modes: tuple[bool, ...] = (False,)) -> int:
    """The smallest side in :data:`SIZES` that the model runs at (batch 2) in each of ``modes``
    (False: evaluation, True: training; each module's mode is restored)."""
    for size in SIZES:
        try:
            for training in modes:
                with torch.no_grad(), training_mode(model, training=training):
                    model(torch.zeros(2, 3, size, size))
            return size
        except (RuntimeError, ValueError):
            continue
    raise RuntimeError(f"the model runs at none of the sizes {SIZES}")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return (its result, seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 2)


def classification_row(name: str, folder: Path, levels: tuple[str, ...] = ("off", "all"),
                       native: bool = False) -> dict[str, Any]:
    """Convert, export (function, inlined) and check one classification model.

    Args:
        name: a torchvision classification model name, or ``timm/<architecture>``.
        folder: where the exported files are written (and removed again).
        levels: onnxruntime optimisation levels the parity check runs.
        native: also check the function file on ``cpu-native`` (the native GroupNorm kernel;
            reported as skipped where it cannot be built).
    """
    torch.manual_seed(0)
    teacher = build_model(name).eval()
    size = smallest_size(teacher)
    nontrivial_batchnorm(teacher, size=size, batch_size=4)
    example = torch.zeros(1, 3, size, size)  # so that layers whose groups hold one value are seen and skipped
    plan, plan_s = timed(lambda: make_plan(teacher, 32, on_single="skip", example_input=example))
    student, convert_s = timed(lambda: convert(teacher, plan=plan).eval())
    activations = [sum(isinstance(m, ACTIVATIONS) for m in model.modules()) for model in (teacher, student)]
    row: dict[str, Any] = {
        "model": name, "kind": "timm" if name.startswith("timm/") else "classification", "input_size": size,
        "activations": activations,
        "bn_layers": len(plan.layers), "fallbacks": len(plan.fallbacks), "left_as_bn": len(plan.untouched),
        "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "convert_s": round(plan_s + convert_s, 2),
    }
    student = MainOutput(student)
    function, inlined = folder / f"{name}.function.onnx", folder / f"{name}.inlined.onnx"
    _, row["function_export_s"] = timed(lambda: export_onnx(
        student, function, input_shape=(1, 3, size, size), allow_batchnorm=bool(plan.untouched)))
    _, row["inlined_export_s"] = timed(lambda: lower_onnx(function, inlined, "inlined"))
    for target, path in (("function", function), ("inlined", inlined)):
        providers = ("cpu", "cpu-native") if native and target == "function" else ("cpu",)
        row.update(parity_summary(check_parity(student, path, providers=providers, levels=levels,
                                                          batch=2), target))
        path.unlink(missing_ok=True)
    row["passed"] = bool(row["function_passed"] and row["inlined_passed"] and activations[0] == activations[1])
    return row


def parity_summary(report: Any, target: str) -> dict[str, Any]:
    """The worst errors of a parity report (every input set, level and batch) and its verdict."""
    rows = report.rows
    return {
        f"{target}_max_abs": max((r.metrics.max_abs for r in rows), default=float("nan")),
        f"{target}_max_rel": max((r.metrics.max_rel for r in rows), default=float("nan")),
        f"{target}_passed": report.passed,
        f"{target}_providers": sorted({r.provider for r in rows}),
        **({f"{target}_failures": report.failures()[:3]} if not report.passed else {}),
    }


DENSE_SIZES = {"segmentation": 128, "detection": 256, "video": 64}
"""The input side the sweep checks each dense task at (for speed; video clips keep their 16 frames)."""


def task_row(name: str, folder: Path) -> dict[str, Any]:
    """Convert, export and check one segmentation, detection or video model the way the main command
    does (its task's export and parity; :mod:`gn_convert.tasks`), at :data:`DENSE_SIZES`.

    Args:
        name: a torchvision segmentation, detection or video model name.
        folder: where the exported file is written (and removed again).
    """
    from gn_convert.load.weights import default_weights_enum, resolve_source
    from gn_convert.pipeline import sized
    from gn_convert.surgery.registry import is_batchnorm
    from gn_convert.tasks import task_of

    torch.manual_seed(0)
    task = task_of(name)
    teacher = build_model(name).eval()
    smallest = max(default_weights_enum(name).meta.get("min_size") or (1, 1))  # S3D takes 224 pixels at least
    size = sized(resolve_source(name, "none").input_size, max(DENSE_SIZES[task.name], int(smallest)))
    kinds = sorted({type(m).__name__ for m in teacher.modules() if is_batchnorm(m)})
    backbone = teacher.get_submodule("backbone") if task.name == "detection" else teacher  # takes a plain batch
    if task.name == "video":  # statistics measured on clips of photo crops
        clips = photo_crops(4, size[-1], seed=0).unsqueeze(2).expand(-1, -1, size[0], -1, -1).contiguous()
        randomize_batchnorm_affine(teacher, seed=0)
        estimate_batchnorm_stats(teacher, clips.split(2))
    else:
        nontrivial_batchnorm(backbone, size=size[-1], batch_size=2)
    teacher.eval()
    plan, plan_s = timed(lambda: make_plan(teacher, 32, on_single="skip", example_input=task.example(size, 1)))
    student, convert_s = timed(lambda: convert(teacher, plan=plan).eval())
    row: dict[str, Any] = {
        "model": name, "kind": task.name, "input_size": "x".join(map(str, size)), "bn_kinds": kinds,
        "bn_layers": len(plan.layers), "fallbacks": len(plan.fallbacks), "left_as_bn": len(plan.untouched),
        "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "convert_s": round(plan_s + convert_s, 2),
    }
    path = folder / f"{name}.function.onnx"
    try:
        report, row["function_export_s"] = timed(lambda: task.export(
            student, path, input_size=size, allow_batchnorm=bool(plan.untouched)))
        row.update(custom_nodes=report.counts.custom, batchnorm_nodes=report.counts.batchnorm)
        parity, row["parity_s"] = timed(lambda: task.check_parity(student, path, input_size=size, batch=2))
        row.update(function_max_rel=parity.worst_max_rel, function_passed=parity.passed,
                   **({"function_failures": parity.failures()[:3]} if not parity.passed else {}))
        exported = {layer.split("#")[0] for layer, _ in report.layers}  # a head shared by FPN levels: one node a call
        row["passed"] = bool(parity.passed and report.counts.batchnorm == 0 and exported == {
            n for n, m in task.exportable(student).named_modules() if isinstance(m, nn.GroupNorm)})
    finally:
        path.unlink(missing_ok=True)
    return row
