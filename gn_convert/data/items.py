"""The one item format of every data source: ``(image tensor, int label)``, label -1 when absent."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch.utils.data import Dataset

from gn_convert.errors import DataError

UNLABELLED = -1


class LabelledItems(Dataset):
    """A view of any dataset whose items are ``(tensor, int label)``, label -1 when absent.

    Accepts items that are a tensor, or a tuple/list whose first element is the image and
    whose optional second element is an int (or 0-d integer tensor) label.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return as_item(self.dataset[index])


def as_item(item: Any) -> tuple[torch.Tensor, int]:
    """Normalise one dataset item to ``(image tensor, label or -1)``."""
    label: Any = UNLABELLED
    if isinstance(item, (tuple, list)):
        if not item:
            raise DataError("a dataset item is an empty tuple; items must be an image tensor or (image, label)")
        if len(item) > 1:
            label = item[1]
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise DataError(f"a dataset item is a {type(item).__name__}, not a tensor; "
                        "give the dataset a transform that returns tensors")
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = int(label.item())
    elif isinstance(label, numbers.Integral) and not isinstance(label, bool):  # int, numpy.int64, ...
        label = int(label)
    else:
        label = UNLABELLED
    return item, label


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a collated batch into images and labels (None when there are no valid labels).

    Args:
        batch: a tensor, or a tuple/list ``(images, labels, ...)`` as a DataLoader yields.

    Returns:
        ``(images, labels)``; labels is an int64 tensor with -1 for unlabelled items.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 else None
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.dim() == 1:
            return batch[0], labels if bool((labels >= 0).any()) else None
        return batch[0], None
    raise DataError(f"a batch is a {type(batch).__name__}; expected a tensor or (images, labels)")
