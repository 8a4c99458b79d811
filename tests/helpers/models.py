"""Small models and the shared ONNX exports of the test suite.

The fixtures in ``tests/conftest.py`` build these once per session; this module only holds
the builders, so that no test module imports another.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gn_convert
from gn_convert.load.names import build_model
from gn_convert.testing.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine
from gn_convert.testing.digits import predictions
from gn_convert.testing.photos import nontrivial_batchnorm, photo_crops

SIZE = 64
"""Input size of the ONNX test models."""
MODELS = ("resnet18", "mobilenet_v3_small")
"""The models every ONNX test runs on."""
DIGITS_SIZE = 16
DIGITS_EPOCHS = 3


def agreement(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    """Fraction of ``images`` on which ``a`` and ``b`` predict the same top-1 class."""
    return float((predictions(a, images) == predictions(b, images)).float().mean())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def tiny_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """A seeded 3-channel CNN with three BatchNorm layers (16 channels each)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


def make_tiny_teacher() -> nn.Module:
    """:func:`tiny_cnn` with random BatchNorm affines and statistics measured on noise, eval mode."""
    model = randomize_batchnorm_affine(tiny_cnn(), seed=1)
    gen = torch.Generator().manual_seed(2)
    estimate_batchnorm_stats(model, [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(2)])
    return model.eval()


def make_nontrivial(name: str, size: int = 64, seed: int = 0) -> nn.Module:
    """A torchvision model (untrained weights) with BatchNorm statistics measured on photo crops."""
    torch.manual_seed(seed)
    return nontrivial_batchnorm(build_model(name), size=size, seed=seed)


class Models:
    """Session cache of models with non-trivial BatchNorm statistics (callers must not modify them)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], nn.Module] = {}

    def __call__(self, name: str, size: int = 64, seed: int = 0) -> nn.Module:
        key = (name, size, seed)
        if key not in self._cache:
            self._cache[key] = make_nontrivial(name, size, seed)
        return self._cache[key]


class Exports:
    """The converted test models and their ONNX exports, made once per session in ``folder``.

    Callers must not modify the returned models or files.
    """

    SIZE = SIZE
    MODELS = MODELS

    def __init__(self, folder: Path, models: Models) -> None:
        self.folder, self._models = folder, models
        self._converted: dict[str, nn.Module] = {}
        self._exported: dict[tuple[str, str], object] = {}
        self._crops: dict[tuple[int, int], torch.Tensor] = {}

    def teacher(self, name: str) -> nn.Module:
        """The BatchNorm model ``name`` was converted from."""
        return self._models(name, SIZE)

    def converted(self, name: str) -> nn.Module:
        """``name`` with non-trivial BatchNorm statistics, converted to GroupNorm (G=32), eval mode."""
        if name not in self._converted:
            self._converted[name] = gn_convert.convert(self.teacher(name), 32).eval()
        return self._converted[name]

    def exported(self, name: str, target: str = "function"):
        """The converted model exported once; other targets are lowered from the function file."""
        from gn_convert.onnx import export_onnx, lower_onnx

        key = (name, target)
        if key not in self._exported:
            if target == "function":
                report = export_onnx(self.converted(name), self.folder / f"{name}.onnx",
                                     input_shape=(1, 3, SIZE, SIZE))
            else:
                report = lower_onnx(self.exported(name).path, self.folder / f"{name}.{target}.onnx", target)
            self._exported[key] = report
        return self._exported[key]

    def crops(self, count: int = 7, seed: int = 1) -> torch.Tensor:
        """Real photo crops at the test size (a different seed than the BN statistics)."""
        key = (count, seed)
        if key not in self._crops:
            self._crops[key] = photo_crops(count, SIZE, seed=seed)
        return self._crops[key]
