"""Semantic segmentation (torchvision's ``models.segmentation``: DeepLabV3, FCN, LR-ASPP).

A model maps ``(N, 3, H, W)`` to a dict of per-pixel logits ``(N, classes, H, W)``: ``out``, and
``aux`` where the model has an auxiliary head. The export is a module returning those as a tuple,
named ``out`` and ``aux`` in the ONNX file; parity compares each, per pixel. Built without
weights, the backbone is not downloaded either (``weights_backbone=None``) unless asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from gn_convert.tasks.base import DictOutputs, Task


class Segmentation(Task):
    """Per-pixel classification: ``out`` (and ``aux``) logits of the input's size."""

    name = "segmentation"
    module = tvm.segmentation
    body = "two-level"

    def build(self, name: str, **kwargs: Any) -> nn.Module:
        """torchvision's builder; without weights, without backbone weights too (unless given)."""
        if kwargs.get("weights") is None:
            kwargs.setdefault("weights_backbone", None)
        return super().build(name, **kwargs)

    def input_size(self, weights: Any) -> tuple[int, ...]:
        """``(S, S)`` with S the weights' resize size (520 for torchvision's VOC-on-COCO weights)."""
        resize = weights.transforms().resize_size
        side = int(resize[0] if isinstance(resize, (list, tuple)) else resize)
        return side, side

    def output_names(self, model: nn.Module) -> tuple[str, ...]:
        """``out``, and ``aux`` when the model has an auxiliary classifier."""
        return ("out", "aux") if getattr(model, "aux_classifier", None) is not None else ("out",)

    def exportable(self, model: nn.Module) -> nn.Module:
        return DictOutputs(model, self.output_names(model))

    def labels(self, categories: list[str] | None) -> list[str] | None:
        return None  # the classes lie along the channel axis of a per-pixel output, not a classifier's last axis

    def head(self, model: nn.Module) -> nn.Module:
        """The per-pixel logits ``out`` (recovery distils KL per pixel and scores per-pixel agreement and the
        mean IoU of the student's class map with the teacher's)."""
        return Output(model, "out")


class Output(nn.Module):
    """One entry of ``model``'s dict output."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)[self.key]
        return out
