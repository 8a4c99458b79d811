"""``recover``: the whole recovery job in one call, within a time budget.

Convert through the same path as :func:`gn_convert.convert` (the same plan options, policies
and init), then run the stages asked for within ``budget`` seconds:

- ``distill`` (default): knowledge distillation from the frozen BatchNorm teacher on fresh
  augmented views of the training photos: KL on the logits plus a loss on every GroupNorm
  output (a dense target per layer); its learning rate anneals with the *time* spent, so a busy
  machine gets fewer steps but a finished schedule, never a half-done one;
- ``reconstruct``: block-wise reconstruction (:mod:`gn_convert.fidelity.reconstruct.engine`) first.

After each stage the student is scored on held-out photos that no step trains on
(:mod:`gn_convert.fidelity.recover.data`: the split is by photo, several fixed views of each),
and on fresh views of the training photos (the fit). The state with the lowest held-out KL is
kept, so a stage that made things worse is undone and the call always returns the best state it
reached. The result carries both figures and warnings when the fit runs ahead of the held-out
agreement, when held-out photos look like views of training photos, or when the budget ran out
before a stage finished its planned work.

The caller's models are never moved, put in another mode or changed: the teacher is copied to
the device when it lives elsewhere, and the student (a given one too) is a copy.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from gn_convert.data.sources import DataSplit
from gn_convert.errors import OptionError
from gn_convert.fidelity import distributed as ddp
from gn_convert.fidelity.distill.engine import _size, distill
from gn_convert.fidelity.pairs import TRAINED_WEIGHTS_HINT, check_trained, norm_pairs
from gn_convert.fidelity.reconstruct.engine import reconstruct
from gn_convert.fidelity.recover.data import (
    SYNTHETIC,
    AugmentedTensors,
    RecoveryData,
    check_heldout,
    data_fingerprint,
    endless_batches,
    fresh_views,
    recovery_data,
    same_scene_warnings,
)
from gn_convert.fidelity.recover.plan import group_plan, step_seconds, student_plan
from gn_convert.fidelity.recover.report import (
    Clock,
    Judge,
    Progress,
    RecoveryResult,
    StageResult,
    closing_warnings,
    kept_stage,
)
from gn_convert.fidelity.recover.state import load_recovery, run_fingerprint, save_recovery, saved_plan, trajectory
from gn_convert.fidelity.synthesize.engine import synthesize, write_pngs
from gn_convert.modes import eval_mode
from gn_convert.surgery.group_count import resolve_min_channels
from gn_convert.surgery.plan import GroupPlan
from gn_convert.surgery.registry import is_batchnorm
from gn_convert.surgery.replace import convert
from gn_convert.tasks import CLASSIFICATION, TASKS, Task, task_for_module

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("reconstruct", "distill")
DEFAULT_STAGES: tuple[str, ...] = ("distill",)
CHECKPOINT_EVERY = 25
"""Distillation steps between saved states when the recovery has a checkpoint folder."""
COMPLETE = 0.9
"""A distillation that ran at least this share of the steps planned from its measured speed counts as
complete (its learning rate always anneals with the time; fewer steps mean a busier machine)."""
OVERPLAN = 4.0
"""Distillation plans this many times the steps its measured step time says fit: the time limit ends it, and its
schedule (warmup and cosine) follows the time spent, so it ends with the budget whatever the steps cost. A
plan that fit exactly left up to a third of the budget unspent whenever the probe's step time ran slower than
the steps (527-770 s of 900 on EfficientNet-Lite1; 1.5 times as many still left 8 s of 19)."""
TIME_USED = 0.95
"""A stage that ran this share of its time did the work its budget allowed."""
INVERT_STEPS, INVERT_LR = 20, 0.02
"""Inversion from photos: Adam steps and learning rate (normalised pixels), small so the images stay natural."""
SYNTHETIC_FROM = ("noise", "photos")
__all__ = ["AugmentedTensors", "DEFAULT_STAGES", "STAGES", "SYNTHETIC", "recover"]


def recover(
    model: nn.Module,
    data: Any = None,
    *,
    teacher: nn.Module | None = None,
    groups: int | None = 32,
    group_size: int | None = None,
    policy: str = "divisor",
    min_channels_per_group: int | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    fold: Iterable[str] | None = None,
    on_single: str = "error",
    init: str = "bn-stats",
    budget: float = 900.0,
    stages: tuple[str, ...] | None = None,
    batch_size: int = 16,
    lr: float = 1e-4,
    mixup: float = 0.0,
    feature_weight: float = 1.0,
    channels_last: bool = True,
    cpu_bf16: bool = False,
    reconstruct_lr: float = 1e-3,
    reconstruct_drop: float = 0.0,
    reconstruct_allocate: str = "equal",
    synthetic: int = 0,
    synthetic_size: int = 64,
    synthetic_from: str = "noise",
    synthetic_dir: str | Path | None = None,
    weights: Any = None,
    input_size: int | None = None,
    holdout: float | int = 0.1,
    eval_data: Any = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[Any], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    task: str | None = None,
) -> RecoveryResult:
    """Convert ``model`` to GroupNorm and bring it back to its function within ``budget`` seconds.

    Args:
        model: the BatchNorm model (the teacher; never changed), or an already converted
            student when ``teacher`` is given (it is copied, not changed).
        data: a folder of photos (a tenth of the files, at least one, are held out), a Dataset
            or DataSplit, ``"synthetic"`` for a data-free recovery, or None with ``synthetic``.
        teacher: the BatchNorm original, when ``model`` is already converted.
        groups, group_size, policy, min_channels_per_group, include, exclude, fold, on_single:
            the group plan, as in :func:`gn_convert.plan`; ``policy="fidelity"`` measures each
            layer's candidates on training images; folded layers stay exact.
        init: ``bn-stats`` or ``identity``, as in :func:`gn_convert.convert`.
        budget: wall-clock seconds for everything after loading.
        stages: which of ``reconstruct`` and ``distill`` to run, in order. Default: ``distill``
            with real data; none with ``data="synthetic"`` (measured: distilling on images
            synthesised from the BatchNorm statistics lowered real-photo agreement, 14.0% ->
            3.0% on EfficientNet-Lite0; data-free, the images choose the fidelity plan).
        batch_size, lr, mixup, feature_weight, channels_last, cpu_bf16: distillation (see :func:`gn_convert.distill`;
            channels-last: 1.52x the steps in a CPU budget; bfloat16 autocast: fewer, and off by default).
        reconstruct_lr, reconstruct_drop, reconstruct_allocate: block reconstruction's Adam learning
            rate, QDrop input mixing and budget shares (see :func:`~gn_convert.fidelity.reconstruct.engine.reconstruct`).
        synthetic: synthetic images to make from the teacher (added to ``data``; 256 by default
            when ``data="synthetic"``).
        synthetic_size: their side in pixels.
        synthetic_from: ``noise`` (DeepInversion from random pixels), or ``photos``: inversion from
            views of the training photos (:data:`INVERT_STEPS` small steps towards the teacher's
            BatchNorm statistics, so they stay natural).
        synthetic_dir: also write them there as PNG files (a new folder).
        weights, input_size: the model's preprocessing (crop size, normalisation).
        holdout: fraction (or count) of the photos held out when there is no ``eval_data``; above 0 (every
            stage is judged on held-out photos).
        eval_data: photos of other scenes to score on (a folder or Dataset); then all of
            ``data`` trains.
        seed: seed of splits, orders and augmentations.
        device: where to compute (default: CUDA when available).
        callback: called with a :class:`~gn_convert.fidelity.recover.report.Progress` as each stage
            starts and after every synthesis batch, fitted block and distillation step.
        checkpoint_dir: keep the run's state there as soon as the student is converted, when distillation
            has planned its steps, after each stage and during distillation, so that a stopped run can be
            resumed (one stopped during its first stage too).
        resume: go on from ``checkpoint_dir``'s state; it must be the same run (the teacher's weights, a given
            student and its plan, the data's files and sizes, the options): another run's state is refused.
        task: ``classification``, ``segmentation`` (KL per pixel on the logits ``out``; scored per pixel, with the
            mean IoU of the student's class map with the teacher's), ``detection`` (the backbone and FPN
            features, their squared error over the teacher's variance; scored by their R^2) or ``video``
            (clip logits; photos become still clips); default: from the model (:func:`gn_convert.tasks.task_for_module`).

    Under ``torchrun`` (gloo on CPU, NCCL on GPU) the same call runs on every process: the
    training images are drawn per process, distillation is data-parallel (DDP) and block
    reconstruction averages its gradients, rank 0's decisions (the plan, the step counts, the
    state kept) are shared, and the budget is spent by all processes together. Only rank 0
    logs, reports progress, writes checkpoints and synthetic images.

    Returns:
        The :class:`~gn_convert.fidelity.recover.report.RecoveryResult`.

    Raises:
        OptionError: no data, an unknown stage, a student without its teacher, or nothing held out
            (``holdout=0`` without ``eval_data``).
        UntrainedTeacherError: the teacher was never trained (``weights="none"``).
        ModelMismatchError, DataError, GroupPlanError: see the stages.
    """
    if stages is None:
        stages = () if isinstance(data, str) and data == SYNTHETIC else DEFAULT_STAGES
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise OptionError(f"unknown recovery stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if synthetic_from not in SYNTHETIC_FROM:
        raise OptionError(f"synthetic_from must be one of {', '.join(SYNTHETIC_FROM)}, got {synthetic_from!r}")
    if synthetic_from == "photos" and (data is None or isinstance(data, str) and data == SYNTHETIC):
        raise OptionError("synthetic_from='photos' needs training photos (data=a folder or Dataset)")
    if resume and checkpoint_dir is None:
        raise OptionError("resume needs the checkpoint_dir of the run to resume")
    check_heldout(data, holdout, eval_data)
    given_student = teacher is not None
    kind = TASKS[task] if task is not None else task_for_module(teacher if teacher is not None else model)
    if kind is not CLASSIFICATION and (synthetic or (isinstance(data, str) and data == SYNTHETIC)):
        raise OptionError(f"synthetic images are made for classifiers; recover a {kind.name} model from photos")
    if teacher is None and not any(is_batchnorm(m) for m in model.modules()):
        raise OptionError("the model has no BatchNorm layer: pass the converted student with its teacher=")
    if teacher is not None:
        norm_pairs(model, teacher)  # refuse a mismatched pair before any work
    check_trained(teacher if teacher is not None else model, TRAINED_WEIGHTS_HINT)
    procs = ddp.setup(device)
    try:
        run = _Recovery(procs, Clock(budget), callback, checkpoint_dir, kind)
        return run.go(model, teacher if teacher is not None else model, data, stages, given_student, dict(
            plan=dict(groups=groups, group_size=group_size, policy=policy,
                      min_channels_per_group=resolve_min_channels(min_channels_per_group, group_size),
                      include=include, exclude=exclude, fold=fold, on_single=on_single),
            data=dict(weights=weights, input_size=input_size, holdout=holdout, eval_data=eval_data, seed=seed,
                      synthetic=synthetic),
            synthetic=dict(size=synthetic_size, folder=synthetic_dir, start=synthetic_from),
            distill=dict(batch_size=batch_size, lr=lr, mixup=mixup, feature_weight=feature_weight, seed=seed,
                         channels_last=channels_last, cpu_bf16=cpu_bf16),
            init=init, reconstruct=dict(lr=reconstruct_lr, drop=reconstruct_drop, allocate=reconstruct_allocate),
            resume=resume))
    finally:
        ddp.teardown(procs)


class _Recovery:
    """One recovery in one process (of one, or of several under torchrun)."""

    def __init__(self, procs: ddp.Processes, clock: Clock, callback: Callable[[Any], None] | None,
                 checkpoint_dir: str | Path | None, task: Task = CLASSIFICATION) -> None:
        self.procs, self.clock, self.device, self.task = procs, clock, procs.device, task
        self.callback = callback if procs.is_main else None
        self.folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.results: list[StageResult] = []
        self.planned: dict[str, int] = {}
        self.fingerprint: dict[str, Any] = {}
        self.resumed = False

    def tell(self, info: Any) -> None:
        """Pass progress to the caller's callback (rank 0 only)."""
        if self.callback is not None:
            self.callback(info)

    def go(self, model: nn.Module, teacher: nn.Module, data: Any, stages: tuple[str, ...], given_student: bool,
           opts: dict[str, Any]) -> RecoveryResult:
        """Data, conversion (or the saved state), each stage not yet done, the best state kept."""
        teacher = _on_device(teacher, self.device)
        with eval_mode(teacher):
            found = self.task.recovery_views(recovery_data(data, teacher, opts["data"],
                                                           lambda n, train: self._synthesise(teacher, n, data, train,
                                                                                             opts)))
            judge = Judge(self.task.head(teacher), found.heldout, found.groups, found.fit, self.task.measure,
                          self.task.model_scores(teacher, found))
            warnings = list(found.warnings) + same_scene_warnings(self.task.head(teacher), found)
            batch_size, images = opts["distill"]["batch_size"], _size(found.train)
            if batch_size > images:
                log.warning("batch size %d lowered to the %d training images", batch_size, images)
                opts["distill"]["batch_size"] = batch_size = images
            batches = endless_batches(found.train, batch_size, self.device, opts["data"]["seed"], self.procs.rank)
            given = _on_device(model, self.device, always_copy=True) if given_student else None
            if self.folder is not None:
                self.fingerprint = run_fingerprint(
                    teacher, given, None if given is None else student_plan(given, teacher),
                    data_fingerprint(data, opts["data"]["eval_data"]), {**trajectory(opts), "stages": list(stages)})
            student, layer_plan = self._start(given, teacher, batches, judge, opts)
            save = partial(self._save, layer_plan, student, judge)
            save()  # at once: a run stopped during its first stage resumes with this plan
            history: list[Any] = []
            for stage in stages:
                if any(r.name == stage for r in self.results):
                    continue  # done before the run was stopped (resume)
                history = self._stage(stage, student, teacher, found, batches, judge, opts, save) or history
                save()
            judge.restore_best(student)
            kept = kept_stage(self.results)
            warnings += closing_warnings(self.results, kept)
        return RecoveryResult(student.eval(), layer_plan, self.results, history, len(found.heldout),
                              len(set(found.groups)), self.clock.elapsed(), warnings, kept)

    def _synthesise(self, teacher: nn.Module, count: int, data: Any, train: Dataset | None,
                    opts: dict[str, Any]) -> torch.Tensor:
        share = self.clock.share("synthesize") / (1 if data is None or data == SYNTHETIC else 3)
        invert: dict[str, Any] = {}
        if opts["synthetic"]["start"] == "photos" and train is not None:
            invert = dict(init=fresh_views(train, count, opts["data"]["seed"] + 1).to(self.device),
                          steps=INVERT_STEPS, lr=INVERT_LR)
        images, report = synthesize(teacher, count, size=opts["synthetic"]["size"], budget_s=share, **invert,
                                    seed=opts["data"]["seed"], callback=lambda k: self.tell(Progress("synthesize", k)))
        detail = report.to_dict()
        folder = opts["synthetic"]["folder"]
        if folder is not None and self.procs.is_main:  # a new folder: an existing one is refused, never replaced
            detail["folder"] = str(write_pngs(images, folder)[0].parent)
        self.results.append(StageResult("synthesize", report.seconds, float("nan"), detail=detail,
                                        completed=report.completed))
        return images

    def _start(self, given: nn.Module | None, teacher: nn.Module, batches: Iterator[torch.Tensor], judge: Judge,
               opts: dict[str, Any]) -> tuple[nn.Module, GroupPlan]:
        """The student and its plan: from the saved state (resume), the given student, or a conversion."""
        started = time.perf_counter()
        saved = load_recovery(self.folder, self.fingerprint) if opts["resume"] and self.folder else None
        if given is not None:
            student, layer_plan = given, student_plan(given, teacher)
        else:
            layer_plan = saved_plan(saved) or ddp.from_main(group_plan(teacher, batches, opts["plan"]), self.procs)
            student = convert(teacher, plan=layer_plan, init=opts["init"], example_input=next(batches)[:2],
                              prove=saved is None).to(self.device)
        if saved is not None:
            student.load_state_dict(saved["student"])
            judge.best_state, judge.best_kl = saved["best"], saved["best_kl"]
            self.results, self.planned, self.resumed = saved["results"], saved["planned"], True
            self.clock.start -= saved["elapsed"]
            log.info("resuming after %s (%.0f s spent)", ", ".join(r.name for r in self.results), saved["elapsed"])
        else:
            self.results.append(self._scored("convert", student, judge, started, {"plan": layer_plan.summary()}))
        return student, layer_plan

    def _stage(self, stage: str, student: nn.Module, teacher: nn.Module, found: RecoveryData,
               batches: Iterator[torch.Tensor], judge: Judge, opts: dict[str, Any],
               save: Callable[[], None]) -> list[Any]:
        started = time.perf_counter()
        self.tell(Progress(stage))
        history: list[Any] = []
        if ddp.from_main(self.clock.left() < self.clock.reserve, self.procs):
            log.info("no budget left for %s: skipped", stage)  # the result's warnings say so
            last = self.results[-1]
            self.results.append(StageResult(stage, 0.0, last.agreement, last.scores, False, {"skipped": "no budget left"}))
            return history
        if stage == "reconstruct":
            fitted = iter(range(1, 1 << 30))
            report = reconstruct(student, teacher, batches, budget_s=self.clock.share("reconstruct"),
                                 **opts["reconstruct"], procs=self.procs,
                                 callback=lambda _fit: self.tell(Progress("reconstruct", next(fitted))))
            detail, completed = report.to_dict(), report.completed
        else:
            detail, history, completed = self._distill(self.task.head(student), self.task.head(teacher), found,
                                                       opts, save)
        self.results.append(self._scored(stage, student, judge, started, detail, completed))
        return history

    def _distill(self, student: nn.Module, teacher: nn.Module, found: RecoveryData, opts: dict[str, Any],
                 save: Callable[[], None]) -> tuple[dict[str, Any], list[Any], bool]:
        """Distil for the rest of the budget: the step count is :data:`OVERPLAN` times the count the measured step
        time (rank 0's) fits, the time limit ends the run, and the learning rate anneals with the time spent, so
        the schedule ends with the budget. The count is saved before the first step, so a resumed run goes on
        with the same schedule. The detail says why it stopped (``stopped``)."""
        share = ddp.from_main(self.clock.share("distill"), self.procs)
        if "distill" not in self.planned:
            per_step = step_seconds(student, teacher, found.train, {**opts["distill"],
                                                                    "output_loss": self.task.output_loss}, self.device)
            self.planned["distill"] = ddp.from_main(max(1, int(OVERPLAN * share / per_step)), self.procs)
            save()
        steps = self.planned["distill"]
        log.info("distilling about %d steps in the %.0f s left", steps, self.clock.left())
        folder = self.folder / "distill" if self.folder is not None else None
        result = distill(student, teacher, DataSplit(found.train, None, False), steps=steps, eval_every=steps + 1,
                         device=self.device, callback=lambda info: self.tell(Progress("distill", info.step)),
                         time_limit=share, checkpoint_dir=folder, checkpoint_every=CHECKPOINT_EVERY if folder else 0,
                         resume=self.resumed, output_loss=self.task.output_loss, **opts["distill"])
        used = result.seconds >= TIME_USED * share
        stopped = "its share of the budget was spent" if used and result.steps < steps else \
            f"its {steps} planned steps were done with {share - result.seconds:.0f} s of its {share:.0f} s left"
        detail = {**result.to_dict(), "planned_steps": steps, "stopped": stopped}
        return detail, result.history, used or result.steps >= COMPLETE * steps

    def _scored(self, name: str, student: nn.Module, judge: Judge, started: float, detail: dict[str, Any],
                completed: bool = True) -> StageResult:
        scores = ddp.from_main(judge.score(self.task.head(student), student), self.procs)  # every process keeps the same state
        if judge.keep_best(student, scores):
            detail = {**detail, "best_so_far": True}
        log.info("%s: held-out agreement %.3f, KL %.3f, fit %.3f", name, scores["top1"], scores["kl"], scores["fit"])
        return StageResult(name, round(time.perf_counter() - started, 2), scores["top1"], scores, completed, detail)

    def _save(self, layer_plan: GroupPlan, student: nn.Module, judge: Judge) -> None:
        """Keep the run's state in the checkpoint folder (rank 0 writes; every process waits)."""
        if self.folder is None:
            return
        if self.procs.is_main:
            save_recovery(self.folder, plan=layer_plan.to_dict(), results=self.results, student=student.state_dict(),
                          best=judge.best_state, best_kl=judge.best_kl, elapsed=self.clock.elapsed(),
                          planned=self.planned, fingerprint=self.fingerprint)
        ddp.barrier(self.procs)


def _on_device(model: nn.Module, device: torch.device, always_copy: bool = False) -> nn.Module:
    """``model`` itself when it already lives on ``device`` (and no copy is asked), else a copy there."""
    here = next(iter(model.parameters()), torch.empty(0)).device
    return copy.deepcopy(model).to(device) if always_copy or here != device else model
