"""Shared fixtures: real image data that ships in a package, and models whose BatchNorm
statistics are not the trivial (mean 0, var 1) of an untrained torchvision model."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from gn_convert.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine
from gn_convert.models import build_model

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    """scikit-learn's two sample photos (china, flower) as normalised (3, H, W) tensors."""
    from sklearn.datasets import load_sample_images

    photos = []
    for image in load_sample_images().images:
        t = torch.tensor(image).permute(2, 0, 1).float() / 255.0
        photos.append((t - IMAGENET_MEAN) / IMAGENET_STD)
    return tuple(photos)


def photo_crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` seeded random crops (resized to ``size``) of real photos, shape (count, 3, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    photos = _photos()
    crops = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        _, h, w = photo.shape
        side = int(torch.randint(min(h, w) // 4, min(h, w), (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
        crops.append(nn.functional.interpolate(crop, size=(size, size), mode="bilinear",
                                               align_corners=False, antialias=True))
    return torch.cat(crops)


def make_nontrivial(model: nn.Module, size: int = 64, seed: int = 0, batches: int = 2,
                    batch_size: int = 8) -> nn.Module:
    """Give ``model``'s BatchNorm layers seeded random affines and population statistics
    measured on real photo crops; returns it in eval mode."""
    randomize_batchnorm_affine(model, seed=seed)
    data = photo_crops(batches * batch_size, size, seed=seed)
    estimate_batchnorm_stats(model, data.split(batch_size))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _cached_nontrivial(name: str, size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make_nontrivial(build_model(name), size=size, seed=seed)


def nontrivial_model(name: str, size: int = 64, seed: int = 0) -> nn.Module:
    """A torchvision model (untrained weights) with non-trivial BatchNorm statistics.

    Cached per process; callers get the same object, so they must not modify it
    (``gn_convert.convert`` copies by default)."""
    return _cached_nontrivial(name, size, seed)


@pytest.fixture(scope="session")
def photos() -> tuple[torch.Tensor, ...]:
    """The two real photos, normalised."""
    return _photos()
