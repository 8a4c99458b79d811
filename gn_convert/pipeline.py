"""The main command as one Python function: load -> plan -> convert -> recover -> save ->
export -> parity -> deploy, returning the report that ``report.json`` holds.

``gn-convert MODEL ...`` parses its options into :class:`PipelineOptions` and calls
:func:`run_pipeline`; everything it does is available here without the CLI::

    from gn_convert.pipeline import PipelineOptions, run_pipeline
    report = run_pipeline(PipelineOptions("resnet50", weights="none", out=Path("gn-resnet50")))

The output folder is assembled under a temporary name and renamed into place at the end
(:func:`gn_convert.output_folder.staged_folder`), so a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gn_convert import strict_json
from gn_convert._version import __version__
from gn_convert.data.folders import check_data
from gn_convert.errors import DeployError, OptionError
from gn_convert.load.weights import ModelSource, load_model, resolve_source
from gn_convert.output_folder import check_output_folder, refuse_overlap, staged_folder
from gn_convert.stages import Stages
from gn_convert.surgery.checkpoint import save
from gn_convert.surgery.plan import GroupPlan, plan
from gn_convert.surgery.replace import convert
from gn_convert.tasks import TASKS, Task

PARITY_BATCH = 2


@dataclass
class PipelineOptions:
    """Everything the main command can be asked to do (the CLI's options, by the same names).

    Attributes:
        model: torchvision model name (any task: :mod:`gn_convert.tasks`) or ``timm/...``.
        weights: ``DEFAULT``, a weights name, ``none`` or a local file (see :mod:`gn_convert.load`).
        num_classes: classifier size, for untrained weights or a local file.
        weights_backbone: a dense model's backbone weights with ``weights="none"`` (see
            :func:`gn_convert.load.load_model`).
        input_size: the side in pixels of the example, export and parity inputs (default: the
            weights' preset: 224 for most classifiers, 520 for segmentation, 112 for video clips of
            16 frames, 480x640 images for detection).
        out: output folder (default ``./gn-MODEL``, ``/`` replaced by ``-``).
        force: replace an existing output folder (and Triton model).
        weights_format: ``safetensors`` or ``pt``.
        plan: keyword arguments of :func:`gn_convert.plan` (groups, group_size, policy, include,
            exclude, on_single, allow_no_bn).
        init: GroupNorm affine init (a key of :data:`gn_convert.surgery.initialize.INITS`).
        dp_ready: make the saved model trainable under Opacus DP-SGD (recorded in config.json,
            so :func:`gn_convert.load_converted` gives a DP-ready model back).
        fidelity: keyword arguments of :func:`gn_convert.fidelity.stage.run_fidelity`
            (data, calibrate, steps, ...); empty for none.
        recover: keyword arguments of :func:`gn_convert.recover` (data, budget, policy, ...);
            None for none. It replaces plan, convert and ``fidelity``: the plan's ``groups`` is
            its requested G.
        onnx: write ``model.onnx``.
        onnx_target: its form (a key of :data:`gn_convert.onnx.targets.TARGETS`).
        parity: check ``model.onnx`` against the model.
        parity_batch: the larger batch of the parity check.
        native: also check parity on the native kernel (and ship it with ``triton_repo``).
        native_library: the kernel library to check and ship (default: one built here; for
            Triton, built for a portable ``-march``).
        triton_repo: write ``model.onnx`` into this Triton model repository.
        triton_name: the model's name there (default: the output folder's name).
        triton_instance: ``cpu`` or ``gpu`` instances.
    """

    model: str
    weights: str = "DEFAULT"
    num_classes: int | None = None
    weights_backbone: str | None = None
    input_size: int | None = None
    out: Path | None = None
    force: bool = False
    weights_format: str = "safetensors"
    plan: dict[str, Any] = field(default_factory=dict)
    init: str = "bn-stats"
    dp_ready: bool = False
    fidelity: dict[str, Any] = field(default_factory=dict)
    recover: dict[str, Any] | None = None
    onnx: bool = True
    onnx_target: str = "function"
    parity: bool = True
    parity_batch: int = PARITY_BATCH
    native: bool = False
    native_library: Path | None = None
    triton_repo: Path | None = None
    triton_name: str | None = None
    triton_instance: str = "cpu"

    @property
    def output(self) -> Path:
        """The output folder."""
        return Path(self.out or f"gn-{self.model.replace('/', '-')}")  # timm/resnet50 -> gn-timm-resnet50


def versions() -> dict[str, str]:
    """Versions of the packages that determine the result."""
    found = {"gn_convert": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchvision", "onnx", "onnxruntime", "onnxscript"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def check_options(opts: PipelineOptions) -> tuple[Path, Path | None]:
    """Fail before any work when the options cannot all be honoured.

    Returns:
        The output folder, and the native kernel library to check and ship (with ``native``:
        ``native_library``, or one built here, for a portable ``-march`` when it goes to Triton).

    Raises:
        OutputError: the output folder cannot be written (or exists, without ``force``), or it and the
            Triton repository overlap.
        DataError: the data folder is missing or holds no images.
        OptionError, DeployError: contradictory options.
        NativeBuildError: ``native`` and the kernel cannot be had here.
        ServeExtraMissingError: ``triton_repo`` without ``tritonclient``.
    """
    out, library = check_output_folder(opts.output, opts.force), None
    check_data((opts.recover or {}).get("data", opts.fidelity.get("data")))
    for option, key in (("--state-dir", "checkpoint_dir"), ("--synthetic-dir", "synthetic_dir")):
        where = (opts.recover or {}).get(key) or opts.fidelity.get(key)
        if where is not None:  # refused now, not when the result is saved after the whole budget
            refuse_overlap(out, "--out", Path(where), option)
            if key == "synthetic_dir":
                check_output_folder(where, False, option)
    if opts.parity_batch < 2:
        raise OptionError(f"the parity batch must be at least 2 (batch 1 always runs), got {opts.parity_batch}")
    if opts.native or opts.triton_repo is not None:
        if not opts.onnx:
            raise OptionError("--native and --triton-repo need model.onnx; drop --no-onnx")
    if opts.native:
        if opts.onnx_target != "function":
            raise OptionError(f"the native kernel runs the custom op of the function target; the "
                              f"{opts.onnx_target} target has none: drop --onnx-target or --native")
        if opts.triton_instance != "cpu" and opts.triton_repo is not None:
            raise DeployError("the native GroupNorm kernel runs on CPU instances; use --triton-instance cpu "
                              "or drop --native")
        from gn_convert.native import resolve_library

        library = resolve_library(opts.native_library, portable=opts.triton_repo is not None)
    if opts.triton_repo is not None:
        from gn_convert.deploy.extra import model_config_pb2

        model_config_pb2()
        refuse_overlap(out, "--out", opts.triton_repo, "--triton-repo")  # one staged write would swallow the other
        check_output_folder(opts.triton_repo / _triton_name(opts, out), opts.force, "--triton-name",
                            within=opts.triton_repo)
    return out, library


def _triton_name(opts: PipelineOptions, out: Path) -> str:
    from gn_convert.deploy.triton_repo import check_model_name, default_name

    return check_model_name(opts.triton_name or default_name(out / "model.onnx"))


def run_pipeline(opts: PipelineOptions, *, stages: Stages | None = None,
                 progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the main command; returns the report (also written to ``OUT/report.json``).

    Args:
        opts: what to do.
        stages: the stage timer (the CLI's reports each stage on stderr); default silent.
        progress: a callback for the distillation steps (the CLI's progress bar).

    Returns:
        The report: the plan, fidelity, export, parity and deploy results, timings, versions.
        ``report["parity"]["passed"]`` is the verdict when parity ran.

    Raises:
        GnConvertError: bad input, checked before any work where possible.
    """
    out, library = check_options(opts)
    stages = stages or Stages()
    source = resolve_source(opts.model, opts.weights)
    task = TASKS[source.task]
    size = sized(source.input_size, opts.input_size)
    with stages("load", f"loading {opts.model} (weights: {source.weights})"):
        model = load_model(opts.model, opts.weights, num_classes=opts.num_classes,
                           weights_backbone=opts.weights_backbone)
    fidelity: dict[str, Any] = {}
    if opts.recover is not None:
        converted, layer_plan, fidelity = _recover_stage(opts, model, stages, progress)
    else:
        with stages("plan", "planning groups"):
            layer_plan = plan(model, example_input=task.example(size, batch=1), **opts.plan)
        with stages("convert", f"converting ({layer_plan.summary()})"):
            converted = convert(model, plan=layer_plan, init=opts.init, example_input=task.example(size))
    if opts.fidelity and opts.recover is None:
        from gn_convert.fidelity.stage import run_fidelity

        fidelity = run_fidelity(converted, model, opts.model, stages=stages, callback=progress, **opts.fidelity)
    if opts.dp_ready:
        from gn_convert.surgery.dp import make_dp_ready

        with stages("dp-ready", "making the model trainable under Opacus DP-SGD"):
            converted = make_dp_ready(converted, task.example(size))
    with staged_folder(out, opts.force) as tmp:
        with stages("save", f"saving to {out}"):
            kwargs = {} if opts.num_classes is None else {"num_classes": opts.num_classes}
            save(converted, tmp, plan=layer_plan, architecture=opts.model, model_kwargs=kwargs,
                 source_weights=source.weights, weights_format=opts.weights_format,
                 extra={"input_size": list(size), "categories": source.categories, "task": task.name,
                        "weights_backbone": opts.weights_backbone, "dp_ready": opts.dp_ready})
        onnx_fields = _export_stage(opts, converted, tmp, source, size, layer_plan, stages, library)
        triton_fields = _deploy_stage(opts, tmp, out, task, source.categories, stages, parity_failed(onnx_fields),
                                      library)
        report = {
            "model": opts.model,
            "task": task.name,
            "weights": source.weights,
            "init": opts.init,
            "dp_ready": opts.dp_ready,
            "summary": layer_plan.summary(),
            "plan": layer_plan.to_dict(),
            **fidelity,
            **onnx_fields,
            **triton_fields,
            "timings_s": stages.timings,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "report.json").write_text(strict_json.dumps(report, indent=2))
    return report


