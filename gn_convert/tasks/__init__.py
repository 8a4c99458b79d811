"""The tasks gn-convert serves, and which one a model belongs to.

- ``classification`` (:class:`~gn_convert.tasks.base.Task`): torchvision's and timm's classifiers;
- ``segmentation`` (:mod:`~gn_convert.tasks.segmentation`): DeepLabV3, FCN, LR-ASPP;
- ``detection`` (:mod:`~gn_convert.tasks.detection`): Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSDlite;
- ``video`` (:mod:`~gn_convert.tasks.video`): R3D, MC3, R(2+1)D, S3D.
"""

from __future__ import annotations

import functools

from gn_convert.tasks.base import Task
from gn_convert.tasks.detection import Detection
from gn_convert.tasks.segmentation import Segmentation
from gn_convert.tasks.video import Video

CLASSIFICATION = Task()
TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, Segmentation(), Detection(), Video())}
"""Every task by name, classification first."""


@functools.cache
def _owners() -> dict[str, Task]:
    return {name: task for task in TASKS.values() for name in task.names()}


def task_of(name: str) -> Task:
    """The task of a torchvision model name (classification for ``timm/...`` and unknown names)."""
    return _owners().get(name, CLASSIFICATION)


def task_for_module(model: object) -> Task:
    """The task of a model given as a module: torchvision's detection and segmentation families by their
    classes, a video model by its 3-D convolutions; classification otherwise."""
    from torch import nn
    from torchvision.models import detection, segmentation

    detectors = (detection.generalized_rcnn.GeneralizedRCNN, detection.RetinaNet, detection.FCOS, detection.ssd.SSD)
    if isinstance(model, detectors):
        return TASKS["detection"]
    if isinstance(model, (segmentation.deeplabv3.DeepLabV3, segmentation.fcn.FCN, segmentation.lraspp.LRASPP)):
        return TASKS["segmentation"]
    if isinstance(model, nn.Module) and any(isinstance(m, nn.Conv3d) for m in model.modules()):
        return TASKS["video"]
    return CLASSIFICATION


def all_names() -> list[str]:
    """Every torchvision model name of every task, sorted."""
    return sorted(_owners())


__all__ = ["CLASSIFICATION", "TASKS", "Detection", "Segmentation", "Task", "Video", "all_names", "task_for_module",
           "task_of"]
