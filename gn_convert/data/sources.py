"""Data sources for calibration and distillation.

Everything downstream sees one item format: ``(image, label)``, where ``image`` is a float
tensor (C, H, W) already preprocessed for the model and ``label`` is an int class index, or
``-1`` when the source has no labels. :func:`load_data` turns any supported source into a
:class:`DataSplit` (a training part and a seeded held-out part):

- a folder of class subfolders (``root/<class>/<image>``, as ``torchvision.datasets.ImageFolder``
  reads it): labelled;
- a plain folder of images: unlabelled;
- a ``torch.utils.data.Dataset`` whose items are a tensor or ``(tensor, label, ...)``, or a
  ``DataLoader`` over one (its dataset is used; batching is ours, so that order is seeded).

Folder images are preprocessed with the model's own torchvision transforms
(:func:`model_transforms`): resize and centre crop for evaluation and calibration,
random-resized crop and horizontal flip for training. Files that cannot be read are skipped,
counted and logged, never fatal; an empty or missing folder raises :class:`DataError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from gn_convert.data.folders import FolderScan, ImageFiles, scan_folder
from gn_convert.data.items import UNLABELLED, LabelledItems, as_item
from gn_convert.data.transforms import Transform, model_transforms
from gn_convert.errors import DataError


@dataclass
class DataSplit:
    """A training part and a held-out part of one data source.

    Attributes:
        train: items ``(image, label)`` for calibration or distillation.
        heldout: items for evaluation, disjoint from ``train``; None when no split was asked.
        labelled: whether items carry real labels.
        classes: class names when known (folders), else None.
        skipped: unreadable files found while scanning (folders only).
        description: one line saying where the data came from.
    """

    train: Dataset
    heldout: Dataset | None
    labelled: bool
    classes: list[str] | None = None
    skipped: list[Path] = field(default_factory=list)
    description: str = ""


def split_indices(n: int, holdout: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into (train, held-out) index lists.

    Args:
        n: number of items.
        holdout: a fraction in [0, 1) or an absolute count of held-out items.
        seed: seed of the permutation; the same seed always gives the same split.

    Raises:
        DataError: the split would leave no training item.
    """
    count = int(holdout) if isinstance(holdout, int) or holdout >= 1 else int(round(n * holdout))
    if holdout and count == 0:
        count = 1
    if count >= n:
        raise DataError(f"holding out {count} of {n} items leaves nothing to train on; lower holdout or add data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[count:]), sorted(perm[:count])


def load_data(
    data: Any,
    *,
    weights: Any = None,
    input_size: int | None = None,
    holdout: float | int = 0.1,
    seed: int = 0,
    augment: bool = True,
    flip: bool = True,
    eval_data: Any = None,
    verify: bool = True,
) -> DataSplit:
    """Turn a folder path, Dataset or DataLoader into a seeded (train, held-out) split.

    Args:
        data: a folder (class subfolders = labelled, plain images = unlabelled), a Dataset
            of tensors or ``(tensor, label)`` pairs, a DataLoader (its dataset is used), or a
            ready :class:`DataSplit` (returned as it is, with ``eval_data`` applied).
        weights: torchvision weights enum of the model, for its preprocessing (folders only).
        input_size: crop side in pixels, overriding the weights' preset (folders only).
        holdout: fraction (or count) of ``data`` kept aside for evaluation; 0 for none.
            Ignored when ``eval_data`` is given.
        seed: seed of the split.
        augment: use the training transform (random-resized crop, flip) on the training part
            of a folder; False gives the deterministic evaluation transform (calibration).
        flip: whether the training transform flips horizontally.
        eval_data: a separate evaluation source (same kinds as ``data``); then all of
            ``data`` is used for training.
        verify: check image headers while scanning folders (see :func:`scan_folder`).

    Returns:
        The :class:`DataSplit`.

    Raises:
        DataError: the source is missing, empty, unreadable or of an unsupported kind.
    """
    prep = model_transforms(weights, input_size, flip=flip)
    if isinstance(data, DataSplit):
        heldout = LabelledItems(data.heldout) if data.heldout is not None else None
        split = DataSplit(LabelledItems(data.train), heldout, data.labelled, data.classes, data.skipped,
                          data.description)
        data = None
    elif isinstance(data, DataLoader):
        data = data.dataset
    if data is None:
        pass
    elif isinstance(data, (str, os.PathLike)):
        scan = scan_folder(data, verify=verify)
        train_idx, held_idx = (list(range(len(scan.files))), []) if eval_data is not None \
            else split_indices(len(scan.files), holdout, seed)
        train_tf = prep.train if augment else prep.eval
        train_files = _files_dataset(scan, train_idx, train_tf)
        if train_files is None:
            raise DataError(f"folder {scan.root}: no image is left for training after holding out {holdout}")
        held_files = _files_dataset(scan, held_idx, prep.eval) if held_idx else None
        split = DataSplit(train_files, held_files, scan.labels is not None, scan.classes, scan.skipped,
                          f"folder {scan.root} ({len(scan.files)} images)")
    elif isinstance(data, Dataset):
        items = LabelledItems(data)
        if _length(items) == 0:
            raise DataError("the dataset is empty; pass a dataset with at least one item")
        labelled = as_item(items.dataset[0])[1] != UNLABELLED
        if eval_data is None and holdout:
            train_idx, held_idx = split_indices(_length(items), holdout, seed)
            split = DataSplit(Subset(items, train_idx), Subset(items, held_idx), labelled)
        else:
            split = DataSplit(items, None, labelled)
        split.description = f"{type(data).__name__} ({_length(items)} items)"
    else:
        raise DataError(f"cannot use a {type(data).__name__} as data; pass a folder path, a Dataset or a DataLoader")
    if eval_data is not None:
        split.heldout = load_data(eval_data, weights=weights, input_size=input_size, holdout=0,
                                  augment=False, verify=verify).train
    return split


def _files_dataset(scan: FolderScan, indices: list[int], transform: Transform) -> ImageFiles | None:
    if not indices:
        return None
    labels = [scan.labels[i] for i in indices] if scan.labels is not None else None
    return ImageFiles([scan.files[i] for i in indices], labels, transform)


def _length(dataset: Dataset) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError("the dataset has no length (an IterableDataset?); pass a map-style Dataset") from exc
