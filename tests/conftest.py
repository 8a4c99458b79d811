"""Shared fixtures: models whose BatchNorm statistics are not the trivial (mean 0, var 1) of an
untrained torchvision model, measured on real photos that ship in a package."""

from __future__ import annotations

import functools

import torch
from torch import nn

from gn_convert.models import build_model
from gn_convert.photos import nontrivial_batchnorm, photo_crops

__all__ = ["nontrivial_model", "photo_crops"]


@functools.lru_cache(maxsize=None)
def _cached_nontrivial(name: str, size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nontrivial_batchnorm(build_model(name), size=size, seed=seed)


def nontrivial_model(name: str, size: int = 64, seed: int = 0) -> nn.Module:
    """A torchvision model (untrained weights) with non-trivial BatchNorm statistics.

    Cached per process; callers get the same object, so they must not modify it
    (``gn_convert.convert`` copies by default)."""
    return _cached_nontrivial(name, size, seed)
