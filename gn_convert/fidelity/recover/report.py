"""What a recovery reports, how it is judged, and its time budget.

- :class:`Judge`: the held-out and fit views with the teacher's outputs on them, computed once;
  :meth:`Judge.score` measures a student the same way every time (top-1 agreement, agreement
  where the teacher is confident, top-5, KL, a bootstrap interval over photos) and
  :meth:`Judge.keep_best` keeps the state with the lowest held-out KL seen so far (KL, not
  top-1: on a few dozen photos top-1 moves by whole photos, KL moves smoothly).
- :class:`StageResult`, :class:`RecoveryResult`: per stage and overall, the fit (fresh views of
  the training photos) beside the held-out agreement, warnings when the two part ways, and a
  JSON form with no NaN (``null`` instead; strict JSON parsers reject NaN).
- :class:`Clock`: the wall-clock budget and each stage's share of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gn_convert.errors import OptionError
from gn_convert.fidelity.metrics import agreement_metrics, logits
from gn_convert.strict_json import json_safe
from gn_convert.surgery.plan import GroupPlan

OVERFIT_GAP = 0.15
"""Fit above held-out agreement by more than this: the result says more varied images would help."""
WIDE_INTERVAL = 0.3
"""A held-out interval wider than this (30 points) gets a warning. On EfficientNet-Lite0, a tenth of the 88 pool
photos held out (9) overstated unseen-photo agreement by up to 15 points (docs/FIDELITY.md), where 25 unseen
photos give intervals about 21 points wide."""
SHARES: dict[str, float] = {"synthesize": 0.3, "reconstruct": 0.45, "distill": 1.0}
"""Share of the remaining budget each stage may use when it starts."""
RESERVE = 0.06
"""Share of the budget kept for the evaluations between stages and the bookkeeping."""


class Judge:
    """Scores students on fixed held-out and fit views against the teacher (see the module docstring)."""

    def __init__(self, teacher: nn.Module, heldout: torch.Tensor, groups: list[str], fit: torch.Tensor,
                 measure: Callable[..., dict[str, Any]] | None = None,
                 whole: Callable[[nn.Module], dict[str, float]] | None = None) -> None:
        self.heldout, self.groups, self.fit = heldout, groups, fit
        self.measure = measure or agreement_metrics  # a task's own (gn_convert.tasks.Task.measure)
        self.whole = whole  # scores of the whole student (gn_convert.tasks.Task.model_scores): detections
        self.teacher_heldout = logits(teacher, heldout) if len(heldout) else torch.empty(0)
        self.teacher_fit = logits(teacher, fit) if len(fit) else torch.empty(0)
        self.best_kl = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    def score(self, student: nn.Module, whole: nn.Module | None = None) -> dict[str, float]:
        """``heldout`` metrics of the head ``student`` (see :func:`gn_convert.fidelity.metrics.agreement_metrics`,
        or the task's ``measure``), ``fit`` (top-1 agreement on the fit views), and the task's scores of the
        ``whole`` student where it has any."""
        found: dict[str, float] = {"fit": math.nan}
        if self.whole is not None and whole is not None:
            found.update(self.whole(whole))
        if len(self.fit):
            found["fit"] = float(self.measure(logits(student, self.fit), self.teacher_fit, None, resamples=1)["top1"])
        if len(self.heldout):
            found.update(self.measure(logits(student, self.heldout), self.teacher_heldout, self.groups,
                                      resamples=500))
        else:
            found.update(top1=math.nan, confident=math.nan, kl=math.nan)
        return found

    def keep_best(self, student: nn.Module, scores: dict[str, float]) -> bool:
        """Remember ``student``'s state if its held-out KL is the lowest so far; True when it was."""
        kl = scores.get("kl", math.nan)
        if self.best_state is not None and not kl < self.best_kl:
            return False
        self.best_kl = kl if math.isfinite(kl) else self.best_kl
        self.best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        return True

    def restore_best(self, student: nn.Module) -> None:
        """Load the best state kept (no-op when none was kept)."""
        if self.best_state is not None:
            student.load_state_dict(self.best_state)


@dataclass(frozen=True)
class Progress:
    """What a recovery's progress callback receives: the stage at work and, where it counts them, the step
    (a synthesis batch, a fitted block, a distillation step)."""

    stage: str
    step: int | None = None


@dataclass
class StageResult:
    """One stage of a recovery.

    Attributes:
        name: ``convert``, ``synthesize``, ``reconstruct`` or ``distill``.
        seconds: its wall time.
        agreement: held-out top-1 agreement after it (the state kept).
        scores: every held-out metric after it, and ``fit``.
        completed: whether it did all the work it planned within its share of the budget.
        detail: the stage's own report.
    """

    name: str
    seconds: float
    agreement: float
    scores: dict[str, float] = field(default_factory=dict)
    completed: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecoveryResult:
    """What :func:`gn_convert.recover` returns.

    Attributes:
        model: the student, in eval mode.
        plan: the group plan it was converted with (per-layer choices and reasons).
        stages: one :class:`StageResult` per stage, ``convert`` first.
        history: the distillation's held-out evaluations.
        heldout: held-out views the agreement was measured on.
        heldout_photos: distinct photos among them.
        seconds: wall time of the call.
        warnings: reasons to distrust the held-out figure, or to give more varied images.
        kept: the stage whose end state the model is (the lowest held-out KL).
    """

    model: nn.Module
    plan: GroupPlan
    stages: list[StageResult] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)
    heldout: int = 0
    heldout_photos: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    kept: str = "convert"

    @property
    def agreement(self) -> float:
        """The held-out top-1 agreement of the model returned."""
        return self.scores.get("top1", math.nan)

    @property
    def scores(self) -> dict[str, float]:
        """Every held-out metric of the model returned, and its fit."""
        return next((s.scores for s in self.stages if s.name == self.kept), {})

    @property
    def completed(self) -> bool:
        """Whether every stage did all its planned work within the budget."""
        return all(stage.completed for stage in self.stages)

    def summary(self) -> str:
        """One line per stage (time, held-out agreement and KL, fit), then the warnings."""
        lines = [f"recovery: {self.heldout} held-out views of {self.heldout_photos} photos ({self.plan.summary()}); "
                 f"the model is the state after {self.kept}"]
        for s in self.stages:
            kl, fit = s.scores.get("kl", math.nan), s.scores.get("fit", math.nan)
            low, high = s.scores.get("top1_low", math.nan), s.scores.get("top1_high", math.nan)
            interval = f" [{low:.2f}-{high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""
            miou = f"  mIoU {s.scores['miou']:.3f}" if "miou" in s.scores else ""
            if "box_recall" in s.scores:
                miou += f"  boxes found {s.scores['box_recall']:.3f}, right {s.scores['box_precision']:.3f}"
            lines.append(f"{s.name:12} {s.seconds:7.1f} s  held-out agreement {s.agreement:.3f}{interval}  KL {kl:.2f}  "
                         f"fit {fit:.3f}{miou}{'' if s.completed else '  (budget ran out)'}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-ready dict (without the model; NaN as None)."""
        return json_safe({"plan": self.plan.to_dict(), "heldout": self.heldout, "heldout_photos": self.heldout_photos,
                          "seconds": self.seconds, "agreement": self.agreement, "scores": self.scores,
                          "completed": self.completed, "warnings": self.warnings, "kept": self.kept,
                          "stages": [asdict(s) for s in self.stages],
                          "history": [asdict(p) for p in self.history]})


def overfit_warning(scores: dict[str, float]) -> str | None:
    """The warning when the fit exceeds the held-out agreement by more than :data:`OVERFIT_GAP`."""
    fit, held = scores.get("fit", math.nan), scores.get("top1", math.nan)
    if math.isfinite(fit) and math.isfinite(held) and fit - held > OVERFIT_GAP:
        return (f"fit on the training photos ({fit:.0%}) exceeds held-out agreement ({held:.0%}) by "
                f"{fit - held:.0%}: more varied images would help more than more time")
    return None


class Clock:
    """The budget: what is left, and each stage's share of it (a :data:`RESERVE` is kept)."""

    def __init__(self, budget: float) -> None:
        if not budget > 0:
            raise OptionError(f"the budget must be positive, got {budget}")
        self.budget, self.start = budget, time.perf_counter()
        self.reserve = RESERVE * budget

    def elapsed(self) -> float:
        """Seconds since the start."""
        return round(time.perf_counter() - self.start, 2)

    def left(self) -> float:
        """Seconds left of the budget."""
        return max(self.budget - (time.perf_counter() - self.start), 0.0)

    def share(self, stage: str) -> float:
        """Seconds ``stage`` may use now."""
        return max(self.left() - self.reserve, 0.0) * SHARES[stage]


def _kl(result: StageResult) -> float:
    """A stage's held-out KL, infinite where there is none."""
    kl = result.scores.get("kl", math.inf)
    return kl if isinstance(kl, (int, float)) and math.isfinite(kl) else math.inf


def _skipped(result: StageResult) -> bool:
    """Whether a stage was skipped (no budget was left when its turn came): its scores repeat the state before it."""
    return bool(result.detail.get("skipped"))


def kept_stage(results: list[StageResult]) -> str:
    """The stage whose end state had the lowest held-out KL (the first on ties). Synthesis leaves no state, and
    a skipped stage only repeats the state before it: neither is kept."""
    return min((r for r in results if r.name != "synthesize" and not _skipped(r)), key=_kl).name


def closing_warnings(results: list[StageResult], kept: str) -> list[str]:
    """What the caller should know at the end: a stage undone, a stage skipped, a budget that ran out, overfitting."""
    warnings = []
    ran = [r for r in results if not _skipped(r)]
    kept_result = next(r for r in results if r.name == kept)
    if kept != ran[-1].name and _kl(ran[-1]) > _kl(kept_result):
        warnings.append(f"{ran[-1].name} raised the held-out KL; the state after {kept} is returned")
    skipped = [r.name for r in results if _skipped(r)]
    if skipped:
        one = len(skipped) == 1
        warnings.append(f"{' and '.join(skipped)} {'was' if one else 'were'} skipped: the budget was spent before "
                        f"{'its' if one else 'their'} turn came; a larger budget would let {'it' if one else 'them'} run")
    if not all(r.completed for r in ran):
        warnings.append("the budget ran out before every stage did the work it planned (see each stage's "
                        "completed and detail); the best state reached is returned: a larger budget, or a "
                        "quieter machine, would let it finish")
    return warnings + [w for w in (overfit_warning(kept_result.scores), uncertainty_warning(kept_result.scores)) if w]


def uncertainty_warning(scores: dict[str, float]) -> str | None:
    """The warning when the held-out agreement's 95% interval is wider than :data:`WIDE_INTERVAL`."""
    low, high = scores.get("top1_low", math.nan), scores.get("top1_high", math.nan)
    if math.isfinite(low) and math.isfinite(high) and high - low > WIDE_INTERVAL:
        return (f"held-out agreement is uncertain: its 95% interval over the held-out photos is {low:.0%}-{high:.0%}; "
                "more held-out photos (--eval-data DIR) would pin it down")
    return None