def _recover_stage(opts: PipelineOptions, model: nn.Module, stages: Stages,
                   progress: Callable[[Any], None] | None) -> tuple[nn.Module, GroupPlan, dict[str, Any]]:
    """Convert and recover in one budgeted call (:func:`gn_convert.recover`)."""
    from gn_convert.fidelity.recover.engine import recover
    from gn_convert.load.weights import default_weights_enum

    options = dict(opts.recover or {})
    options.setdefault("task", resolve_source(opts.model, opts.weights).task)
    options.setdefault("groups", opts.plan.get("groups") or 32)
    options.setdefault("weights", default_weights_enum(opts.model))
    budget = options.get("budget", 900.0)
    with stages("recover", f"recovering within {budget:.0f} s"):
        result = recover(model, callback=progress, **options)
    return result.model.cpu(), result.plan, {"recovery": result.to_dict()}


def parity_failed(fields: dict[str, Any]) -> bool:
    """Whether a report (or its ONNX fields) holds a parity check that failed."""
    parity = fields.get("parity")
    return isinstance(parity, dict) and parity.get("passed") is False


def _export_stage(opts: PipelineOptions, converted: nn.Module, folder: Path, source: ModelSource,
                  size: tuple[int, ...], layer_plan: GroupPlan, stages: Stages, library: Path | None) -> dict[str, Any]:
    """Write ``model.onnx`` and check its parity (the model's task says how); the ``onnx`` and
    ``parity`` report fields."""
    if not opts.onnx:
        return {}
    task = TASKS[source.task]
    metadata = {"source_architecture": opts.model, "source_weights": source.weights, "task": task.name,
                "group_plan": layer_plan.summary(),
                "min_channels_per_group": str(layer_plan.min_channels_per_group)}
    with stages("export", f"exporting model.onnx ({opts.onnx_target})"):
        report = task.export(converted, folder / "model.onnx", input_size=size, target=opts.onnx_target,
                             allow_batchnorm=bool(layer_plan.untouched), metadata=metadata)
    data = report.to_dict()
    data.update(path="model.onnx", files=[Path(p).name for p in data["files"]])
    if not opts.parity:
        return {"onnx": data}
    providers = ("cpu", "cpu-native") if opts.native else ("cpu",)
    with stages("parity", f"checking parity on {', '.join(providers)}"):
        parity = task.check_parity(converted, report.path, providers=providers, batch=opts.parity_batch,
                                   native_library=library, input_size=size)
    result = parity.to_dict()
    skipped = {name: why for name, why in parity.skipped.items() if name in providers}
    result.update(onnx_path="model.onnx", providers=[p for p in providers if p not in skipped],
                  worst_max_rel=parity.worst_max_rel)
    if skipped:  # asked for (--native) and not run: the kernel is unchecked, which is no pass
        result["passed"] = False
        result["failures"] = [f"{name} did not run: {why}" for name, why in skipped.items()] + result["failures"]
    return {"onnx": data, "parity": result}


