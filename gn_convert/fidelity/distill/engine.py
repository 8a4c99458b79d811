"""Knowledge-distillation fine-tune: bring a converted GroupNorm student back to its teacher.

:func:`distill` trains the student to reproduce the frozen BatchNorm teacher (eval mode) on
images, labelled or not: KL(teacher || student) at a temperature, optional cross-entropy on
labelled items, optional feature loss at every GroupNorm output (:mod:`gn_convert.fidelity.distill.losses`).
It trains all parameters or only the GroupNorm affines (with their own learning-rate scale),
with AdamW, linear warmup and cosine decay, gradient accumulation, AMP on CUDA, and its
tensors channels-last (:mod:`gn_convert.fidelity.distill.layout`). Every
``eval_every`` steps it measures top-1 agreement with the teacher (and accuracy, with labels)
on held-out images, and stops early once ``target_agreement`` is reached.

Resume is exact: every ``checkpoint_every`` steps the run's state goes to
``checkpoint_dir/state.pt`` (:mod:`gn_convert.fidelity.distill.state`); the data order, each item's
augmentation, the learning rate and the global random state are pure functions of
(seed, step), so a run resumed from step ``s`` ends with the weights of a run that never
stopped. Under ``torchrun`` the same call runs data-parallel (DDP, :mod:`gn_convert.fidelity.distributed`):
the global batch is split over the processes, so N processes follow the trajectory of one
process with the same batch; only rank 0 logs, reports progress and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gn_convert.data.items import split_batch
from gn_convert.data.sources import DataSplit, load_data
from gn_convert.errors import CheckpointError, OptionError
from gn_convert.fidelity import distributed as ddp
from gn_convert.fidelity.distill.layout import autocast_dtype, channels_last, images_layout
from gn_convert.fidelity.distill.losses import FeatureTaps, StatisticsTaps, kl_loss, label_loss
from gn_convert.fidelity.distill.options import (
    TRAINABLE,
    DistillOptions,
    DistillResult,
    EvalPoint,
    StepInfo,
    lr_factor,
    param_groups,
    trainable_only,
)
from gn_convert.fidelity.distill.state import check_compatible, load_state, save_state
from gn_convert.fidelity.pairs import norm_pairs
from gn_convert.modes import eval_mode
from gn_convert.surgery.registry import is_batchnorm

log = logging.getLogger(__name__)

__all__ = ["TRAINABLE", "DistillOptions", "DistillResult", "EvalPoint", "StepInfo", "distill",
           "lr_factor", "param_groups"]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-4,
    trainable: str = "all",
    gn_lr_scale: float = 1.0,
    temperature: float = 2.0,
    ce_weight: float = 0.0,
    feature_weight: float = 0.0,
    eval_every: int = 25,
    target_agreement: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    eval_data: Any = None,
    weights: Any = None,
    input_size: int | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    output_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
    **options: Any,
) -> DistillResult:
    """Fine-tune ``student`` (in place) to reproduce ``teacher`` by knowledge distillation.

    Args:
        student: the converted GroupNorm model (from :func:`gn_convert.convert`).
        teacher: the BatchNorm model it was converted from; frozen, run in eval mode (its own
            mode and device are left as they were: a copy runs on ``device`` when it lives elsewhere).
        data: a folder (ImageFolder or plain images), Dataset, DataLoader or DataSplit; see
            :func:`gn_convert.data.sources.load_data`. A held-out part (``holdout``, default 10%) is
            kept for evaluation unless ``eval_data`` is given.
        steps: optimizer steps (default 200).
        batch_size: global batch per optimizer step, over all processes and micro-batches.
        lr: peak AdamW learning rate (default 1e-4; 1e-3 first undoes much of a good init).
        trainable: ``all`` (default) or ``gn-affine`` (only the GroupNorm weights and biases:
            about half the time per step; use a higher lr, such as 1e-2).
        gn_lr_scale: multiplier of ``lr`` for the GroupNorm affines (default 1).
        temperature: softmax temperature of the KL term (default 2).
        ce_weight: weight of the cross-entropy on labelled items (default 0: off).
        feature_weight: weight of the normalised GroupNorm-output loss (default 0: off).
        eval_every: steps between held-out evaluations (default 25).
        target_agreement: stop once held-out agreement reaches it (default None: never).
        checkpoint_dir: folder for the resumable state; None keeps nothing.
        checkpoint_every: steps between state saves (0: only at the end).
        resume: continue from ``checkpoint_dir``'s state when one exists.
        eval_data: a separate held-out source (then all of ``data`` trains).
        weights: torchvision weights enum of the model, for folder preprocessing.
        input_size: crop side in pixels for folders, overriding the weights' preset.
        device: where to compute (default CUDA when available); torchrun picks per rank.
        callback: called on rank 0 with a :class:`StepInfo` after every step.
        output_loss: ``loss(student_out, teacher_out, temperature)`` between the outputs (default
            :func:`~gn_convert.fidelity.distill.losses.kl_loss`: KL on the class axis, per position for dense
            outputs; a task's own, :meth:`gn_convert.tasks.Task.output_loss`).
        **options: more :class:`DistillOptions` fields (``time_limit``: stop, evaluated, once
            this many seconds have passed, the learning rate annealing with the time spent so that
            the schedule ends with the time; ``stats_weight``: weight of the loss that keeps each
            GroupNorm input's batch statistics at the teacher's running statistics
            (:class:`~gn_convert.fidelity.distill.losses.StatisticsTaps`); ``mixup``: blend each training image with
            another, weight ~ Beta(mixup, mixup), the same blend for teacher and student, as in
            function matching (Beyer et al. 2022); ``accumulate``, ``warmup_steps``,
            ``weight_decay``, ``seed``, ``holdout``, ``augment``, ``flip``, ``amp`` (CUDA),
            ``cpu_bf16`` (bfloat16 autocast on a CPU that runs it natively), ``channels_last`` (default on),
            ``eval_batch_size``, ``num_workers``).

    Returns:
        The :class:`DistillResult` with the trained student and the metrics history.

    Raises:
        ModelMismatchError: the student is not a conversion of the teacher.
        DataError: the data source is missing, empty or unreadable.
        CheckpointError: the saved state is corrupt or from a run with other options.
        OptionError: an impossible option, or no parameter left to train.
    """
    unknown = set(options) - set(DistillOptions.__dataclass_fields__)
    if unknown:
        raise OptionError(f"unknown distillation option(s): {', '.join(sorted(unknown))}")
    opts = DistillOptions(steps=steps, batch_size=batch_size, lr=lr, trainable=trainable,
                          gn_lr_scale=gn_lr_scale, temperature=temperature, ce_weight=ce_weight,
                          feature_weight=feature_weight, eval_every=eval_every,
                          target_agreement=target_agreement, checkpoint_every=checkpoint_every, **options)
    opts.check()
    norm_pairs(student, teacher)  # refuse a mismatched teacher before touching data
    split = load_data(data, weights=weights, input_size=input_size, holdout=opts.holdout,
                      seed=opts.seed, augment=opts.augment, flip=opts.flip, eval_data=eval_data)
    procs = ddp.setup(device)
    try:
        run = _Run(student, teacher, split, opts, procs, checkpoint_dir, callback)
        run.output_loss = output_loss or kl_loss
        return run.train(resume)
    finally:
        ddp.teardown(procs)


def train_mode(model: nn.Module) -> None:
    """Train mode for everything but the BatchNorm layers the plan left in place.

    Those keep the teacher's running statistics (eval mode): in train mode they would normalise
    with each batch's statistics, which makes a step depend on how the batch is split over
    processes and micro-batches, and would overwrite the statistics.
    """
    model.train()
    for module in model.modules():
        if is_batchnorm(module):
            module.eval()


class _Run:
    """One distillation run in one process (of one or several)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, split: DataSplit, opts: DistillOptions,
                 procs: ddp.Processes, checkpoint_dir: str | Path | None,
                 callback: Callable[[StepInfo], None] | None) -> None:
        self.student, self.teacher, self.split, self.opts, self.procs = student, teacher, split, opts, procs
        self.folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.callback = callback if procs.is_main else None
        student.to(procs.device)
        here = next(iter(teacher.parameters()), torch.empty(0)).device
        self.teacher = teacher if here == procs.device else copy.deepcopy(teacher).to(procs.device)
        pairs = norm_pairs(student, self.teacher)
        self.taps, self.stats = FeatureTaps(pairs), StatisticsTaps(pairs)
        self.groups = param_groups(student, opts)
        self.optimizer = torch.optim.AdamW(self.groups)
        dtype = autocast_dtype(procs.device, opts.amp, opts.cpu_bf16)
        self.amp_dtype, self.use_amp = dtype or torch.float16, dtype is not None
        self.scaler = torch.amp.GradScaler("cuda", enabled=procs.device.type == "cuda" and dtype == torch.float16)
        self.history: list[EvalPoint] = []
        self.step, self.loss_sum, self.loss_count = 0, 0.0, 0
        self.teacher_accuracy: float | None = None
        self.teacher_predictions: list[torch.Tensor] = []
        self.started = time.perf_counter()
        self.output_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = kl_loss

    # -- state -------------------------------------------------------------------------------
    def _options_dict(self) -> dict[str, Any]:
        return asdict(self.opts)

    def _save(self) -> None:
        if self.folder is None:
            return
        if self.procs.is_main:
            save_state(self.folder, {
                "step": self.step,
                "student": {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "options": self._options_dict(),
                "history": [asdict(p) for p in self.history],
                "loss": [self.loss_sum, self.loss_count],
                "teacher_accuracy": self.teacher_accuracy,
            })
        ddp.barrier(self.procs)

    def _load(self) -> bool:
        folder = self.folder
        state = load_state(folder) if folder is not None else None
        if state is None or folder is None:
            return False
        check_compatible(state["options"], self._options_dict(), folder)
        try:
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.history = [EvalPoint(**p) for p in state["history"]]
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"training state in {self.folder} does not fit this student "
                                  f"({type(err).__name__}); delete it to start over") from None
        self.step = int(state["step"])
        self.loss_sum, self.loss_count = (float(state["loss"][0]), int(state["loss"][1]))
        self.teacher_accuracy = state.get("teacher_accuracy")
        log.info("resuming from step %d of %d (%s)", self.step, self.opts.steps, self.folder)
        return True

    # -- evaluation --------------------------------------------------------------------------
    def _heldout_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        heldout = self.split.heldout
        if heldout is None:
            return
        mine = list(range(self.procs.rank, len(heldout), self.procs.world_size))  # type: ignore[arg-type]
        for batch in DataLoader(Subset(heldout, mine), batch_size=self.opts.eval_batch_size,
                                num_workers=self.opts.num_workers):
            images, labels = split_batch(batch)
            yield images.to(self.procs.device), None if labels is None else labels.to(self.procs.device)

    @torch.no_grad()
    def _predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.procs.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            return model(images).argmax(1)

    @torch.no_grad()
    def _evaluate(self) -> EvalPoint:
        modes = [(m, m.training) for m in self.student.modules()]  # restored one by one: leftover BN stays eval
        self.student.eval()
        self.taps.enabled = self.stats.enabled = False
        counts = [0.0, 0.0, 0.0, 0.0, 0.0]  # agree, items, correct, labelled, teacher correct
        try:
            for k, (images, labels) in enumerate(self._heldout_batches()):
                if k == len(self.teacher_predictions):  # the teacher is frozen: predict once
                    self.teacher_predictions.append(self._predict(self.teacher, images))
                s, t = self._predict(self.student, images), self.teacher_predictions[k]
                counts[0] += float((s == t).sum())
                counts[1] += s.numel()  # one a sample; one a pixel for a per-pixel output
                if labels is not None:
                    keep = labels >= 0
                    counts[2] += float((s[keep] == labels[keep]).sum())
                    counts[3] += float(keep.sum())
                    counts[4] += float((t[keep] == labels[keep]).sum())
        finally:
            for module, training in modes:
                module.training = training
            self.taps.enabled = self.stats.enabled = True
        agree, items, correct, labelled, teacher_correct, loss_sum, loss_count = ddp.all_sum(
            [*counts, self.loss_sum, float(self.loss_count)], self.procs)
        self.teacher_accuracy = teacher_correct / labelled if labelled else None
        self.loss_sum, self.loss_count = 0.0, 0
        point = EvalPoint(self.step, agree / items if items else float("nan"),
                          correct / labelled if labelled else None,
                          loss_sum / loss_count if loss_count else None,
                          self.optimizer.param_groups[-1]["lr"], round(time.perf_counter() - self.started, 3))
        self.history.append(point)
        if self.procs.is_main:
            log.info("step %d: agreement %.4f%s%s", point.step, point.agreement,
                     "" if point.accuracy is None else f", accuracy {point.accuracy:.4f}",
                     "" if point.train_loss is None else f", loss {point.train_loss:.4f}")
        return point

    # -- training ----------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        sampler = ddp.StepBatches(len(self.split.train), self.opts.batch_size, self.step,  # type: ignore[arg-type]
                                  self.opts.steps, self.opts.seed, self.procs.rank,
                                  self.procs.world_size, self.opts.accumulate)
        return DataLoader(ddp.SeededItems(self.split.train, self.opts.mixup), batch_sampler=sampler,
                          num_workers=self.opts.num_workers)

    def _loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.procs.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            with torch.no_grad():
                target = self.teacher(images)
            logits = model(images)
        loss = self.output_loss(logits, target, self.opts.temperature)
        ce = label_loss(logits, labels) if self.opts.ce_weight else None
        if ce is not None:
            loss = loss + self.opts.ce_weight * ce
        if self.opts.feature_weight:
            loss = loss + self.opts.feature_weight * self.taps.loss()
        if self.opts.stats_weight:
            loss = loss + self.opts.stats_weight * self.stats.loss()
        return loss

    def _schedule_step(self) -> float:
        """Where the learning-rate schedule stands: the step, or, with ``time_limit``, the share of
        the time spent times the steps when that is further (the schedule ends with the time, so a
        slower machine anneals fully in fewer steps instead of stopping at a high rate). Processes
        agree on it (their mean elapsed time)."""
        if self.opts.time_limit is None:
            return float(self.step)
        elapsed = ddp.all_sum([time.perf_counter() - self.started], self.procs)[0] / self.procs.world_size
        return max(float(self.step), elapsed / self.opts.time_limit * self.opts.steps)

    def _one_step(self, model: nn.Module, batches: Iterator[Any]) -> float:
        factor = lr_factor(self._schedule_step(), self.opts.steps, self.opts.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        torch.manual_seed(ddp.mix_seed(self.opts.seed, self.step, self.procs.rank))
        total = 0.0
        for j in range(self.opts.accumulate):
            images, labels = split_batch(next(batches))
            images = images_layout(images.to(self.procs.device, non_blocking=True), self.opts.channels_last)
            labels = labels.to(self.procs.device) if labels is not None else None
            last = j == self.opts.accumulate - 1
            sync: Any = contextlib.nullcontext() if last or not self.procs.distributed else cast(Any, model).no_sync()
            with sync:
                loss = self._loss(model, images, labels) / self.opts.accumulate
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss_sum, self.loss_count = self.loss_sum + total, self.loss_count + 1
        return total

    def train(self, resume: bool) -> DistillResult:
        """Run (or resume) the distillation; returns the result."""
        params = [p for g in self.groups for p in g["params"]]
        opts, stopped = self.opts, False
        stats: Any = self.stats if self.opts.stats_weight else contextlib.nullcontext()
        with trainable_only(self.student, params), self.taps, stats, torch.random.fork_rng(devices=self._rng_devices()), \
                eval_mode(self.teacher), channels_last(self.student, self.teacher, enabled=opts.channels_last):
            if not (resume and self._load()):
                self._evaluate()
            stopped = self._reached(self.history[-1]) if self.history else False
            model = ddp.wrap(self.student, self.procs)
            train_mode(self.student)
            batches = iter(self._loader()) if not stopped and self.step < opts.steps else iter(())
            while not stopped and self.step < opts.steps:
                loss = self._one_step(model, batches)
                late = self._out_of_time()
                if late or self.step % opts.eval_every == 0 or self.step == opts.steps:
                    stopped = self._reached(self._evaluate()) or late
                if opts.checkpoint_every and self.step % opts.checkpoint_every == 0:
                    self._save()
                if self.callback is not None:
                    last = self.history[-1].agreement if self.history else None
                    self.callback(StepInfo(self.step, opts.steps, loss, last,
                                           self.optimizer.param_groups[-1]["lr"]))
            self._save()
        self.student.eval()
        return DistillResult(self.student, self.history, self.step, stopped and self.step < opts.steps,
                             self.teacher_accuracy, _size(self.split.heldout),
                             round(time.perf_counter() - self.started, 3))

    def _out_of_time(self) -> bool:
        """Whether ``time_limit`` has passed (on any process: they stop together)."""
        if self.opts.time_limit is None:
            return False
        late = float(time.perf_counter() - self.started > self.opts.time_limit)
        return ddp.all_sum([late], self.procs)[0] > 0

    def _reached(self, point: EvalPoint) -> bool:
        target = self.opts.target_agreement
        return target is not None and point.agreement >= target

    def _rng_devices(self) -> list[int]:
        return [self.procs.device.index or 0] if self.procs.device.type == "cuda" else []


def _size(dataset: Any) -> int:
    """Items in a map-style dataset (0 for None)."""
    return 0 if dataset is None else len(dataset)
