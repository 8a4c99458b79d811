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
:class:`SyntheticImages` (random tensors) exists only for smoke tests, and :func:`digits`
gives scikit-learn's 8x8 digits, real labelled data that ships inside a package.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from .errors import GnConvertError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
UNLABELLED = -1
Transform = Callable[[Any], torch.Tensor]


class DataError(GnConvertError):
    """A data source is missing, empty, unreadable or of an unsupported kind."""


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation and training transforms for one model.

    Attributes:
        eval: resize, centre crop, to tensor, normalise (deterministic).
        train: random-resized crop, optional horizontal flip, to tensor, normalise.
        crop_size: side of the square the model sees, in pixels.
        resize_size: side the shorter edge is resized to before the evaluation crop.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    eval: Transform
    train: Transform
    crop_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_transforms(
    weights: Any = None, input_size: int | None = None, *, flip: bool = True
) -> Preprocessing:
    """The preprocessing a torchvision model expects, for evaluation and for training.

    Args:
        weights: a torchvision weights enum member (``ResNet18_Weights.DEFAULT``) whose
            ``transforms()`` preset gives crop, resize, mean, std and interpolation; or None
            for ImageNet normalisation, resize 256, crop 224.
        input_size: crop side in pixels; overrides the preset's crop, and the resize becomes
            ``round(input_size / 0.875)``.
        flip: add a random horizontal flip to the training transform (default True; turn it
            off for data where left and right differ, such as digits or text).

    Returns:
        The :class:`Preprocessing` for the model.
    """
    crop, resize = 224, 256
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    interpolation = T.InterpolationMode.BILINEAR
    preset = weights.transforms() if weights is not None and hasattr(weights, "transforms") else None
    if preset is not None:
        crop = int(_first(getattr(preset, "crop_size", crop)))
        resize = int(_first(getattr(preset, "resize_size", resize)))
        mean = tuple(getattr(preset, "mean", mean))
        std = tuple(getattr(preset, "std", std))
        interpolation = getattr(preset, "interpolation", interpolation)
    if input_size is not None:
        crop, resize = int(input_size), int(round(input_size / 0.875))
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([T.Resize(resize, interpolation=interpolation, antialias=True),
                         T.CenterCrop(crop), *finish])
    augment = [T.RandomResizedCrop(crop, interpolation=interpolation, antialias=True)]
    if flip:
        augment.append(T.RandomHorizontalFlip())
    return Preprocessing(eval_tf, T.Compose([*augment, *finish]), crop, resize, mean, std)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


class ImageFiles(Dataset):
    """Image files with optional labels, loaded with PIL and transformed.

    A file that fails to load is logged, counted in :attr:`skipped` and replaced by the next
    readable file (a deterministic choice, so seeded runs stay reproducible). Counts are per
    process: DataLoader workers keep their own.

    Args:
        files: image paths.
        labels: class index per file, or None for unlabelled images.
        transform: applied to the RGB PIL image; must return a tensor.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None, transform: Transform) -> None:
        if not files:
            raise DataError("no image files to load; pass a folder that holds images")
        self.files = [Path(f) for f in files]
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if self.files[i] in self.skipped:
                continue
            try:
                with Image.open(self.files[i]) as img:
                    image = self.transform(img.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as exc:
                self.skipped.add(self.files[i])
                log.warning("skipping unreadable image %s (%s); %d skipped so far",
                            self.files[i], exc, len(self.skipped))
                continue
            return image, self.labels[i] if self.labels is not None else UNLABELLED
        raise DataError("none of the image files could be read; check the data folder")


@dataclass
class FolderScan:
    """What :func:`scan_folder` found.

    Attributes:
        root: the folder.
        files: readable image files, in sorted order.
        labels: class index per file, or None for a plain folder.
        classes: class names (subfolder names) in index order, or None.
        skipped: files with an image extension whose header could not be read.
    """

    root: Path
    files: list[Path]
    labels: list[int] | None
    classes: list[str] | None
    skipped: list[Path] = field(default_factory=list)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for a broken file
        return False


def scan_folder(root: str | os.PathLike[str], *, verify: bool = True) -> FolderScan:
    """List the images of a data folder, with labels when it has class subfolders.

    Args:
        root: a folder of class subfolders (labelled) or of images (unlabelled).
        verify: open every file's header and skip (and count) those PIL cannot read. Costs
            one small read per file; pass False for very large folders (broken files are
            then skipped when loaded instead).

    Returns:
        The :class:`FolderScan`.

    Raises:
        DataError: the folder is missing, not a folder, or holds no readable image.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data folder {path} does not exist; pass a folder of images or of class subfolders")
    if not path.is_dir():
        raise DataError(f"data path {path} is not a folder; pass a folder of images or of class subfolders")
    class_dirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    per_class = [(d.name, _images_in(d, recursive=True)) for d in class_dirs]
    per_class = [(name, files) for name, files in per_class if files]
    if per_class:
        loose = _images_in(path, recursive=False)
        if loose:
            log.warning("%s: ignoring %d images outside the class subfolders", path, len(loose))
        classes = [name for name, _ in per_class]
        pairs = [(f, k) for k, (_, files) in enumerate(per_class) for f in files]
    else:
        classes = None
        pairs = [(f, UNLABELLED) for f in _images_in(path, recursive=False)]
    if not pairs:
        raise DataError(f"data folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "add images or class subfolders of images")
    skipped = [f for f, _ in pairs if verify and not _readable(f)]
    if skipped:
        bad = set(skipped)
        pairs = [(f, k) for f, k in pairs if f not in bad]
        log.warning("%s: skipped %d unreadable image files (first: %s)", path, len(skipped), skipped[0])
    if not pairs:
        raise DataError(f"none of the {len(skipped)} images in {path} could be read; check the files")
    files = [f for f, _ in pairs]
    labels = [k for _, k in pairs] if classes is not None else None
    log.info("%s: %d images%s", path, len(files), f" in {len(classes)} classes" if classes else " (unlabelled)")
    return FolderScan(path, files, labels, classes, skipped)


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
    if not isinstance(label, int):
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
        train = _files_dataset(scan, train_idx, train_tf)
        heldout = _files_dataset(scan, held_idx, prep.eval) if held_idx else None
        split = DataSplit(train, heldout, scan.labels is not None, scan.classes, scan.skipped,
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


class SyntheticImages(Dataset):
    """Random normal images with cyclic labels: for smoke tests only, never for fidelity.

    Args:
        count: number of items.
        shape: (C, H, W) of each image.
        num_classes: labels are ``index % num_classes``.
        seed: item ``i`` is drawn from a generator seeded with ``seed * 1_000_003 + i``.
    """

    def __init__(self, count: int = 64, shape: tuple[int, int, int] = (3, 32, 32),
                 num_classes: int = 10, seed: int = 0) -> None:
        self.count, self.shape, self.num_classes, self.seed = count, tuple(shape), num_classes, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.shape, generator=gen), index % self.num_classes


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
