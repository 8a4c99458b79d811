"""Box agreement (gn_convert.fidelity.boxes): the teacher's confident detections the student finds, the student's
that the teacher has, on hand-built detections whose answer is known; the held-out pictures a recovery scores
a detector on; and the parity check's matching, which shares the greedy matcher."""

from __future__ import annotations

import math

import torch

from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gn_convert.fidelity.boxes import box_agreement, greedy_pairs
from gn_convert.parity.detections import DetectionRow, match
from gn_convert.tasks.detection import heldout_pictures


def found(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


TEACHER = found([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [0, 30, 10, 40]], [1, 2, 3, 1],
                [0.9, 0.8, 0.7, 0.2])


def test_a_model_agrees_with_itself_entirely() -> None:
    scores = box_agreement([TEACHER, TEACHER], [TEACHER, TEACHER])
    assert (scores["box_recall"], scores["box_precision"], scores["box_f1"]) == (1.0, 1.0, 1.0)
    assert scores["box_iou"] == 1.0 and scores["box_score_gap"] == 0.0
    assert (scores["box_teacher"], scores["box_student"]) == (6.0, 6.0)  # three confident boxes a picture


def test_found_at_any_score_right_only_where_confident_labels_and_iou_decide() -> None:
    student = found([[0, 0, 10, 12],     # the first box, IoU 10/12, found though scored 0.4
                     [20, 20, 40, 40],   # the second box's place, but label 5: neither found nor right
                     [52, 50, 62, 60],   # the third box, IoU 80/120 = 0.67: found and right
                     [0, 30, 10, 40],    # the teacher's unconfident box: makes this confident one right
                     [80, 80, 90, 90]],  # nothing of the teacher's there: wrong
                    [1, 5, 3, 1, 4], [0.4, 0.9, 0.6, 0.7, 0.95])
    scores = box_agreement([TEACHER], [student])
    assert scores["box_teacher"] == 3 and scores["box_student"] == 4  # scores >= 0.5
    assert math.isclose(scores["box_recall"], 2 / 3) and math.isclose(scores["box_precision"], 2 / 4)
    assert math.isclose(scores["box_f1"], 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert math.isclose(scores["box_iou"], 10 / 12, rel_tol=1e-6) or math.isclose(scores["box_iou"], 80 / 120,
                                                                                 rel_tol=1e-6)
    assert math.isclose(scores["box_score_gap"], 0.5, rel_tol=1e-6) or math.isclose(scores["box_score_gap"], 0.1,
                                                                                   rel_tol=1e-6)
    assert box_agreement([TEACHER], [student], min_iou=0.9)["box_recall"] == 0.0  # neither pair overlaps that much


def test_a_student_that_reports_nothing_scores_zero_not_undefined() -> None:
    nothing = found([], [], [])
    scores = box_agreement([TEACHER], [nothing])
    assert scores["box_recall"] == 0.0 and scores["box_f1"] == 0.0 and math.isnan(scores["box_precision"])
    quiet = {**TEACHER, "scores": TEACHER["scores"] * 0.3}  # the same boxes, none confident: found, yet reports none
    scores = box_agreement([TEACHER], [quiet])
    assert scores["box_recall"] == 1.0 and scores["box_f1"] == 0.0
    assert math.isnan(box_agreement([nothing], [nothing])["box_f1"])


def test_each_candidate_is_used_once_by_the_best_scored_reference_first() -> None:
    two = found([[0, 0, 10, 10], [0, 0, 10, 11]], [1, 1], [0.6, 0.9])  # both overlap the one candidate
    pairs = greedy_pairs(two, found([[0, 0, 10, 10]], [1], [0.5]), 0.5)
    assert [(i, j) for i, j, _ in pairs] == [(1, 0)]


def test_the_parity_check_judges_the_boxes_even_where_the_scores_agree() -> None:
    """A detection's own counterpart in the file is no tie: before this, scores that agreed made every
    detection tied and a file with every box moved passed."""
    got = {k: v.numpy() for k, v in TEACHER.items()}
    row = match(TEACHER, got)
    assert (row["matched"], row["distinct"], row["matched_distinct"], row["score_max_abs"]) == (4, 4, 4, 0.0)
    moved = DetectionRow("cpu", "as written", 0, 4, 4, **match(TEACHER, {**got, "boxes": got["boxes"] + 3.0}))
    assert moved.matched == 0 and moved.distinct == 4 and not moved.passed  # IoU 49/151 for the small boxes
    alike = found([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 1], [0.5, 0.502])  # scored alike: which is kept is luck
    swapped = {k: v.numpy() for k, v in found([[20, 20, 40, 40], [60, 60, 70, 70]], [1, 1], [0.502, 0.5]).items()}
    assert match(alike, swapped)["distinct"] == 0
    row = DetectionRow("cpu", "threshold 0", 0, 2, 2, **match(alike, swapped))
    assert row.matched == 1 and not row.passed  # a row of tied scores still judges its boxes: half found fails


def test_heldout_pictures_are_the_first_view_of_each_photo_back_in_unit_range() -> None:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    views = (pixels - mean) / std
    groups = ["b", "b", "a", "a", "c", "c"]
    chosen = heldout_pictures(views, groups, 2)
    assert len(chosen) == 2
    assert torch.allclose(chosen[0], pixels[0], atol=1e-6) and torch.allclose(chosen[1], pixels[2], atol=1e-6)


def test_boxes_of_no_area_match_where_they_coincide() -> None:
    """An untrained RetinaNet returned a box of height 0; its IoU with its twin is 0/0, which matched nothing and
    failed the parity of a correct file."""
    line = found([[150.9, 0, 256, 0], [0, 0, 10, 10]], [3, 1], [0.5, 0.6])
    twin = found([[150.905, 0, 256, 0], [0, 0, 10, 10]], [3, 1], [0.5, 0.6])
    assert sorted((i, j) for i, j, _ in greedy_pairs(line, twin, 0.9)) == [(0, 0), (1, 1)]
    elsewhere = found([[100, 0, 256, 0], [0, 0, 10, 10]], [3, 1], [0.5, 0.6])
    assert sorted((i, j) for i, j, _ in greedy_pairs(line, elsewhere, 0.9)) == [(1, 1)]
