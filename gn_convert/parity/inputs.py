"""The inputs a parity check feeds both models: seeded random, hard cases, real images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gn_convert.errors import ParityError

LARGE_MEAN = 1000.0
LARGE_SCALE = 1000.0
RANDOM_SETS = ("random", "large-mean", "large-scale")


@dataclass
class InputSet:
    """One named batch of inputs.

    Attributes:
        name: ``random``, ``large-mean``, ``large-scale`` or ``images``.
        data: float32 tensor (B, C, ...).
        hard: whether the set is a numerically hard case (looser ``max_rel``).
    """

    name: str
    data: torch.Tensor
    hard: bool = False


def random_sets(shape: tuple[int, ...], batch: int, seed: int = 0) -> list[InputSet]:
    """Seeded random inputs at ``(batch, *shape[1:])``: N(0, 1), N(1000, 1) and N(0, 1000^2).

    The large-mean set is the case that breaks single-pass variance (E[x^2] - E[x]^2); the
    large-scale set checks overflow-free statistics at large magnitude.
    """
    gen = torch.Generator().manual_seed(seed)
    full = (batch, *shape[1:])
    return [
        InputSet("random", torch.randn(full, generator=gen)),
        InputSet("large-mean", torch.randn(full, generator=gen) + LARGE_MEAN, hard=True),
        InputSet("large-scale", torch.randn(full, generator=gen) * LARGE_SCALE, hard=True),
    ]


def image_set(folder: str | Path, shape: tuple[int, ...], batch: int) -> InputSet:
    """Up to ``batch`` images of a folder, resized, centre-cropped and ImageNet-normalised.

    Raises:
        ParityError: the folder holds no readable image, or the input is not (N, 3, H, W).
    """
    from gn_convert.data.sources import DataError, ImageFiles, model_transforms, scan_folder

    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise ParityError(f"--images needs a square RGB input (N, 3, S, S); the model takes {shape}")
    try:
        scan = scan_folder(folder)
        files = ImageFiles(scan.files[:batch], None, model_transforms(input_size=shape[2]).eval)
        images = torch.stack([files[i][0] for i in range(len(files))])
    except DataError as exc:
        raise ParityError(str(exc)) from None
    return InputSet("images", images)
