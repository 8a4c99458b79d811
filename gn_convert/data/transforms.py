"""Preprocessing: the transforms a torchvision model expects, for evaluation and training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def unnormalise(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised images ``(..., C, H, W)`` back to pixels in [0, 1], as float32 on the CPU."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (images.detach().cpu().float() * s + m).clamp(0, 1)
Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation and training transforms for one model.

    Attributes:
        eval: resize, centre crop, to tensor, normalise (deterministic).
        train: random-resized crop, optional horizontal flip, to tensor, normalise.
        crop_size: side of the square the model sees, in pixels.
        resize_size: side the shorter edge is resized to before the evaluation crop.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    eval: Transform
    train: Transform
    crop_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_transforms(
    weights: Any = None, input_size: int | None = None, *, flip: bool = True
) -> Preprocessing:
    """The preprocessing a torchvision model expects, for evaluation and for training.

    Args:
        weights: a torchvision weights enum member (``ResNet18_Weights.DEFAULT``) whose
            ``transforms()`` preset gives crop, resize, mean, std and interpolation; or None
            for ImageNet normalisation, resize 256, crop 224.
        input_size: crop side in pixels; overrides the preset's crop, and the resize becomes
            ``round(input_size / 0.875)``.
        flip: add a random horizontal flip to the training transform (default True; turn it
            off for data where left and right differ, such as digits or text).

    Returns:
        The :class:`Preprocessing` for the model.
    """
    crop, resize = 224, 256
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    interpolation = T.InterpolationMode.BILINEAR
    preset = weights.transforms() if weights is not None and hasattr(weights, "transforms") else None
    if preset is not None:
        crop = int(_first(getattr(preset, "crop_size", crop)))
        resize = int(_first(getattr(preset, "resize_size", resize)))
        mean = tuple(getattr(preset, "mean", mean))
        std = tuple(getattr(preset, "std", std))
        interpolation = getattr(preset, "interpolation", interpolation)
    if input_size is not None:
        crop, resize = int(input_size), int(round(input_size / 0.875))
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([T.Resize(resize, interpolation=interpolation, antialias=True),
                         T.CenterCrop(crop), *finish])
    augment = [T.RandomResizedCrop(crop, interpolation=interpolation, antialias=True)]
    if flip:
        augment.append(T.RandomHorizontalFlip())
    return Preprocessing(eval_tf, T.Compose([*augment, *finish]), crop, resize, mean, std)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value
