"""Video classification (torchvision's ``models.video``: R3D, MC3, R(2+1)D, S3D with BatchNorm3d).

A model maps a clip ``(N, 3, T, H, W)`` to logits ``(N, classes)``. Clips are 16 frames (how the
Kinetics-400 weights were trained and evaluated); the crop size comes from the weights.

Recovery from a folder of photos distils on clips made from each view: *still* (the view repeated over
the 16 frames: the photos' spatial statistics, no motion, so the temporal filters are fitted to zero
motion) or *moving* (:func:`moving`: a camera that pans and zooms across the view over the clip, the
simplest motion a real clip has; :attr:`Video.motion`). A Dataset of real clips ``(3, 16, H, W)``
(``data=``) is used as it is.
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
    motion = False
    """Whether recovery from photos makes moving clips (:func:`moving`) rather than still ones."""

    def recovery_views(self, found: Any) -> Any:
        """Image views as clips of :attr:`frames` frames (still, or moving: fresh motion at every fetch of a
        training view, seeded motion for the held-out and fit views); clips pass as they are."""
        if found.heldout.dim() == 5:
            return found
        make = moving if self.motion else still
        seeded = (torch.Generator().manual_seed(seed) for seed in (0, 1))
        return dataclasses.replace(found, train=Clips(found.train, self.frames, self.motion),
                                   heldout=make(found.heldout, self.frames, next(seeded)),
                                   fit=make(found.fit, self.frames, next(seeded)))


def still(images: torch.Tensor, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` images as ``(N, C, frames, H, W)`` clips that do not move."""
    return images.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


SCALE = 0.7
"""Side of a moving clip's window, as a share of the view's, at the middle of the clip."""
SHIFT = 0.3
"""Largest travel of the window over a clip along each axis, as a share of the view's half-side (normalised
coordinates): 15% of the view's side in 16 frames."""
ZOOM = 0.15
"""Largest change of the window's side over a clip (a factor 1 + ZOOM from the first frame to the last, or its
inverse). With :data:`SCALE` and :data:`SHIFT` the window stays inside the view: 0.7 x 1.15^0.5 + 0.15 < 1."""


def moving(images: torch.Tensor, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` images as ``(N, C, frames, H, W)`` clips of a camera that pans and zooms across each.

    Each clip's window (side :data:`SCALE` of the view's at mid-clip) travels at a constant velocity drawn
    up to :data:`SHIFT` along each axis and zooms by a factor drawn up to ``1 + ZOOM`` (in or out), centred on
    the view at mid-clip; frames are sampled bilinearly. ``generator`` seeds the motion (default: torch's).
    """
    from torch.nn import functional as F

    count, channels, height, width = images.shape
    draw = (lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1)  # noqa: E731
    travel, zoom = draw(count, 2) * SHIFT, 1 + draw(count) * ZOOM
    time = torch.linspace(-0.5, 0.5, frames)
    scale = SCALE * zoom[:, None] ** time[None, :]  # (N, T)
    theta = torch.zeros(count, frames, 2, 3)
    theta[..., 0, 0] = theta[..., 1, 1] = scale
    theta[..., :, 2] = travel[:, None, :] * time[None, :, None]
    grid = F.affine_grid(theta.reshape(-1, 2, 3), [count * frames, channels, height, width], align_corners=False)
    clips = F.grid_sample(images.float().repeat_interleave(frames, 0), grid.to(images.device), mode="bilinear",
                          padding_mode="border", align_corners=False)
    return clips.reshape(count, frames, channels, height, width).transpose(1, 2).contiguous().to(images.dtype)


class Clips(Dataset):  # type: ignore[type-arg]
    """A dataset of ``(image, label)`` items as ``(clip, label)`` items: still, or moving with fresh motion at
    every fetch."""

    def __init__(self, images: Dataset, frames: int, motion: bool = False) -> None:  # type: ignore[type-arg]
        self.images, self.frames, self.motion = images, frames, motion

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.images[index]
        return (moving if self.motion else still)(image.unsqueeze(0), self.frames)[0], label
