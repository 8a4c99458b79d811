"""A labelled segmentation task built from real photographs: shapes with exact masks drawn onto photos.

Each image is a random square crop of one photo (the background); two to four shapes (an
ellipse, a rotated rectangle or a triangle) are cut out of crops of *other* photos of the same
set and pasted onto it through their masks. A shape's class depends only on its outline, and
its edge only on the change of texture, so the task needs both local texture and shape:

======  ============  ==============================================================
label   class         drawn with
======  ============  ==============================================================
0       background    the background photo's pixels
1       ellipse       ``skimage.draw.ellipse`` (circles included), any rotation
2       rectangle     ``skimage.draw.polygon`` of a rotated rectangle
3       triangle      ``skimage.draw.polygon`` of a triangle with angles of 30-90 degrees
======  ============  ==============================================================

The masks are exact: a pixel is labelled with a shape's class exactly when ``skimage.draw``
returns it for that shape, and its colour is then the fill photo's. Every shape lies inside
its circumscribed circle, and those circles neither overlap nor leave the image, so no shape
hides or clips another: each class's pixel count is the sum of its shapes' drawn areas
(:attr:`DrawnShape.area`). Train and evaluation sets are built from disjoint lists of photos
by the caller (:func:`bundled_photos`, :func:`folder_photos`). :func:`confusion` and
:func:`mean_iou` score a prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gn_convert.errors import DataError

CLASSES: tuple[str, ...] = ("background", "ellipse", "rectangle", "triangle")


@dataclass(frozen=True)
class DrawnShape:
    """One shape of one image.

    Attributes:
        label: its class (index into :data:`CLASSES`, 1 or more).
        centre: (row, column) of its circumscribed circle, in pixels.
        radius: that circle's radius, in pixels (the shape lies inside it).
        area: pixels ``skimage.draw`` returned for it (all labelled ``label``).
        geometric_area: its area as a continuous figure, in square pixels.
        fill: index of the photo its pixels come from.
    """

    label: int
    centre: tuple[float, float]
    radius: float
    area: int
    geometric_area: float
    fill: int


@dataclass
class ShapeSet:
    """Images, their label maps and the shapes drawn on each.

    Attributes:
        images: (N, size, size, 3) uint8 RGB.
        labels: (N, size, size) uint8 class per pixel.
        shapes: the shapes of each image, in drawing order.
        backgrounds: the index of each image's background photo.
    """

    images: np.ndarray
    labels: np.ndarray
    shapes: list[tuple[DrawnShape, ...]]
    backgrounds: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, size, size) float images in [0, 1] and (N, size, size) int64 labels."""
        images = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        return images, torch.from_numpy(self.labels).long()

    def class_pixels(self) -> np.ndarray:
        """Pixels of each class over the whole set, shape (len(CLASSES),)."""
        return np.bincount(self.labels.ravel(), minlength=len(CLASSES))


def bundled_photos(names: Sequence[str]) -> list[np.ndarray]:
    """Photos that ship with scikit-image / scikit-learn (see :mod:`gn_convert.testing.photo_sets`), as uint8 RGB.

    Raises:
        DataError: scikit-image or scikit-learn is missing, or a name is unknown.
    """
    from gn_convert.testing.photo_sets import photo

    return [(photo(name).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8) for name in names]


def folder_photos(folder: str | Path) -> list[np.ndarray]:
    """Every JPEG or PNG in ``folder`` (sorted by name), as uint8 RGB.

    Raises:
        DataError: the folder holds no such image.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise DataError(f"no JPEG or PNG photos in {folder}")
    photos = []
    for path in files:
        with Image.open(path) as image:
            photos.append(np.asarray(image.convert("RGB")))
    return photos


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator,
                scale: tuple[float, float] = (0.3, 1.0)) -> np.ndarray:
    """A random square crop of ``photo`` (side ``scale`` times its shorter side), resized to ``size``."""
    height, width = photo.shape[:2]
    side = max(1, int(round(min(height, width) * rng.uniform(*scale))))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR,
                                         box=(left, top, left + side, top + side))
    return np.asarray(crop)


def _outline(label: int, centre: tuple[float, float], radius: float, rng: np.random.Generator,
             size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixels (rows, columns) and geometric area of one shape of class ``label`` inside the given circle."""
    from skimage import draw

    row, col = centre
    turn = rng.uniform(0.0, math.pi)
    if label == 1:  # ellipse: semi-axes radius and 0.55-1 of it, any rotation
        minor = radius * rng.uniform(0.55, 1.0)
        rows, cols = draw.ellipse(row, col, radius, minor, shape=(size, size), rotation=turn)
        return rows, cols, math.pi * radius * minor
    if label == 2:  # rectangle: half-diagonal radius, aspect from the diagonal's angle
        half = rng.uniform(math.radians(25), math.radians(65))
        corners = [turn + half, turn + math.pi - half, turn + math.pi + half, turn - half]
        area = 2.0 * radius * radius * math.sin(2.0 * half)
    elif label == 3:  # triangle: vertices on the circle, each inner angle 30-90 degrees
        while True:
            arcs = rng.uniform(math.radians(60), math.radians(180), size=2)
            if math.radians(60) <= 2 * math.pi - arcs.sum() <= math.radians(180):
                break
        corners = [turn, turn + arcs[0], turn + arcs[0] + arcs[1]]
        area = 0.5 * radius * radius * sum(math.sin(a) for a in (*arcs, 2 * math.pi - arcs.sum()))
    else:
        raise ValueError(f"unknown shape label {label}")
    rows, cols = draw.polygon([row - radius * math.sin(a) for a in corners],
                              [col + radius * math.cos(a) for a in corners], shape=(size, size))
    return rows, cols, area


