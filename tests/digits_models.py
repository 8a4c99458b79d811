"""Small real teachers and tiny models for the calibration and distillation tests, built once
per test process (callers must not modify the returned models).

- :func:`digits_teacher`: torchvision's ResNet-18 with BatchNorm trained on scikit-learn's
  digits at 16x16 (smaller and faster than the 32x32 study in ``scripts/fidelity.py``; the
  orders the tests assert hold there too).
- :func:`tiny_teacher`: a seeded 3-layer CNN with BatchNorm and non-trivial statistics, for
  tests of exactness (resume, DDP, accumulation) where quality does not matter.
- :func:`agreement`: top-1 agreement of two models on images.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gn_convert.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine
from gn_convert.digits_teacher import DigitsTeacher, predictions, train_digits_teacher

DIGITS_SIZE = 16
DIGITS_EPOCHS = 3


@functools.lru_cache(maxsize=1)
def digits_teacher() -> DigitsTeacher:
    """The 16x16 digits ResNet-18 teacher (about 98% held-out accuracy)."""
    return train_digits_teacher(DIGITS_EPOCHS, size=DIGITS_SIZE)


def agreement(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    """Fraction of ``images`` on which ``a`` and ``b`` predict the same top-1 class."""
    return float((predictions(a, images) == predictions(b, images)).float().mean())


def tiny_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """A seeded 3-channel CNN with three BatchNorm layers (16 channels each)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


@functools.lru_cache(maxsize=1)
def tiny_teacher() -> nn.Module:
    """:func:`tiny_cnn` with random BatchNorm affines and statistics measured on noise."""
    model = randomize_batchnorm_affine(tiny_cnn(), seed=1)
    gen = torch.Generator().manual_seed(2)
    estimate_batchnorm_stats(model, [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(2)])
    return model.eval()
