"""``recover``: the whole recovery job in one call, within a time budget.

Convert (default or fidelity-aware plan, data-free bn-stats init), then the stages asked for,
all within ``budget`` seconds, with held-out top-1 agreement with the teacher measured after
each stage:

- ``distill`` (default): knowledge distillation from the frozen BatchNorm teacher on fresh
  augmented crops, KL on the logits plus a loss on every GroupNorm output (a dense target per
  layer), optionally with mixup (the same blended view for teacher and student);
- ``reconstruct``: block-wise reconstruction (:mod:`gn_convert.fidelity.reconstruct`) first.

The defaults follow what was measured on a real ImageNet EfficientNet-Lite0 at G=32 with 12
training photos (scripts/real_network_fidelity.py, README "Recovery"): distillation with the
feature loss at the model's own resolution was the best use of the time (14.0% -> 17.3% held-out
top-1 agreement in 356 CPU-s); block reconstruction (7.7-9.3%) and mixup on every batch (5.0%,
at 128 px) lowered held-out agreement while raising it on the training photos. With so few
photos, what limits the result is the data; the fidelity plan (``policy="fidelity"``) is the
lever that moves held-out agreement most (37% with no training at all).

A stage that lowers held-out agreement is undone (the held-out images are a split of ``data``,
or ``eval_data``: give distinct photos there to catch overfitting to a few). Without data,
images are synthesised from the teacher's BatchNorm statistics first
(:mod:`gn_convert.fidelity.synthesize`). The budget is shared between the stages by
:data:`SHARES` (of what is left when each starts); each stage sizes its own steps from its
measured speed, so the whole call ends within about the budget on any machine.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from gn_convert.data.items import split_batch
from gn_convert.data.sources import DataSplit, load_data, split_indices
from gn_convert.data.transforms import model_transforms
from gn_convert.errors import OptionError
from gn_convert.fidelity.distillation import distill
from gn_convert.fidelity.group_search import POLICY as FIDELITY, fidelity_plan
from gn_convert.fidelity.options import EvalPoint
from gn_convert.fidelity.reconstruct import reconstruct
from gn_convert.fidelity.synthesize import synthesize, write_pngs
from gn_convert.modes import eval_mode
from gn_convert.fidelity.pairs import norm_pairs
from gn_convert.surgery.plan import GroupPlan, LayerPlan, plan as make_plan
from gn_convert.surgery.registry import is_batchnorm
from gn_convert.surgery.replace import convert

log = logging.getLogger(__name__)

#: share of the remaining budget each stage may use when it starts
SHARES: dict[str, float] = {"synthesize": 0.3, "reconstruct": 0.45, "distill": 1.0}
RESERVE = 0.06
STAGES: tuple[str, ...] = ("reconstruct", "distill")
DEFAULT_STAGES: tuple[str, ...] = ("distill",)
SYNTHETIC = "synthetic"
PLAN_BATCHES = 4


@dataclass
class StageResult:
    """One stage of :func:`recover`: its time, the held-out agreement after it, its own report."""

    name: str
    seconds: float
    agreement: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecoveryResult:
    """What :func:`recover` returns.

    Attributes:
        model: the student (every BatchNorm the plan converted is a GroupNorm), eval mode.
        plan: the group plan it was converted with (per-layer choices and reasons).
        stages: one :class:`StageResult` per stage, ``convert`` first.
        history: the distillation's held-out evaluations.
        heldout: held-out images the agreement was measured on.
        seconds: wall time of the call.
    """

    model: nn.Module
    plan: GroupPlan
    stages: list[StageResult] = field(default_factory=list)
    history: list[EvalPoint] = field(default_factory=list)
    heldout: int = 0
    seconds: float = 0.0

    @property
    def agreement(self) -> float:
        """The held-out top-1 agreement after the last stage."""
        return self.stages[-1].agreement if self.stages else float("nan")

    def summary(self) -> str:
        """One line per stage: its time and the held-out agreement after it."""
        lines = [f"{s.name:12} {s.seconds:7.1f} s  agreement {s.agreement:.3f}" for s in self.stages]
        return "\n".join([f"recovery on {self.heldout} held-out images ({self.plan.summary()}):", *lines])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without the model)."""
        return {"plan": self.plan.to_dict(), "heldout": self.heldout, "seconds": self.seconds,
                "agreement": self.agreement, "stages": [asdict(s) for s in self.stages],
                "history": [asdict(p) for p in self.history]}


