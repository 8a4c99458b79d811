"""Converted test models and their ONNX exports, built once per test process.

Exports are the expensive part of the ONNX tests (seconds each), so test modules share them
through these cached functions. Models are converted from ``conftest.nontrivial_model`` at
64x64 input; files live in one temporary folder removed at exit. Callers must not modify the
returned models or files.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

import gn_convert
from conftest import nontrivial_model, photo_crops
from gn_convert.onnx import ExportReport, export_onnx, lower_onnx

SIZE = 64
MODELS = ("resnet18", "mobilenet_v3_small")
"""The models every ONNX test runs on."""


@functools.lru_cache(maxsize=1)
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="gn-convert-onnx-tests-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.lru_cache(maxsize=None)
def converted(name: str) -> nn.Module:
    """``name`` with non-trivial BatchNorm statistics, converted to GroupNorm (G=32), eval mode."""
    return gn_convert.convert(nontrivial_model(name, SIZE), 32).eval()


@functools.lru_cache(maxsize=None)
def exported(name: str, target: str = "function") -> ExportReport:
    """The converted model exported once; other targets are lowered from the function file."""
    if target == "function":
        return export_onnx(converted(name), _folder() / f"{name}.onnx", input_shape=(1, 3, SIZE, SIZE))
    return lower_onnx(exported(name).path, _folder() / f"{name}.{target}.onnx", target)


@functools.lru_cache(maxsize=None)
def crops(count: int = 7, seed: int = 1) -> torch.Tensor:
    """Real photo crops at the test size (a different seed than the BN statistics)."""
    return photo_crops(count, SIZE, seed=seed)
