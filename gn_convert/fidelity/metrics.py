"""How close a student is to its teacher, measured as a study should report it.

- :func:`agreement_metrics`: top-1 agreement, agreement where the teacher is confident (top
  probability above 0.5), top-5 (the teacher's class among the student's five), KL(teacher ||
  student), and a bootstrap 95% interval of the top-1 agreement that resamples **groups** (the
  photos crops were cut from), since crops of one photo are correlated.
- :func:`statistics_spread`: per GroupNorm layer, how much its per-sample group statistics vary
  across samples, next to the same quantity in the teacher on the same inputs. A GroupNorm whose
  statistics stopped varying (a constant offset folded into the previous layer, say) would be a
  fixed affine in disguise; this shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gn_convert.fidelity.pairs import forward_hooks
from gn_convert.modes import eval_mode

CONFIDENT = 0.5


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """The model's outputs on ``images`` in eval mode, in batches, as float32 on the CPU."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([model(x.to(device).float()).float().cpu() for x in images.split(batch_size)])


def agreement_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      groups: Sequence[str] | None = None, *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Agreement of a student's outputs with its teacher's on the same inputs.

    Args:
        student_logits, teacher_logits: ``(N, classes)``, or ``(N, classes, ...)`` per position (a
            segmentation model's pixels): then every position counts as an item of its sample's group,
            and ``miou`` (:func:`mean_iou` of the two class maps) is added.
        groups: the group (photo) of each input, for the bootstrap interval; None: per input.
        resamples: bootstrap resamples.
        seed: seed of the bootstrap.

    Returns:
        ``top1``, ``top1_low``, ``top1_high`` (95% interval), ``confident`` (top-1 agreement where
        the teacher's top probability is above 0.5) and ``n_confident``, ``top5``, ``kl``; fractions.
    """
    extra: dict[str, Any] = {}
    if teacher_logits.dim() > 2:  # dense outputs (N, classes, H, W): every position is an item of its sample's group
        extra["miou"] = mean_iou(student_logits.argmax(1), teacher_logits.argmax(1), teacher_logits.shape[1])
        positions = teacher_logits[0, 0].numel()
        names = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(teacher_logits))]
        groups = [g for g in names for _ in range(positions)]
        student_logits, teacher_logits = (x.movedim(1, -1).reshape(-1, x.shape[1]) for x in (student_logits,
                                                                                         teacher_logits))
    teacher_prob = teacher_logits.softmax(1)
    target = teacher_logits.argmax(1)
    agree = (student_logits.argmax(1) == target).float()
    confident = teacher_prob.max(1).values > CONFIDENT
    top5 = (student_logits.topk(min(5, student_logits.shape[1]), 1).indices == target[:, None]).any(1).float()
    kl = (teacher_prob * (teacher_logits.log_softmax(1) - student_logits.log_softmax(1))).sum(1)
    labels: list[Any] = list(groups) if groups is not None else list(range(len(agree)))
    names = sorted(set(labels), key=str)
    slot = {name: k for k, name in enumerate(names)}
    member = torch.tensor([slot[g] for g in labels])
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, member, agree.double())
    counts = torch.zeros(len(names), dtype=torch.float64).index_add_(0, member, torch.ones(len(agree), dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(resamples):  # the agreement over every item of the groups drawn (with replacement)
        chosen = torch.randint(len(names), (len(names),), generator=gen)
        samples.append(float(sums[chosen].sum() / counts[chosen].sum()))
    low, high = torch.tensor(samples).quantile(torch.tensor([0.025, 0.975])).tolist()
    return {"top1": float(agree.mean()), "top1_low": low, "top1_high": high,
            "confident": float(agree[confident].mean()) if bool(confident.any()) else float("nan"),
            "n_confident": int(confident.sum()), "top5": float(top5.mean()), "kl": float(kl.mean()), **extra}


def mean_iou(student: torch.Tensor, teacher: torch.Tensor, classes: int) -> float:
    """Mean over the classes the teacher predicts of the IoU of the student's mask with the teacher's
    (per-pixel class maps of the same shape)."""
    ious = []
    for k in teacher.unique().tolist():
        t, s = teacher == k, student == k
        ious.append(float((t & s).sum()) / max(float((t | s).sum()), 1.0))
    return sum(ious) / len(ious) if ious else float("nan")


@torch.no_grad()
def statistics_spread(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per student GroupNorm layer: the spread across samples of its per-sample group statistics.

    For each layer, the input's per-sample, per-group mean and standard deviation are taken;
    the spread is the standard deviation across samples of each, divided by the mean over
    samples of the group's standard deviation (so it is scale-free), averaged over groups. The
    teacher's BatchNorm layer of the same name is measured on its own input, grouped the same way.

    Returns:
        layer name -> ``student_mean_spread``, ``teacher_mean_spread``, ``student_std_spread``,
        ``teacher_std_spread``.
    """
    layers = {n: m for n, m in student.named_modules() if isinstance(m, nn.GroupNorm)}
    teacher_modules = dict(teacher.named_modules())
    found: dict[str, dict[str, float]] = {name: {} for name in layers}

    def hook_for(name: str, groups: int, who: str) -> Any:
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inputs[0].float().reshape(inputs[0].shape[0], groups, -1)
            mean, std = x.mean(2), x.std(2)
            scale = std.mean(0).clamp_min(1e-8)
            found[name][f"{who}_mean_spread"] = float((mean.std(0) / scale).mean())
            found[name][f"{who}_std_spread"] = float((std.std(0) / scale).mean())
        return hook

    hooks = [(m, hook_for(n, m.num_groups, "student")) for n, m in layers.items()]
    hooks += [(teacher_modules[n], hook_for(n, m.num_groups, "teacher")) for n, m in layers.items()
              if n in teacher_modules]
    device = next(student.parameters()).device
    with forward_hooks(hooks), eval_mode(student, teacher):
        student(images.to(device))
        teacher(images.to(device))
    return found
