"""Real photos that ship inside a package, as model inputs for tests, sweeps and studies.

No image data set can be downloaded here, but scikit-learn ships two photographs
(``load_sample_images``: a temple in China and a flower). :func:`photo_crops` cuts seeded
random crops of them, resized and normalised like ImageNet inputs, and
:func:`nontrivial_batchnorm` uses such crops to give an untrained model's BatchNorm layers
real population statistics, so that a conversion has something to reproduce.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gn_convert.errors import GnConvertError
from gn_convert.testing.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[torch.Tensor, ...]:
    """scikit-learn's two sample photos as ImageNet-normalised (3, H, W) float tensors.

    Raises:
        GnConvertError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise GnConvertError("the sample photos need scikit-learn; pip install scikit-learn") from exc
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    photos = []
    for image in load_sample_images().images:
        tensor = torch.tensor(image).permute(2, 0, 1).float() / 255.0
        photos.append((tensor - mean) / std)
    return tuple(photos)


def photo_crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Seeded random square crops of the sample photos, resized to ``size``.

    Args:
        count: number of crops.
        size: side of each crop after resizing, in pixels.
        seed: the same seed always gives the same crops.

    Returns:
        A (count, 3, size, size) float tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    photos = sample_photos()

    def draw(high: int, low: int = 0) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    crops = []
    for _ in range(count):
        photo = photos[draw(len(photos))]
        _, height, width = photo.shape
        side = draw(min(height, width), min(height, width) // 4)
        top, left = draw(height - side + 1), draw(width - side + 1)
        crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
        crops.append(nn.functional.interpolate(crop, size=(size, size), mode="bilinear",
                                               align_corners=False, antialias=True))
    return torch.cat(crops)


def nontrivial_batchnorm(model: nn.Module, size: int = 64, seed: int = 0, batches: int = 2,
                         batch_size: int = 8) -> nn.Module:
    """Give a model's BatchNorm layers seeded random affines and statistics measured on photos.

    Args:
        model: the model, modified in place.
        size: side of the photo crops used to measure the statistics.
        seed: seed of the affines and of the crops.
        batches: batches of crops to average the statistics over.
        batch_size: crops per batch.

    Returns:
        ``model``, in eval mode.
    """
    randomize_batchnorm_affine(model, seed=seed)
    data = photo_crops(batches * batch_size, size, seed=seed)
    estimate_batchnorm_stats(model, data.split(batch_size))
    return model.eval()
