"""Video classification (torchvision's ``models.video``: R3D, MC3, R(2+1)D, S3D with BatchNorm3d).

A model maps a clip ``(N, 3, T, H, W)`` to logits ``(N, classes)``. Clips are 16 frames (how the
Kinetics-400 weights were trained and evaluated); the crop size comes from the weights.

Recovery from a folder of photos distils on *still clips*: each view repeated over the 16 frames. They
carry the photos' spatial statistics but no motion, so the temporal filters are fitted to zero
motion; a Dataset of real clips ``(3, 16, H, W)`` (``data=``) is used as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import models as tvm

from gn_convert.tasks.base import Task


class Video(Task):
    """Clip classification: ``(N, 3, 16, H, W)`` in, logits out."""

    name = "video"
    module = tvm.video
    body = "two-level"
    frames = 16

    def recovery_views(self, found: Any) -> Any:
        """Image views as still clips (each repeated over :attr:`frames` frames); clips pass as they are."""
        if found.heldout.dim() == 5:
            return found
        return dataclasses.replace(found, train=StillClips(found.train, self.frames),
                                   heldout=still(found.heldout, self.frames), fit=still(found.fit, self.frames))


def still(images: torch.Tensor, frames: int) -> torch.Tensor:
    """``(N, C, H, W)`` images as ``(N, C, frames, H, W)`` clips that do not move."""
    return images.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


class StillClips(Dataset):  # type: ignore[type-arg]
    """A dataset of ``(image, label)`` items as ``(still clip, label)`` items."""

    def __init__(self, images: Dataset, frames: int) -> None:  # type: ignore[type-arg]
        self.images, self.frames = images, frames

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.images[index]
        return still(image.unsqueeze(0), self.frames)[0], label
