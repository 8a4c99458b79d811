"""Random images for smoke tests: never a source of fidelity figures."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """Random normal images with cyclic labels: for smoke tests only, never for fidelity.

    Args:
        count: number of items.
        shape: (C, H, W) of each image.
        num_classes: labels are ``index % num_classes``.
        seed: item ``i`` is drawn from a generator seeded with ``seed * 1_000_003 + i``.
    """

    def __init__(self, count: int = 64, shape: tuple[int, int, int] = (3, 32, 32),
                 num_classes: int = 10, seed: int = 0) -> None:
        self.count, self.shape, self.num_classes, self.seed = count, tuple(shape), num_classes, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.shape, generator=gen), index % self.num_classes
