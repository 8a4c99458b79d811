"""Near-duplicate photos across splits, by a perceptual hash (DCT pHash), so no test photo hides in training.

A split by file is only honest if no photo of one split is a copy of a photo of another: a resized,
recompressed, brightened or mirrored copy has other bytes, so SHA-256 does not see it. :func:`photo_hash`
reduces an image to 255 bits that such copies keep: the signs, against their median, of the 255 lowest
non-constant frequencies of the 2-D DCT of its 64x64 grey thumbnail (Zauner's pHash, with a 16x16 block of
frequencies instead of 8x8: distinct photos lie further apart). Two photos are near duplicates when their
hashes differ in at most :data:`MAX_DISTANCE` bits, the images or one and the other's mirror image.

:func:`cross_split_pairs` compares every photo with every photo of the other splits, nearest first;
:func:`near_duplicates` keeps the pairs within the bound. ``scripts/photo_pool.py`` refuses to build a pool
that has one and prints the nearest pairs (``--check-duplicates``); docs/PHOTOS.md gives the figures that
set the bound. Copies cropped by more than about a tenth, rotated, or edited locally are not caught.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64
"""The grey thumbnail's side in pixels."""
LOW = 16
"""The DCT block kept: its ``LOW x LOW`` lowest frequencies, less the constant one (255 bits)."""
MAX_DISTANCE = 64
"""Bits (of 255) two hashes may differ in and still mark a near duplicate: a quarter. On the photo pool
(docs/PHOTOS.md) resized and recompressed copies lay at most 10 bits from their originals, copies 30% brighter
at most 52, and two distinct photos at least 94 apart."""


@dataclass(frozen=True)
class PhotoHash:
    """The hash of an image (``plain``) and of its mirror image (``mirrored``), 255 bits each."""

    plain: int
    mirrored: int

    def distance(self, other: PhotoHash) -> int:
        """Bits in which the two images differ, or either one and the other's mirror image, whichever is fewest."""
        return min(bin(a ^ b).count("1") for a, b in ((self.plain, other.plain), (self.mirrored, other.plain),
                                                      (self.plain, other.mirrored)))


@dataclass(frozen=True)
class Pair:
    """Two photos of different splits and the distance of their hashes."""

    first: str
    second: str
    distance: int


@functools.cache
def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` transforms the columns of ``x``."""
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    matrix = np.sqrt(2 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
    matrix[0] /= np.sqrt(2)
    return matrix


def _bits(grey: np.ndarray) -> int:
    dct = _dct_matrix(SIDE)
    low = (dct @ grey @ dct.T)[:LOW, :LOW].ravel()[1:]  # the constant (DC) term says only how bright
    value = 0
    for bit in low > np.median(low):
        value = (value << 1) | int(bit)
    return value


def photo_hash(image: Image.Image | str | Path) -> PhotoHash:
    """The perceptual hash of an image (a PIL image or a file) and of its mirror image.

    Args:
        image: any PIL mode (transparency is dropped, colour reduced to grey), or a path to an image file.
    """
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return photo_hash(opened.convert("RGB"))
    grey = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    return PhotoHash(_bits(grey), _bits(grey[:, ::-1]))


def cross_split_pairs(hashes: Mapping[str, PhotoHash], split_of: Mapping[str, str]) -> list[Pair]:
    """Every pair of photos in different splits, nearest first (ties by name).

    Args:
        hashes: photo name -> its hash.
        split_of: photo name -> its split; photos of one split are not compared with each other.
    """
    names = sorted(hashes)
    pairs = [Pair(a, b, hashes[a].distance(hashes[b])) for a, b in itertools.combinations(names, 2)
             if split_of[a] != split_of[b]]
    return sorted(pairs, key=lambda pair: (pair.distance, pair.first, pair.second))


def near_duplicates(hashes: Mapping[str, PhotoHash], split_of: Mapping[str, str],
                    max_distance: int = MAX_DISTANCE) -> list[Pair]:
    """The pairs of :func:`cross_split_pairs` within ``max_distance`` bits: photos one split must not share
    with another."""
    return [pair for pair in cross_split_pairs(hashes, split_of) if pair.distance <= max_distance]