def sized(preset: tuple[int, ...], side: int | None) -> tuple[int, ...]:
    """The preset input size, or with its last two axes (height and width) ``side`` pixels."""
    return preset if side is None else (*preset[:-2], side, side)


def _deploy_stage(opts: PipelineOptions, folder: Path, out: Path, task: Task, categories: list[str] | None,
                  stages: Stages, failed: bool, library: Path | None) -> dict[str, Any]:
    """Write ``model.onnx`` into the Triton repository; the ``triton`` report field.

    A model whose parity check failed is not deployed: the repository is left alone and the
    report says why.
    """
    if opts.triton_repo is None:
        return {}
    name = _triton_name(opts, out)
    if failed:
        return {"triton": {"skipped": "parity failed", "name": name}}
    from gn_convert.deploy.triton_repo import write_triton_repo

    native_ops = library if opts.native else None
    with stages("triton", f"writing Triton model {name} into {opts.triton_repo}"):
        model_dir = write_triton_repo(folder / "model.onnx", opts.triton_repo, name=name,
                                      instance=opts.triton_instance, labels=task.labels(categories),
                                      native_ops=native_ops, force=opts.force,
                                      max_batch_size=8 if task.batched else 0)
    return {"triton": {"model_dir": str(model_dir), "name": name, "instance": opts.triton_instance,
                       "labels": bool(task.labels(categories)),
                       "native_ops": str(native_ops) if native_ops else None}}
