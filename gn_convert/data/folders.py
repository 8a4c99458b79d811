"""Image folders: listing, verifying and loading the images of a data folder.

A folder of class subfolders (``root/<class>/<image>``, as ``torchvision.datasets.ImageFolder``
reads it) is labelled; a plain folder of images is not. Files that cannot be read are skipped,
counted and logged, never fatal; an empty or missing folder raises :class:`DataError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from gn_convert.data.items import UNLABELLED
from gn_convert.data.transforms import Transform
from gn_convert.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp",
)


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


def check_data(data: object) -> None:
    """Fail fast, before any model is loaded, when ``data`` names a folder that cannot give images
    (missing, not a folder, no image files); a Dataset or None passes.

    Raises:
        DataError: see :func:`scan_folder` (files are listed, not opened).
    """
    if isinstance(data, (str, os.PathLike)):
        scan_folder(data, verify=False)
