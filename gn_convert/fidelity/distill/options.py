"""The options, results and schedule of a distillation run (see :mod:`gn_convert.fidelity.distill.engine`).

Plain dataclasses and pure functions: :class:`DistillOptions` (what shapes a run),
:class:`EvalPoint` and :class:`DistillResult` (what it measured), :class:`StepInfo` (what a
progress callback sees), :func:`lr_factor` (warmup then cosine) and :func:`param_groups`
(which parameters train, at which learning rate and weight decay).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from gn_convert.errors import OptionError

TRAINABLE: tuple[str, ...] = ("all", "gn-affine")


@dataclass
class DistillOptions:
    """The options of a distillation run (see :func:`distill` for their meaning)."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    gn_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    temperature: float = 2.0
    ce_weight: float = 0.0
    feature_weight: float = 0.0
    stats_weight: float = 0.0
    mixup: float = 0.0
    trainable: str = "all"
    accumulate: int = 1
    eval_every: int = 25
    eval_batch_size: int = 128
    target_agreement: float | None = None
    time_limit: float | None = None
    checkpoint_every: int = 0
    seed: int = 0
    holdout: float | int = 0.1
    augment: bool = True
    flip: bool = True
    amp: bool = True
    cpu_bf16: bool = False
    channels_last: bool = True
    num_workers: int = 0

    def check(self) -> None:
        """Raise :class:`OptionError` for an impossible option."""
        problems = [
            (self.steps < 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size < 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.accumulate < 1, f"accumulate must be >= 1, got {self.accumulate}"),
            (self.lr <= 0 or self.gn_lr_scale <= 0, "learning rates must be positive"),
            (self.temperature <= 0, f"temperature must be positive, got {self.temperature}"),
            (self.mixup < 0, f"mixup must be >= 0 (0: off), got {self.mixup}"),
            (self.feature_weight < 0 or self.stats_weight < 0, "loss weights must be >= 0 (0: off)"),
            (self.trainable not in TRAINABLE, f"trainable must be one of {', '.join(TRAINABLE)}"),
            (self.eval_every < 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.target_agreement is not None and not 0 < self.target_agreement <= 1,
             "target agreement must be in (0, 1]"),
        ]
        for bad, message in problems:
            if bad:
                raise OptionError(message)

    @property
    def warmup(self) -> int:
        """Warmup steps: the option, or 5% of the steps when unset."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20


@dataclass
class EvalPoint:
    """One evaluation on the held-out images.

    Attributes:
        step: optimizer steps done.
        agreement: fraction of held-out images where student and teacher agree on top-1.
        accuracy: student top-1 accuracy on labelled held-out images, or None.
        train_loss: mean training loss since the previous evaluation, or None at step 0.
        lr: learning rate of the last step (base group).
        seconds: wall time since the run (or its resumption) started.
    """

    step: int
    agreement: float
    accuracy: float | None
    train_loss: float | None
    lr: float
    seconds: float


@dataclass
class StepInfo:
    """What a progress callback receives after every optimizer step (rank 0 only)."""

    step: int
    steps: int
    loss: float
    agreement: float | None
    lr: float


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        model: the trained student (the same object that was passed in), in eval mode.
        history: one :class:`EvalPoint` per evaluation, the first at the starting step.
        steps: optimizer steps done in total (including those before a resume).
        stopped_early: True when ``target_agreement`` was reached, or ``time_limit`` passed, before ``steps``.
        teacher_accuracy: the teacher's held-out accuracy, or None without labels.
        heldout: number of held-out images evaluated on.
        seconds: wall time of this call.
    """

    model: nn.Module
    history: list[EvalPoint] = field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False
    teacher_accuracy: float | None = None
    heldout: int = 0
    seconds: float = 0.0

    @property
    def agreement(self) -> float:
        """The last measured top-1 agreement with the teacher (nan without held-out data)."""
        return self.history[-1].agreement if self.history else float("nan")

    @property
    def accuracy(self) -> float | None:
        """The last measured accuracy, or None without labels."""
        return self.history[-1].accuracy if self.history else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without the model)."""
        return {"steps": self.steps, "stopped_early": self.stopped_early,
                "teacher_accuracy": self.teacher_accuracy, "heldout": self.heldout,
                "seconds": self.seconds, "history": [asdict(p) for p in self.history]}


def lr_factor(step: float, steps: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (fractional steps allowed): linear warmup,
    then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, opts: DistillOptions) -> list[dict[str, Any]]:
    """AdamW parameter groups: GroupNorm affines (scaled lr, no decay), other vectors (no
    decay), other tensors (decay). With ``trainable="gn-affine"`` only the first group.

    Parameters that do not require gradients are never trained: the model's own choice of
    what is frozen (surgery keeps layers converted from FrozenBatchNorm2d frozen) is kept.

    Raises:
        OptionError: no parameter is left to train.
    """
    gn_ids = {id(p) for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()}
    gn: list[nn.Parameter] = []
    flat: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:  # frozen on purpose (a layer converted from FrozenBatchNorm2d, a frozen stem)
            continue
        if id(p) in gn_ids:
            gn.append(p)
        elif opts.trainable == "all":
            (flat if p.ndim <= 1 else decay).append(p)
    groups = [{"params": gn, "base_lr": opts.lr * opts.gn_lr_scale, "weight_decay": 0.0},
              {"params": flat, "base_lr": opts.lr, "weight_decay": 0.0},
              {"params": decay, "base_lr": opts.lr, "weight_decay": opts.weight_decay}]
    kept = [{**g, "lr": g["base_lr"]} for g in groups if g["params"]]
    if not kept:
        raise OptionError(f"trainable={opts.trainable!r} leaves no parameter that requires gradients; "
                          "unfreeze some parameters or choose trainable='all'")
    return kept


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Train only ``params`` inside the block; restore every ``requires_grad`` afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
