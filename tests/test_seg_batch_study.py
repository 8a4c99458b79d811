"""The segmentation batch-size study (``scripts/seg_batch_study.py``) and its data
(``gn_convert.testing.shape_masks``): the masks are exact, the scores are right, and the ``--fast``
run trains BN and GN-G32 above the all-background score (GN with the default plan fine-tunes only at
learning rates too small for the fast run's few steps). Which norm wins at which batch size is
research, recorded by the script's own runs (docs/BATCH_SIZE.md, "Segmentation"), and not asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from gn_convert.testing.shape_masks import CLASSES, build_shape_set, confusion, mean_iou, pixel_accuracy
from helpers.scripts import script_module


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    pytest.importorskip("skimage", reason="the shapes are drawn with skimage.draw onto scikit-image photos")
    from gn_convert.testing.shape_masks import bundled_photos

    return bundled_photos(("astronaut", "coffee", "chelsea", "rocket"))


def test_each_class_covers_exactly_its_drawn_shapes(photos: list[np.ndarray]) -> None:
    shape_set = build_shape_set(photos, 24, size=96, seed=5)
    drawn = [s for shapes in shape_set.shapes for s in shapes]
    assert len(shape_set) == 24 and all(2 <= len(shapes) <= 4 for shapes in shape_set.shapes)
    assert {s.label for s in drawn} == {1, 2, 3}
    expected = [96 * 96 * 24 - sum(s.area for s in drawn)] + [sum(s.area for s in drawn if s.label == k)
                                                               for k in range(1, len(CLASSES))]
    assert shape_set.class_pixels().tolist() == expected
    rows, cols = np.mgrid[:96, :96]
    for labels, shapes, background in zip(shape_set.labels, shape_set.shapes, shape_set.backgrounds):
        outside = labels > 0
        for s in shapes:  # each shape's pixels lie in its own circle, and are all of its class there
            circle = np.hypot(rows - s.centre[0], cols - s.centre[1]) <= s.radius + 0.5
            assert np.count_nonzero(labels[circle] == s.label) == s.area == np.count_nonzero(labels[circle])
            outside &= ~circle
            assert s.fill != background
            assert 0.85 < s.area / s.geometric_area < 1.15
            row, col = s.centre  # inside the image by the circle's whole radius
            assert s.radius < row < 95 - s.radius and s.radius < col < 95 - s.radius
            if s.label in (1, 2):  # an ellipse or a rectangle holds its centre
                assert labels[round(row), round(col)] == s.label
        assert not outside.any()  # no labelled pixel outside every shape's circle


def test_shape_set_depends_only_on_its_seed(photos: list[np.ndarray]) -> None:
    first, again, other = (build_shape_set(photos, 6, size=64, seed=s) for s in (3, 3, 4))
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert not np.array_equal(first.labels, other.labels)
    images, labels = first.tensors()
    assert images.shape == (6, 3, 64, 64) and float(images.max()) <= 1.0 and labels.dtype == torch.long


def test_mean_iou_and_pixel_accuracy_on_a_known_prediction() -> None:
    target = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 2], [0, 1, 3, 3]])
    predicted = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 2], [0, 1, 3, 2]])
    matrix = confusion(predicted, target)
    assert matrix.sum() == 12 and matrix[1, 0] == 1 and matrix[3, 2] == 1
    # IoU: background 6/7, class 1 2/3, class 2 1/2, class 3 1/2
    assert math.isclose(mean_iou(matrix), (6 / 7 + 2 / 3 + 1 / 2 + 1 / 2) / 4)
    assert math.isclose(pixel_accuracy(matrix), 10 / 12)
    assert math.isclose(mean_iou(confusion(target, target)), 1.0)
    assert math.isclose(mean_iou(confusion(torch.zeros_like(target), target)), 6 / 12 / 4)


@pytest.fixture(scope="module")
def study() -> ModuleType:
    pytest.importorskip("skimage", reason="the study draws shapes with skimage.draw")
    pytest.importorskip("efficientnet_lite_pytorch", reason="the study fine-tunes EfficientNet-Lite0 (realnet extra)")
    pytest.importorskip("matplotlib", reason="the study plots its results")
    with script_module("seg_batch_study") as module:
        yield module


def test_crossings_interpolate_on_a_log2_axis(study: ModuleType) -> None:
    summary = [{"variant": v, "batch_size": b, "miou_mean": m}
               for v, points in (("GN", {2: 0.6, 8: 0.5, 32: 0.5}), ("BN", {2: 0.4, 8: 0.4, 32: 0.7}))
               for b, m in points.items()]
    (crossing,) = study.crossings(summary, "GN", "BN")
    assert math.isclose(crossing, 2 ** (3 + 2 * 0.1 / 0.3))  # a third of the way from 8 to 32 in log2


@pytest.mark.slow
def test_fast_study_trains_above_the_background_score(study: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    summary = study.main(["--fast", "--out", str(tmp_path)])
    document = json.loads((tmp_path / "seg_batch_study.json").read_text())
    cfg = study.StudyConfig.fast()
    assert len(document["runs"]) == len(cfg.batch_sizes) * len(cfg.variants) == len(summary)
    all_background = document["background_share"] / len(CLASSES)  # mean IoU of predicting background everywhere
    best = {v: max(r["miou"] for r in document["runs"] if r["variant"] == v) for v in cfg.variants}
    assert best["BN"] > all_background + 0.05 and best["GN-G32"] > all_background + 0.05, (best, all_background)
    assert all(r["steps"] == int(cfg.epochs * cfg.train_images) // r["batch_size"] for r in document["runs"])
    memory = {(r["variant"], r["size"]): r["saved_bytes"] for r in document["memory"]}
    for variant in ("BN", "GN"):  # activations grow with the pixels: 4x from 128 to 256 px
        assert 3.6 < memory[variant, 256] / memory[variant, 128] < 4.4
    assert 0.8 < memory["GN", 256] / memory["BN", 256] < 1.25
    assert (tmp_path / "seg_batch_study.png").stat().st_size > 10_000
