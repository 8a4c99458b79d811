"""Real photos split by photo, for fidelity studies: training crops and held-out crops never mix.

scikit-image (``skimage.data``) and scikit-learn ship about twenty photos and scans. Crops of
one photo are correlated, so an agreement figure is only honest on crops of photos that
training never saw: :data:`TRAIN_PHOTOS` and :data:`HELDOUT_PHOTOS` are disjoint.
:class:`PhotoCrops` is a Dataset of seeded random-resized, flipped crops (a fresh view per
index), usable as ``data=`` anywhere; :func:`heldout_crops` gives the fixed evaluation set with
each crop's photo, for bootstrap intervals over photos.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gn_convert.errors import DataError

TRAIN_PHOTOS: tuple[str, ...] = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
                                 "moon", "page", "grass", "brick", "horse", "clock", "sklearn_china")
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "rocket", "coins", "gravel", "text", "sklearn_flower",
                                   "cell")


def _chw(array: np.ndarray) -> torch.Tensor:
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).contiguous()


@functools.cache
def photo(name: str) -> torch.Tensor:
    """One photo as a (3, H, W) float tensor in [0, 1].

    Raises:
        DataError: scikit-image or scikit-learn is missing, or the photo is unknown.
    """
    try:
        if name.startswith("sklearn_"):
            from sklearn.datasets import load_sample_images

            index = {"sklearn_china": 0, "sklearn_flower": 1}[name]
            return _chw(load_sample_images().images[index])
        import skimage.data

        return _chw(getattr(skimage.data, name)())
    except (ImportError, KeyError, AttributeError) as err:
        raise DataError(f"photo {name!r} is not available ({err}); pip install scikit-image scikit-learn") from err


def _crop(image: torch.Tensor, size: int, rng: random.Random, scale: tuple[float, float], flip: bool) -> torch.Tensor:
    _, height, width = image.shape
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = F.interpolate(image[:, top:top + h, left:left + w][None], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0]
    return crop.flip(2) if flip and rng.random() < 0.5 else crop


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> ImageNet-normalised model inputs."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (images.clamp(0, 1) - mean) / std


class PhotoCrops(Dataset):
    """Random-resized, flipped crops of some photos: ``length`` items, item ``i`` seeded by ``(seed, i)``.

    Args:
        names: photo names (default :data:`TRAIN_PHOTOS`).
        length: the dataset's length (each epoch sees the same crops; use a large length and a
            different ``seed`` for fresh ones).
        size: crop side in pixels.
        scale: the range of each crop's area as a fraction of the photo.
        seed: seed of the crops.
    """

    def __init__(self, names: tuple[str, ...] = TRAIN_PHOTOS, length: int = 10_000, size: int = 224,
                 scale: tuple[float, float] = (0.08, 1.0), seed: int = 0) -> None:
        self.names, self.length, self.size, self.scale, self.seed = tuple(names), length, size, scale, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = random.Random(self.seed * 1_000_003 + index)
        name = self.names[rng.randrange(len(self.names))]
        return normalise(_crop(photo(name), self.size, rng, self.scale, flip=True)), -1


def heldout_crops(count: int = 300, size: int = 224, seed: int = 1234,
                  names: tuple[str, ...] = HELDOUT_PHOTOS) -> tuple[torch.Tensor, list[str]]:
    """The evaluation crops (no flips) of held-out photos, and each crop's photo.

    Returns:
        ``(count, 3, size, size)`` normalised crops and the photo name of each.
    """
    rng = random.Random(seed)
    crops, sources = [], []
    for _ in range(count):
        name = names[rng.randrange(len(names))]
        crops.append(normalise(_crop(photo(name), size, rng, (0.08, 1.0), flip=False)))
        sources.append(name)
    return torch.stack(crops), sources
