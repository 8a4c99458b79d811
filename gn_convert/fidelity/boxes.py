"""Box agreement: does the converted detector find what its BatchNorm original finds?

A detector's outputs cannot be compared position by position (how many boxes it returns depends on the
picture), so a recovery scores detection models on whole pictures as well as on their features. On held-out
pictures:

- each of the teacher's confident detections (score at least ``min_score``) is *found* when the student
  returns a detection of the same label with IoU at least :data:`MIN_IOU` (COCO's AP50 criterion), at any
  score the student returns it: a box the student scores 0.45 where the teacher scores 0.55 is still there;
- each of the student's confident detections is *right* when a teacher detection matches it the same way.

``box_recall`` = found / the teacher's confident detections, ``box_precision`` = right / the student's,
``box_f1`` their harmonic mean (0, not undefined, when one model reports nothing and the other does),
``box_iou`` the median IoU of the found pairs and ``box_score_gap`` the median absolute difference of their
scores. Matching is greedy by descending reference score, each
candidate used once (:func:`greedy_pairs`, shared with the parity check's matching).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gn_convert.modes import eval_mode

MIN_IOU = 0.5
"""IoU at which two detections of one label are the same object (COCO's AP50 criterion)."""
MIN_SCORE = 0.5
"""Score from which a detection counts as one the model reports (what a user typically keeps)."""
FLAT_BOX_ATOL = 0.01
"""Pixels by which two boxes of no area (IoU 0/0) may differ in each coordinate and still be the same box."""
PICTURES = 8
"""Held-out photos a recovery scores detections on (one view each): a Faster R-CNN picture takes 1-2 s on two
CPU cores, and every stage is scored."""


def greedy_pairs(ref: dict[str, torch.Tensor], cand: dict[str, Any], min_iou: float) -> list[tuple[int, int, float]]:
    """Match detections greedily: each reference detection, by descending score, takes the unused candidate of
    the same label with the highest IoU, when that IoU is at least ``min_iou``.

    Args:
        ref: ``boxes`` ``(R, 4)``, ``labels`` ``(R,)``, ``scores`` ``(R,)``.
        cand: the same keys (tensors or arrays) for the candidates.
        min_iou: the IoU a pair needs.

    Returns:
        ``(reference index, candidate index, IoU)`` per matched pair, in the order the references were taken.
    """
    from torchvision.ops import box_iou

    boxes, labels = (torch.as_tensor(cand[k]) for k in ("boxes", "labels"))
    if not len(ref["boxes"]) or not len(boxes):
        return []
    mine, theirs = torch.as_tensor(ref["boxes"]).float(), boxes.float()
    iou = box_iou(mine, theirs)
    flat = iou.isnan()  # both boxes of no area (a detector may return a line): the same box when they coincide
    if bool(flat.any()):
        same = (mine[:, None, :] - theirs[None, :, :]).abs().amax(-1) <= FLAT_BOX_ATOL
        iou = torch.where(flat, same.float(), iou)
    iou[torch.as_tensor(ref["labels"])[:, None] != labels[None, :]] = 0.0
    used: set[int] = set()
    pairs = []
    for i in torch.argsort(torch.as_tensor(ref["scores"]).float(), descending=True).tolist():
        best = next((j for j in torch.argsort(iou[i], descending=True).tolist() if j not in used), None)
        if best is not None and float(iou[i, best]) >= min_iou:
            used.add(best)
            pairs.append((i, best, float(iou[i, best])))
    return pairs


@torch.no_grad()
def detections(model: nn.Module, pictures: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The model's detections (eval mode, one picture a call, on the model's device) of pictures ``(3, H, W)``
    in [0, 1], on the CPU."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return [{k: v.cpu() for k, v in model([p.to(device)])[0].items()} for p in pictures]


def _confident(found: dict[str, torch.Tensor], min_score: float) -> dict[str, torch.Tensor]:
    keep = found["scores"] >= min_score
    return {k: found[k][keep] for k in ("boxes", "labels", "scores")}


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median()) if values else math.nan


@dataclass(frozen=True)
class PictureCounts:
    """One picture's matching: the teacher's confident detections (``wanted``) and how many the student found,
    the student's (``given``) and how many are right, and the IoU and score gap of each found pair."""

    found: int
    wanted: int
    right: int
    given: int
    ious: tuple[float, ...]
    gaps: tuple[float, ...]


def picture_counts(teacher: list[dict[str, torch.Tensor]], student: list[dict[str, torch.Tensor]],
                   min_score: float = MIN_SCORE, min_iou: float = MIN_IOU) -> list[PictureCounts]:
    """Each picture's :class:`PictureCounts` (see the module docstring; the arguments as :func:`box_agreement`'s)."""
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher pictures against {len(student)} student pictures")
    counts = []
    for mine, theirs in zip(teacher, student):
        sure, their_sure = _confident(mine, min_score), _confident(theirs, min_score)
        pairs = greedy_pairs(sure, theirs, min_iou)
        counts.append(PictureCounts(
            len(pairs), len(sure["scores"]), len(greedy_pairs(their_sure, mine, min_iou)), len(their_sure["scores"]),
            tuple(iou for _, _, iou in pairs),
            tuple(abs(float(sure["scores"][i]) - float(theirs["scores"][j])) for i, j, _ in pairs)))
    return counts


def summarize(counts: Sequence[PictureCounts]) -> dict[str, float]:
    """The box-agreement scores of pictures' counts (what :func:`box_agreement` returns; a bootstrap resamples
    the counts)."""
    found, wanted = sum(c.found for c in counts), sum(c.wanted for c in counts)
    right, given = sum(c.right for c in counts), sum(c.given for c in counts)
    recall = found / wanted if wanted else math.nan
    precision = right / given if given else math.nan
    if not wanted or not given:  # one model reports nothing: no agreement, unless neither does
        f1 = math.nan if wanted == given else 0.0
    else:
        f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return {"box_recall": recall, "box_precision": precision, "box_f1": f1,
            "box_iou": _median([x for c in counts for x in c.ious]),
            "box_score_gap": _median([x for c in counts for x in c.gaps]),
            "box_teacher": float(wanted), "box_student": float(given)}


def box_agreement(teacher: list[dict[str, torch.Tensor]], student: list[dict[str, torch.Tensor]],
                  min_score: float = MIN_SCORE, min_iou: float = MIN_IOU) -> dict[str, float]:
    """How the student's detections agree with the teacher's on the same pictures (see the module docstring).

    Args:
        teacher, student: per picture, ``boxes``, ``labels`` and ``scores`` (:func:`detections`).
        min_score: the score from which a detection counts as reported.
        min_iou: the IoU a matched pair needs.

    Returns:
        ``box_recall``, ``box_precision``, ``box_f1``, ``box_iou``, ``box_score_gap`` (NaN where nothing was
        there to count), ``box_teacher`` and ``box_student`` (the confident detections counted).
    """
    return summarize(picture_counts(teacher, student, min_score, min_iou))