def draw_sample(background: int, photos: Sequence[np.ndarray], size: int, rng: np.random.Generator,
                shapes: tuple[int, int] = (2, 4), radius: tuple[float, float] = (0.12, 0.26),
                gap: float = 2.0) -> tuple[np.ndarray, np.ndarray, tuple[DrawnShape, ...]]:
    """One image: a crop of ``photos[background]`` with shapes cut from crops of the other photos.

    Args:
        background: index of the background photo.
        photos: the photo set (at least two photos).
        size: image side in pixels.
        rng: the random generator (the only source of randomness).
        shapes: least and most shapes; fewer are drawn if no free place is found in 200 tries.
        radius: range of a shape's circumscribed radius, as a fraction of ``size``.
        gap: least distance in pixels between two shapes' circles.

    Returns:
        (image (size, size, 3) uint8, labels (size, size) uint8, the drawn shapes).
    """
    if len(photos) < 2:
        raise DataError("drawing shapes needs at least two photos (a background and a fill)")
    image = random_crop(photos[background], size, rng).copy()
    labels = np.zeros((size, size), np.uint8)
    drawn: list[DrawnShape] = []
    wanted = int(rng.integers(shapes[0], shapes[1] + 1))
    for _ in range(200):
        if len(drawn) == wanted:
            break
        r = rng.uniform(*radius) * size
        centre = (rng.uniform(r + 1.0, size - 2.0 - r), rng.uniform(r + 1.0, size - 2.0 - r))
        if any(math.dist(centre, s.centre) < r + s.radius + gap for s in drawn):
            continue
        label = int(rng.integers(1, len(CLASSES)))
        rows, cols, area = _outline(label, centre, r, rng, size)
        fill = int(rng.choice([i for i in range(len(photos)) if i != background]))
        image[rows, cols] = random_crop(photos[fill], size, rng)[rows, cols]
        labels[rows, cols] = label
        drawn.append(DrawnShape(label, centre, r, len(rows), area, fill))
    return image, labels, tuple(drawn)


def build_shape_set(photos: Sequence[np.ndarray], count: int, size: int = 128, seed: int = 0,
                    shapes: tuple[int, int] = (2, 4)) -> ShapeSet:
    """``count`` images drawn from ``photos``; image ``i`` depends only on ``(seed, i)`` and the photos.

    Backgrounds take the photos in turn (image ``i`` on photo ``i % len(photos)``), so every photo
    is used about equally; fills are drawn from the other photos.

    Args:
        photos: uint8 RGB photos (for evaluation, photos that training never uses).
        count: images.
        size: image side in pixels (default 128).
        seed: seed of the set.
        shapes: least and most shapes per image.
    """
    images = np.empty((count, size, size, 3), np.uint8)
    labels = np.empty((count, size, size), np.uint8)
    drawn, backgrounds = [], []
    for i in range(count):
        background = i % len(photos)
        images[i], labels[i], shapes_i = draw_sample(background, photos, size, np.random.default_rng([seed, i]),
                                                     shapes)
        drawn.append(shapes_i)
        backgrounds.append(background)
    return ShapeSet(images, labels, drawn, backgrounds)


def confusion(predicted: torch.Tensor, target: torch.Tensor, classes: int = len(CLASSES)) -> torch.Tensor:
    """(classes, classes) pixel counts: row = true class, column = predicted class."""
    index = target.reshape(-1).long() * classes + predicted.reshape(-1).long()
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def mean_iou(matrix: torch.Tensor) -> float:
    """Mean over classes of intersection over union, from a :func:`confusion` matrix (in [0, 1]).

    A class absent from both the prediction and the target is left out of the mean.
    """
    matrix = matrix.double()
    hits = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - hits
    present = union > 0
    return float((hits[present] / union[present]).mean())


def pixel_accuracy(matrix: torch.Tensor) -> float:
    """Fraction of pixels labelled right, from a :func:`confusion` matrix."""
    return float(matrix.diagonal().sum()) / float(matrix.sum())
