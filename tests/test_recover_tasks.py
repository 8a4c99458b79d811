"""Recovery of dense models: segmentation distils KL per pixel and reports per-pixel agreement and the mean
IoU of the student's class map with the teacher's; video distils clip logits on still clips of the photos;
detection distils the backbone and FPN features and reports their R^2 and the teacher's detections the student
finds. Each within its budget, with the held-out scores before and after."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import gn_convert
from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gn_convert.fidelity.distill.losses import kl_loss
from gn_convert.fidelity.metrics import agreement_metrics
from gn_convert.fidelity.recover.engine import recover
from gn_convert.tasks import TASKS, task_for_module
from gn_convert.testing.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine
from gn_convert.testing.photos import nontrivial_batchnorm, photo_crops


def photo_folder(root: Path, count: int, size: int) -> Path:
    """``count`` PNG crops of real photos."""
    root.mkdir(parents=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k, crop in enumerate(photo_crops(count, size, seed=3)):
        pixels = ((crop * std + mean).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / f"photo{k:02d}.png")
    return root


def test_per_pixel_kl_and_agreement_reduce_to_the_classifiers_on_one_pixel() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 6, 5, 5, generator=gen)
    student = teacher + 0.3 * torch.randn(teacher.shape, generator=gen)
    flat = [x.movedim(1, -1).reshape(-1, 6) for x in (student, teacher)]
    assert abs(float(kl_loss(student, teacher, 2.0)) - float(kl_loss(*flat, 2.0))) < 1e-6  # the mean over pixels
    dense, per_pixel = agreement_metrics(student, teacher, resamples=50), agreement_metrics(*flat, resamples=50)
    assert dense["top1"] == per_pixel["top1"] and abs(dense["kl"] - per_pixel["kl"]) < 1e-6
    assert agreement_metrics(teacher, teacher, resamples=10)["miou"] == 1.0 and 0 < dense["miou"] < 1


def test_the_task_of_a_module_is_known_from_its_family() -> None:
    names = {"lraspp_mobilenet_v3_large": "segmentation", "r3d_18": "video",
             "ssdlite320_mobilenet_v3_large": "detection", "resnet18": "classification"}
    for name, task in names.items():
        with torch.device("meta"):
            model = gn_convert.load.names.build_torchvision(name)
        assert task_for_module(model).name == task


@pytest.mark.slow
def test_segmentation_recovery_distils_per_pixel_and_reports_mean_iou(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nontrivial_batchnorm(TASKS["segmentation"].build("lraspp_mobilenet_v3_large", num_classes=6), size=64)
    data = photo_folder(tmp_path / "photos", 24, 64)
    result = recover(teacher, data, budget=40, input_size=48, holdout=6, groups=16, batch_size=4)
    first, last = result.stages[0].scores, result.stages[-1].scores
    assert [s.name for s in result.stages] == ["convert", "distill"] and result.stages[-1].detail["steps"] >= 3
    assert {"miou", "top1", "kl", "confident"} <= set(last) and 0 < last["miou"] <= 1
    assert last["kl"] <= first["kl"]  # the state kept is the best held-out KL
    out = result.model.eval()(torch.zeros(1, 3, 48, 48))["out"]
    assert out.shape == (1, 6, 48, 48) and sum(isinstance(m, torch.nn.GroupNorm) for m in result.model.modules()) == 47


@pytest.mark.slow
def test_video_recovery_distils_clip_logits_on_still_clips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = TASKS["video"].build("r3d_18", num_classes=5).eval()
    randomize_batchnorm_affine(teacher, seed=0)
    clips = photo_crops(4, 32, seed=0).unsqueeze(2).expand(-1, -1, 16, -1, -1).contiguous()
    estimate_batchnorm_stats(teacher, clips.split(2))
    data = photo_folder(tmp_path / "photos", 16, 32)
    before = copy.deepcopy(teacher.state_dict())
    result = recover(teacher.eval(), data, budget=40, input_size=32, holdout=4, groups=16, batch_size=2)
    assert result.stages[-1].name == "distill" and result.stages[-1].detail["steps"] >= 2
    assert result.model(clips[:1]).shape == (1, 5) and result.heldout == 4 * 8
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched


@pytest.mark.slow
def test_detection_recovery_distils_the_backbone_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = TASKS["detection"].build("fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    nontrivial_batchnorm(teacher.backbone, size=64, batch_size=4)
    data = photo_folder(tmp_path / "photos", 16, 64)
    result = recover(teacher.eval(), data, budget=40, input_size=64, holdout=4, groups=16, batch_size=4)
    first, last = result.stages[0].scores, result.stages[-1].scores
    assert 0 < first["feature_r2"] <= last["feature_r2"] < 1 and last["kl"] <= first["kl"]
    for scores in (first, last):  # detections on 4 held-out photos (this untrained teacher is confident on them)
        assert scores["box_teacher"] > 0 and 0 <= scores["box_recall"] <= 1 and 0 <= scores["box_f1"] <= 1
    views = torch.stack(photo_crops(4, 64, seed=5).unbind())
    itself = TASKS["detection"].model_scores(teacher, SimpleNamespace(heldout=views, groups=list("abcd")))
    assert itself is not None and itself(copy.deepcopy(teacher))["box_f1"] == 1.0
    assert "boxes found" in result.summary()
    with torch.no_grad():
        detections = result.model.eval()([torch.rand(3, 96, 96)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}
