"""The segmentation networks of ``scripts/seg_batch_study.py``.

:class:`Lite0Segmenter` is EfficientNet-Lite0 with its real ImageNet weights (the ``realnet`` extra)
cut at stride 16 (the stem and blocks 0-10, 33 BatchNorm layers), with torchvision's LR-ASPP head
(``LRASPPHead``, as in ``lraspp_mobilenet_v3_large``; one new BatchNorm layer) on the stride-8
features of block 4 (40 channels) and the stride-16 features of block 10 (112 channels).
:class:`TorchvisionScores` makes a torchvision segmentation model return its score map alone.
"""

from __future__ import annotations

from typing import Any

import torch
from _study_models import efficientnet_lite0
from torch import nn
from torch.nn import functional as F
from torchvision.models.segmentation.lraspp import LRASPPHead

LOW_BLOCK, LAST_BLOCK = 4, 10  # Lite0's last block at stride 8 (40 channels) and at stride 16 (112 channels)


class Lite0Segmenter(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights) to stride 16, with torchvision's LR-ASPP head.

    Args:
        num_classes: output channels (one score map per class, at the input's size).
        inter_channels: channels of the head's stride-16 branch (default 128, as torchvision's).
        bn_momentum: momentum of every BatchNorm layer (default 0.1, PyTorch's). The Lite0 port keeps
            TensorFlow's 0.01, with which the running statistics would still be half ImageNet's after
            a 75-step fine-tune.
    """

    def __init__(self, num_classes: int, inter_channels: int = 128, bn_momentum: float = 0.1) -> None:
        super().__init__()
        lite0: Any = efficientnet_lite0()
        self.stem = nn.Sequential(lite0._conv_stem, lite0._bn0, lite0._swish)
        self.blocks = nn.ModuleList(lite0._blocks[:LAST_BLOCK + 1])
        low, high = (lite0._blocks[i]._project_conv.out_channels for i in (LOW_BLOCK, LAST_BLOCK))
        self.head = LRASPPHead(low, high, num_classes, inter_channels)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, classes, H, W) scores."""
        features, low = self.stem(images), images
        for index, block in enumerate(self.blocks):
            features = block(features)
            if index == LOW_BLOCK:
                low = features
        scores = self.head({"low": low, "high": features})
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)


class TorchvisionScores(nn.Module):
    """A torchvision segmentation model's ``out`` scores alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, classes, H, W)."""
        return self.model(images)["out"]
