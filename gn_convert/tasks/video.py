"""Video classification (torchvision's ``models.video``: R3D, MC3, R(2+1)D, S3D with BatchNorm3d).

A model maps a clip ``(N, 3, T, H, W)`` to logits ``(N, classes)``. Clips are 16 frames (how the
Kinetics-400 weights were trained and evaluated); the crop size comes from the weights.
"""

from __future__ import annotations

from torchvision import models as tvm

from gn_convert.tasks.base import Task


class Video(Task):
    """Clip classification: ``(N, 3, 16, H, W)`` in, logits out."""

    name = "video"
    module = tvm.video
    body = "two-level"
    frames = 16
