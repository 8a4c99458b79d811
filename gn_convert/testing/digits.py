"""A small real BatchNorm teacher: torchvision's ResNet-18 trained on scikit-learn's digits.

Studies (``scripts/fidelity.py``, ``scripts/batch_size_study.py``) and tests need a teacher
whose BatchNorm statistics and function are learned from real data, without any download.
:func:`train_digits_teacher` trains one in well under a minute on one CPU core: the 1,797
8x8 digits of scikit-learn, upscaled to 32x32 and repeated to 3 channels so that the model
is the unmodified torchvision ``resnet18(num_classes=10)`` (a checkpoint of it loads with
``gn_convert.load_model("resnet18", PATH, num_classes=10)``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gn_convert.data.sources import DataSplit, split_indices
from gn_convert.errors import DataError
from gn_convert.load.names import build_model
from gn_convert.modes import eval_mode

log = logging.getLogger(__name__)


def digits(size: int = 32, heldout: int = 397, seed: int = 0, channels: int = 1) -> DataSplit:
    """scikit-learn's 1,797 labelled 8x8 digits, upscaled and standardised, split seeded.

    Real data that ships inside a package, for studies and tests: values standardised with
    the training part's mean and std, bilinear upscaling to ``size``. Both parts are
    ``TensorDataset(images, labels)``.

    Args:
        size: output side in pixels.
        heldout: number of held-out digits (the rest train).
        seed: seed of the split.
        channels: 1 (default), or 3 to repeat the grey channel for RGB models.

    Raises:
        DataError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("digits need scikit-learn; pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 align_corners=False)
    train_idx, held_idx = split_indices(len(labels), heldout, seed)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).repeat(1, channels, 1, 1).contiguous()
    tensors = torch.utils.data.TensorDataset
    return DataSplit(tensors(images[train_idx], labels[train_idx]),
                     tensors(images[held_idx], labels[held_idx]), True,
                     [str(k) for k in range(10)], [],
                     f"sklearn digits {size}x{size} ({len(train_idx)} train, {len(held_idx)} held out)")


@dataclass
class DigitsTeacher:
    """A trained digits teacher and its data.

    Attributes:
        model: the ResNet-18 with BatchNorm, in eval mode.
        data: the digits split it was trained on (``train``) and evaluated on (``heldout``).
        accuracy: top-1 accuracy on the held-out digits, in [0, 1].
        seconds: training wall time.
    """

    model: nn.Module
    data: DataSplit
    accuracy: float
    seconds: float


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Top-1 class of each image under ``model`` in eval mode (its mode is restored)."""
    with eval_mode(model):
        return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])


def fit_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                   batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Train ``model`` in place on (images, labels): AdamW (weight decay 1e-4), cosine decay,
    cross-entropy, seeded batch order, no augmentation; left in eval mode and returned."""
    steps = epochs * (len(labels) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for k in range(len(labels) // batch_size):
            idx = order[k * batch_size:(k + 1) * batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train_digits_teacher(
    epochs: int = 6,
    *,
    size: int = 32,
    heldout: int = 397,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> DigitsTeacher:
    """Train torchvision's ResNet-18 (with BatchNorm) on scikit-learn's digits.

    A plain recipe: AdamW (weight decay 1e-4) with cosine decay, cross-entropy, no
    augmentation; seeded, so the same arguments give the same teacher on the same machine.
    With the defaults: about 96-98% held-out accuracy.

    Args:
        epochs: passes over the 1,400 training digits (default 6).
        size: image side in pixels (default 32).
        heldout: digits kept aside for evaluation (default 397).
        batch_size: training batch (default 32).
        lr: peak learning rate of AdamW (default 1e-3).
        seed: seed of the split, the init and the batch order.

    Returns:
        The :class:`DigitsTeacher`.
    """
    data = digits(size=size, heldout=heldout, seed=seed, channels=3)
    images, labels = data.train.tensors  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=10)
    start = time.perf_counter()
    fit_classifier(model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    seconds = time.perf_counter() - start
    held_images, held_labels = data.heldout.tensors  # type: ignore[union-attr]
    accuracy = float((predictions(model, held_images) == held_labels).float().mean())
    log.info("digits teacher: %d epochs, %.1f s, held-out accuracy %.3f", epochs, seconds, accuracy)
    return DigitsTeacher(model, data, accuracy, seconds)
