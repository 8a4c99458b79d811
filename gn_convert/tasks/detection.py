"""Object detection (torchvision's ``models.detection``: Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS,
SSDlite; their backbones use FrozenBatchNorm2d when pretrained, BatchNorm2d when built without weights).

A model takes a list of images ``(3, H, W)`` in [0, 1] (it resizes and normalises them itself) and
returns, per image, boxes, labels and scores (and masks or keypoints). The export follows
torchvision's own ONNX path: torch's TorchScript-based exporter, one image, height and width
dynamic (:mod:`gn_convert.onnx.script_trace`). Parity compares the backbone and FPN features like
any output, and the detections by matching boxes (:mod:`gn_convert.parity.detections`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from gn_convert.tasks.base import Task

IMAGE_SIZE = (480, 640)
"""The example image's height and width (the model resizes it to its own ``min_size``)."""


class Detection(Task):
    """Detections per image: a list of ``(3, H, W)`` images in, boxes, labels, scores out."""

    name = "detection"
    module = tvm.detection
    body = "two-level"
    batched = False  # one image a call, of any height and width

    def build(self, name: str, **kwargs: Any) -> nn.Module:
        """torchvision's builder; without weights, without backbone weights too (unless given)."""
        if kwargs.get("weights") is None:
            kwargs.setdefault("weights_backbone", None)
        return super().build(name, **kwargs)

    def input_size(self, weights: Any) -> tuple[int, ...]:
        return IMAGE_SIZE

    def example(self, size: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
        """Images in [0, 1], as a batch (the model takes it as a list of images)."""
        return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))

    def output_names(self, model: nn.Module) -> tuple[str, ...]:
        """The keys of the model's detections, in the order it returns them (the exporter flattens the dict
        so): ``boxes``, ``labels``, ``scores`` and ``masks`` or ``keypoints`` and ``keypoints_scores`` for the
        R-CNNs; ``boxes``, ``scores``, ``labels`` for RetinaNet, FCOS and SSD."""
        heads = getattr(model, "roi_heads", None)
        if heads is None:
            return ("boxes", "scores", "labels")
        extra: tuple[str, ...] = ()
        if heads.has_mask():
            extra = ("masks",)
        elif heads.has_keypoint():
            extra = ("keypoints", "keypoints_scores")
        return ("boxes", "labels", "scores", *extra)

    def labels(self, categories: list[str] | None) -> list[str] | None:
        return None  # labels come out as class indices per detection, not as a classifier's last axis

    # -- recovery: the backbone and FPN features (every GroupNorm of the RPN and box heads' inputs) ----------

    def head(self, model: nn.Module) -> nn.Module:
        """The backbone and FPN features of an image batch, flattened into one vector a sample."""
        return Features(model.get_submodule("backbone"))

    def output_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The features' squared error over the teacher features' variance (scale-free; 1 for a constant)."""
        return ((student.float() - teacher.float()) ** 2).mean() / teacher.float().var().clamp_min(1e-12)

    def measure(self, student: torch.Tensor, teacher: torch.Tensor, groups: Any = None,
                resamples: int = 500) -> dict[str, Any]:
        """``top1`` is the features' R^2 against the teacher's (1 - ``kl``), ``kl`` the loss above."""
        error = float(self.output_loss(student, teacher, 1.0))
        return {"top1": 1.0 - error, "top1_low": float("nan"), "top1_high": float("nan"), "confident": float("nan"),
                "n_confident": 0, "top5": float("nan"), "kl": error, "feature_r2": 1.0 - error}

    def model_scores(self, teacher: nn.Module, found: Any) -> Callable[[nn.Module], dict[str, float]] | None:
        """Box agreement with the teacher's detections (:func:`gn_convert.fidelity.boxes.box_agreement`) on one
        view each of the first :data:`~gn_convert.fidelity.boxes.PICTURES` held-out photos; the teacher's are
        computed once."""
        from gn_convert.fidelity.boxes import PICTURES, box_agreement, detections

        pictures = heldout_pictures(found.heldout, found.groups, PICTURES)
        if not pictures:
            return None
        reference = detections(teacher, pictures)
        return lambda student: box_agreement(reference, detections(student, pictures))

    def export(self, model: nn.Module, path: Path, *, input_size: tuple[int, ...], **options: Any) -> Any:
        from gn_convert.onnx.export import export_onnx

        options.pop("dynamic_batch", None)
        options.setdefault("body", self.body)
        return export_onnx(model, path, input_shape=(3, *input_size), images=True,
                           output_names=self.output_names(model), **options)

    def check_parity(self, model: nn.Module, path: Path, *, input_size: tuple[int, ...] | None = None,
                     **options: Any) -> Any:
        """Every GroupNorm layer of the file, and the detections matched, on pictures of ``input_size``
        (:mod:`gn_convert.parity.detections`); ``providers``, ``native_library`` and ``tolerances`` (the layers'
        bound, taken literally) as for any model; the other options of :func:`gn_convert.check_parity` (levels,
        batch, images) do not apply to a detector (one picture a call, level ``all``)."""
        from gn_convert.parity.detections import (
            DetectionParityReport,
            detection_rows,
            layer_rows,
            pictures,
            with_open_threshold,
        )

        size = tuple(input_size or IMAGE_SIZE)
        providers, library = tuple(options.get("providers", ("cpu",))), options.get("native_library")
        images, kind = pictures((int(size[0]), int(size[1])))
        layers, skipped = layer_rows(model, path, images, providers, library, options.get("tolerances"))
        rows = detection_rows(model, path, images, providers, "as written", library)
        opened, opened_path, scratch = with_open_threshold(model, lambda m, p: self.export(m, p, input_size=size))
        with scratch:
            rows += detection_rows(opened, opened_path, images, providers, "threshold 0", library)
        return DetectionParityReport(str(path), kind, layers, rows, skipped)


class Features(nn.Module):
    """A detection backbone's feature maps (a dict by level), flattened and concatenated per sample."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([level.flatten(1) for level in self.backbone(x).values()], dim=1)


def heldout_pictures(views: torch.Tensor, groups: Sequence[str], count: int) -> list[torch.Tensor]:
    """The first view of each of the first ``count`` photos among normalised held-out ``views`` (a recovery's:
    ImageNet mean and deviation), as pictures in [0, 1] (what a detection model takes)."""
    from gn_convert.data.transforms import unnormalise

    first = {str(group): k for k, group in reversed(list(enumerate(groups)))}
    return [unnormalise(views[k]) for k in sorted(first.values())[:count]]