class AugmentedTensors(Dataset):
    """Images held as tensors, each fetch a new random-resized crop and flip (for synthetic images)."""

    def __init__(self, images: torch.Tensor, size: int) -> None:
        from torchvision.transforms import v2

        self.images = images.detach().cpu()
        self.transform = v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                                     v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), -1


def _endless(dataset: Dataset, batch_size: int, device: torch.device, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches of ``dataset``, epoch after epoch (a smaller last batch only when it is all there is)."""
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise OptionError("recover has no training image left after the held-out split; add data")
    gen = torch.Generator().manual_seed(seed)
    while True:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=size >= batch_size,
                                generator=gen):
            yield split_batch(batch)[0].to(device)


@torch.no_grad()
def _predictions(model: nn.Module, dataset: Dataset | None, device: torch.device) -> torch.Tensor:
    if dataset is None:
        return torch.empty(0, dtype=torch.long)
    with eval_mode(model):
        return torch.cat([model(split_batch(b)[0].to(device)).argmax(1).cpu()
                          for b in DataLoader(dataset, batch_size=64)])


class _Clock:
    """The budget: what is left, and each stage's share of it.

    A reserve of :data:`RESERVE` of the budget is kept for the held-out evaluations after each
    stage and the bookkeeping between them, so that the whole call ends within the budget.
    """

    def __init__(self, budget: float) -> None:
        if budget <= 0:
            raise OptionError(f"the budget must be positive, got {budget}")
        self.budget, self.start = budget, time.perf_counter()
        self.reserve = RESERVE * budget

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 2)

    def left(self) -> float:
        return max(self.budget - (time.perf_counter() - self.start), 0.0)

    def share(self, stage: str) -> float:
        return max(self.left() - self.reserve, 0.0) * SHARES[stage]


def _split(data: Any, teacher: nn.Module, clock: _Clock, opts: dict[str, Any]) -> tuple[DataSplit, dict[str, Any]]:
    """The training and held-out images: real, synthetic, or real enlarged by synthetic."""
    synthetic = int(opts["synthetic"])
    if isinstance(data, str) and data == SYNTHETIC:
        synthetic = synthetic or 256
        data = None
    real = None if data is None else load_data(data, weights=opts["weights"], input_size=opts["input_size"],
                                               holdout=opts["holdout"], seed=opts["seed"],
                                               eval_data=opts["eval_data"])
    if not synthetic:
        if real is None:
            raise OptionError("recover needs data: a folder or Dataset of images, or data='synthetic'")
        return real, {}
    budget = clock.share("synthesize") if real is None else clock.share("synthesize") / 3
    images, report = synthesize(teacher, synthetic, size=opts["synthetic_size"], budget_s=budget, seed=opts["seed"])
    detail = report.to_dict()
    if opts["synthetic_dir"] is not None:  # a new folder: an existing one is refused, never replaced
        detail["folder"] = str(write_pngs(images, opts["synthetic_dir"])[0].parent)
    size = opts["input_size"] or (model_transforms(opts["weights"]).crop_size if opts["weights"] is not None
                                  else opts["synthetic_size"])
    if real is not None:
        return DataSplit(ConcatDataset([real.train, AugmentedTensors(images, size)]), real.heldout, False), detail
    train_idx, held_idx = split_indices(len(images), opts["holdout"], opts["seed"])
    held = torch.nn.functional.interpolate(images[held_idx], size=(size, size), mode="bilinear", antialias=True)
    return DataSplit(AugmentedTensors(images[train_idx], size), TensorDataset(held.cpu()), False), detail


def recover(
    model: nn.Module,
    data: Any = None,
    *,
    teacher: nn.Module | None = None,
    groups: int = 32,
    policy: str = "divisor",
    min_channels_per_group: int = 1,
    budget: float = 900.0,
    stages: tuple[str, ...] | None = None,
    batch_size: int = 16,
    lr: float = 1e-4,
    mixup: float = 0.0,
    feature_weight: float = 1.0,
    reconstruct_lr: float = 1e-3,
    synthetic: int = 0,
    synthetic_size: int = 64,
    synthetic_dir: str | Path | None = None,
    weights: Any = None,
    input_size: int | None = None,
    holdout: float | int = 0.1,
    eval_data: Any = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[Any], None] | None = None,
) -> RecoveryResult:
    """Convert ``model`` to GroupNorm and bring it back to its function within ``budget`` seconds.

    Args:
        model: the BatchNorm model (the teacher; not changed), or an already converted student
            when ``teacher`` is given.
        data: a folder, Dataset, DataLoader or DataSplit of images (a held-out part is kept, see
            ``holdout``), or ``"synthetic"`` for a data-free recovery.
        teacher: the BatchNorm original, when ``model`` is already converted.
        groups: the requested group count (the largest allowed with ``policy="fidelity"``).
        policy: ``divisor``, ``gcd``, ``strict`` (see :func:`gn_convert.plan`) or ``fidelity``
            (per layer, the count up to ``groups`` that keeps the output closest to BN's).
        min_channels_per_group: the fidelity plan's smallest group.
        budget: wall-clock seconds for everything after loading.
        stages: which of ``reconstruct`` and ``distill`` to run, in order. Default: ``distill`` with
            real data; none with ``data="synthetic"`` (measured: distilling on images synthesised from
            the BatchNorm statistics lowered real-photo agreement, 14.0% -> 3.0% on EfficientNet-Lite0
            and 89.2% -> 42.3% on the digits ResNet; data-free, the images choose the fidelity plan).
        batch_size, lr, mixup, feature_weight: distillation (see :func:`gn_convert.distill`).
        reconstruct_lr: Adam's learning rate of block reconstruction.
        synthetic: synthetic images to make from the teacher (added to ``data``; 256 by default
            when ``data="synthetic"``).
        synthetic_size: their side in pixels.
        synthetic_dir: also write them there as PNG files.
        weights, input_size: the model's preprocessing for folder images.
        holdout, eval_data: the held-out images (see :func:`gn_convert.data.load_data`).
        seed: seed of splits, orders and augmentations.
        device: where to compute (default: CUDA when available).
        callback: called after every distillation step (progress).

    Returns:
        The :class:`RecoveryResult`.

    Raises:
        OptionError: no data, an unknown stage, or a student without its teacher.
        ModelMismatchError, DataError, GroupPlanError: see the stages.
    """
    clock = _Clock(budget)
    if stages is None:
        stages = () if isinstance(data, str) and data == SYNTHETIC else DEFAULT_STAGES
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise OptionError(f"unknown recovery stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if teacher is None:
        if not any(is_batchnorm(m) for m in model.modules()):
            raise OptionError("the model has no BatchNorm layer: pass the converted student with its teacher=")
        teacher = model
    teacher = teacher.to(device).eval()
    opts = dict(synthetic=synthetic, synthetic_size=synthetic_size, synthetic_dir=synthetic_dir, weights=weights,
                input_size=input_size, holdout=holdout, eval_data=eval_data, seed=seed)
    split, synth_detail = _split(data, teacher, clock, opts)
    batch_size = max(1, min(batch_size, len(split.train)))  # type: ignore[arg-type]  # a few images: smaller batches
    reference = _predictions(teacher, split.heldout, device)
    results: list[StageResult] = []
    if synth_detail:
        results.append(StageResult("synthesize", synth_detail["seconds"], float("nan"), synth_detail))

    def agreement(student: nn.Module) -> float:
        found = _predictions(student, split.heldout, device)
        return float((found == reference).float().mean()) if len(reference) else float("nan")

    started = time.perf_counter()
    batches = _endless(split.train, batch_size, device, seed)
    if model is teacher:
        layer_plan = _plan(teacher, batches, groups, policy, min_channels_per_group)
        student = convert(teacher, plan=layer_plan).to(device)
    else:
        student, layer_plan = model.to(device), _student_plan(model, teacher)
    results.append(StageResult("convert", round(time.perf_counter() - started, 2), agreement(student),
                               {"plan": layer_plan.summary()}))
    history: list[EvalPoint] = []
    for stage in stages:
        started = time.perf_counter()
        before = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if clock.left() < clock.reserve:
            log.warning("no budget left for %s: skipped", stage)
            results.append(StageResult(stage, 0.0, results[-1].agreement, {"skipped": "no budget left"}))
            continue
        if stage == "reconstruct":
            report = reconstruct(student, teacher, batches, budget_s=clock.share("reconstruct"), lr=reconstruct_lr)
            detail, after = report.to_dict(), agreement(student)
        else:
            detail, history = _distill(student, teacher, split, clock, batch_size=batch_size, lr=lr, mixup=mixup,
                                       feature_weight=feature_weight, seed=seed, device=device, callback=callback)
            after = history[-1].agreement if history else agreement(student)  # its last evaluation is the end state
        if after < results[-1].agreement:  # a stage that lowered held-out agreement is undone
            student.load_state_dict(before)
            detail["undone"] = f"held-out agreement fell from {results[-1].agreement:.3f} to {after:.3f}"
            log.warning("%s lowered held-out agreement (%.3f -> %.3f): undone", stage, results[-1].agreement, after)
            after = results[-1].agreement
        results.append(StageResult(stage, round(time.perf_counter() - started, 2), after, detail))
        log.info("%s: held-out agreement %.3f", stage, results[-1].agreement)
    return RecoveryResult(student.eval(), layer_plan, results, history, len(reference), clock.elapsed())


def _student_plan(student: nn.Module, teacher: nn.Module) -> GroupPlan:
    """The plan an already converted student embodies (its GroupNorm layers, matched to the teacher's)."""
    layers = [LayerPlan(p.name, type(p.teacher).__name__, p.student.num_channels, p.student.num_groups,
                        p.student.eps, p.student.affine) for p in norm_pairs(student, teacher)]
    return GroupPlan(None, None, "given", layers)


def _plan(teacher: nn.Module, batches: Iterator[torch.Tensor], groups: int, policy: str,
          min_channels_per_group: int) -> GroupPlan:
    if policy == FIDELITY:
        return fidelity_plan(teacher, [next(batches) for _ in range(PLAN_BATCHES)], groups,
                             min_channels_per_group=min_channels_per_group)
    example = next(batches)[:1]
    return make_plan(teacher, groups, policy=policy, example_input=example)


def _distill(student: nn.Module, teacher: nn.Module, split: DataSplit, clock: _Clock, *, batch_size: int,
             device: torch.device, callback: Callable[[Any], None] | None,
             **options: Any) -> tuple[dict[str, Any], list[EvalPoint]]:
    """Distil for as many steps as the rest of the budget allows (the step time is measured first)."""
    per_step = _step_seconds(student, teacher, split, batch_size, device)
    heldout = len(split.heldout) if split.heldout is not None else 0
    evals = 2
    eval_cost = evals * heldout * per_step / batch_size / 3
    share = clock.share("distill")
    steps = max(1, int((share - eval_cost) / per_step))
    log.info("distilling %d steps (%.2f s a step) in the %.0f s left", steps, per_step, clock.left())
    result = distill(student, teacher, split, steps=steps, batch_size=batch_size, eval_every=max(1, steps // evals),
                     device=device, callback=callback, time_limit=max(share - eval_cost / evals, per_step),
                     **options)
    return result.to_dict(), result.history


def _step_seconds(student: nn.Module, teacher: nn.Module, split: DataSplit, batch_size: int,
                  device: torch.device) -> float:
    """Seconds of one distillation step, measured on a copy (teacher forward, student forward and backward)."""
    probe = copy.deepcopy(student).train()
    x = next(iter(DataLoader(split.train, batch_size=batch_size)))
    x = split_batch(x)[0].to(device)
    times = []
    for _ in range(2):
        begin = time.perf_counter()
        with torch.no_grad():
            teacher(x)
        probe(x).float().logsumexp(1).mean().backward()
        times.append(time.perf_counter() - begin)
    return min(times) * 1.25
