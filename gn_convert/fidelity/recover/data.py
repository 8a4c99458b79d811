"""The images a recovery trains on and is judged on, split by source photo.

:func:`recovery_data` turns what the user gave (a folder, a Dataset, ``"synthetic"``, a
:class:`~gn_convert.data.sources.DataSplit`, or a folder plus synthetic images) into:

- ``train``: a Dataset whose every fetch is a fresh augmented view (random-resized crop, flip);
- ``heldout``: fixed views of photos that training never sees (the split is by file, and a
  file is a photo: several seeded views of each held-out photo, so that one photo counts as a
  group of correlated crops, not as several independent ones);
- ``fit``: fixed fresh views of the *training* photos, to compare fit with generalisation;
- ``warnings``: what makes the held-out figure less trustworthy (few held-out photos, files that
  look like views of the same scenes, no real images at all).

``eval_data`` replaces the held-out split: give photos of other scenes there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from gn_convert.data.folders import ImageFiles, scan_folder
from gn_convert.data.items import LabelledItems, split_batch
from gn_convert.data.sources import DataSplit, load_data, split_indices
from gn_convert.data.transforms import model_transforms
from gn_convert.errors import OptionError
from gn_convert.fidelity import distributed as ddp

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
VIEWS = 8
"""Fixed views per held-out photo (the centre crop and seeded random-resized crops)."""
MAX_HELDOUT_VIEWS = 512
FIT_VIEWS = 128
FEW_PHOTOS = 8
"""Below this many held-out photos the held-out figure gets a warning."""
SAME_SCENE = 0.7
"""Cosine similarity of the teacher's pooled features above which two images look like views of one scene.
Measured on ImageNet EfficientNet-Lite0 and the photo pool: a photo against views of 88 other photos
0.32-0.60 (10 photos), a random view of a photo against views of the same photos 0.45-0.96 (median
0.86; 17 of 20 above 0.7)."""
SAME_SCENE_WARNING = 0.5
"""Share of held-out photos that look like views of training photos above which the result warns."""
NOISE_VIEWS = 8
"""Images of random pixels the same-scene check holds the held-out photos against: features in which the typical
photo looks like noise (above :data:`SAME_SCENE`) carry no information about scenes (an untrained network's make
every image look alike: ten different photos were all said to be views of training photos)."""


@dataclass
class RecoveryData:
    """What a recovery trains on and is judged on (see the module docstring).

    Attributes:
        train: items ``(image, label)``, a fresh augmented view per fetch.
        heldout: fixed held-out views ``(N, C, H, W)``.
        groups: the source (photo: its path) of each held-out view, for intervals over photos.
        fit: fixed views of the training images.
        input_size: the side of the views, in pixels.
        description: one line saying what the data are.
        warnings: reasons to distrust the held-out figure.
        synthetic_heldout: the held-out views are synthetic images (no real photo to judge on).
    """

    train: Dataset
    heldout: torch.Tensor
    groups: list[str]
    fit: torch.Tensor
    input_size: int
    description: str = ""
    warnings: list[str] = field(default_factory=list)
    synthetic_heldout: bool = False


class AugmentedTensors(Dataset):
    """Images held as tensors, each fetch a new random-resized crop and flip (for synthetic images)."""

    def __init__(self, images: torch.Tensor, size: int) -> None:
        from torchvision.transforms import v2

        self.images = images.detach().cpu()
        self.transform = v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                                     v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), -1


class SeededViews(Dataset):
    """``views`` fixed views of each image file: the centre crop, then seeded random-resized crops."""

    def __init__(self, files: list[Path], views: int, size: int, seed: int, weights: Any = None) -> None:
        from torchvision.transforms import v2

        self.files, self.views, self.seed = files, views, seed
        prep = model_transforms(weights, size)
        self.centre = prep.eval
        self.random = v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.ToImage(),
                                  v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])

    def __len__(self) -> int:
        return len(self.files) * self.views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file, view = divmod(index, self.views)
        with Image.open(self.files[file]) as img:
            image = img.convert("RGB")
            if view == 0:
                return self.centre(image), -1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + index)
                return self.random(image), -1


def _stack(dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    return torch.stack([split_batch(dataset[i][0][None])[0][0] for i in range(count)])


def fresh_views(train: Dataset, count: int, seed: int) -> torch.Tensor:
    """``count`` augmented views of training items, drawn with a fixed seed (no training batch draws them)."""
    size = len(train)  # type: ignore[arg-type]
    rng = random.Random(seed + 7919)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        return torch.stack([LabelledItems(train)[rng.randrange(size)][0] for _ in range(count)])


def _folder(data: Any, opts: dict[str, Any], size: int) -> tuple[Dataset, torch.Tensor, list[str], str]:
    scan = scan_folder(data)
    prep = model_transforms(opts["weights"], size)
    if opts["eval_data"] is not None:
        train_idx = list(range(len(scan.files)))
        heldout, groups = _eval_views(opts["eval_data"], opts, size)
    else:
        train_idx, held_idx = split_indices(len(scan.files), opts["holdout"], opts["seed"])
        held_files = [scan.files[i] for i in held_idx][:MAX_HELDOUT_VIEWS]
        views = max(1, min(VIEWS, MAX_HELDOUT_VIEWS // max(len(held_files), 1)))
        heldout = _stack(SeededViews(held_files, views, size, opts["seed"], opts["weights"]))
        groups = [str(f) for f in held_files for _ in range(views)]
    labels = [scan.labels[i] for i in train_idx] if scan.labels is not None else None
    train = ImageFiles([scan.files[i] for i in train_idx], labels, prep.train)
    return train, heldout, groups, f"folder {scan.root}: {len(train_idx)} training photos"


def _eval_views(eval_data: Any, opts: dict[str, Any], size: int) -> tuple[torch.Tensor, list[str]]:
    """Fixed views of a separate evaluation source: a folder (views of every photo) or a Dataset."""
    if isinstance(eval_data, (str, Path)):
        files = scan_folder(eval_data).files[:MAX_HELDOUT_VIEWS]
        views = max(1, min(VIEWS, MAX_HELDOUT_VIEWS // len(files)))
        return _stack(SeededViews(files, views, size, opts["seed"], opts["weights"])), \
            [str(f) for f in files for _ in range(views)]
    split = load_data(eval_data, weights=opts["weights"], input_size=size, holdout=0, augment=False)
    images = _stack(split.train, MAX_HELDOUT_VIEWS * VIEWS)
    return images, [str(i) for i in range(len(images))]


def check_heldout(data: Any, holdout: float | int, eval_data: Any) -> None:
    """Refuse, before any work, a recovery with nothing to judge its stages on: it keeps the state with the lowest
    held-out KL, and with no held-out photo it could only keep the unrecovered conversion.

    Args:
        data, holdout, eval_data: as :func:`gn_convert.recover` takes them.

    Raises:
        OptionError: ``holdout`` is not above 0 and there is no ``eval_data``, or ``data`` is a DataSplit
            without a held-out part.
    """
    if eval_data is not None:
        return
    if isinstance(data, DataSplit):
        if data.heldout is None:
            raise OptionError("recover was given a DataSplit without a held-out part, and it judges every stage on "
                              "held-out photos: give the split a held-out part, or pass eval_data with other photos")
    elif not holdout > 0:
        raise OptionError(f"holdout={holdout:g} holds no photo out, and recover judges every stage on held-out photos: "
                          "hold some out (holdout=0.1, --holdout 0.1) or pass eval_data (--eval-data DIR) with photos "
                          "of other scenes")


def data_fingerprint(data: Any, eval_data: Any) -> dict[str, Any]:
    """What tells the data of one recovery from another's, without reading an image: for a folder, its files
    (every file under it, by path relative to it) and their sizes; for a Dataset or DataLoader, its kind and
    length; ``"synthetic"`` and None as they are."""
    return {"data": _source_fingerprint(data), "eval_data": _source_fingerprint(eval_data)}


def _source_fingerprint(source: Any) -> dict[str, Any] | None:
    if source is None or isinstance(source, str) and source == SYNTHETIC:
        return None if source is None else {"kind": SYNTHETIC, "items": None}
    if isinstance(source, (str, Path)) and Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
        entries = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
        digest = hashlib.blake2b(json.dumps(entries).encode(), digest_size=16).hexdigest()
        return {"files": len(entries), "bytes": sum(size for _, size in entries), "digest": digest}
    if isinstance(source, DataSplit):
        return {"kind": "DataSplit", "items": _length(source.train),
                "heldout": None if source.heldout is None else _length(source.heldout)}
    dataset = source.dataset if isinstance(source, DataLoader) else source
    return {"kind": type(dataset).__name__, "items": _length(dataset)}


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def recovery_data(data: Any, teacher: nn.Module, opts: dict[str, Any],
                  synthesise: Any = None) -> RecoveryData:
    """Assemble a recovery's data (see the module docstring).

    Args:
        data: a folder, Dataset, DataLoader, DataSplit, ``"synthetic"`` or None.
        teacher: the BatchNorm model (for synthetic images and the same-scene check).
        opts: ``weights``, ``input_size``, ``holdout``, ``eval_data``, ``seed``, ``synthetic``
            (count of synthetic images to add).
        synthesise: ``synthesise(count, train) -> images (N, 3, S, S)`` (normalised), for synthetic
            data; ``train`` is the real training set (None without one).

    Raises:
        OptionError: no data at all.
        DataError: an unreadable source, or a split that leaves nothing to train on.
    """
    synthetic = int(opts.get("synthetic") or 0)
    if isinstance(data, str) and data == SYNTHETIC:
        data, synthetic = None, synthetic or 256
    if data is None and not synthetic:
        raise OptionError("recover needs data: a folder or Dataset of images, or data='synthetic'")
    size = opts["input_size"] or model_transforms(opts["weights"]).crop_size
    warnings: list[str] = []
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        train, heldout, groups, description = _folder(data, opts, size)
    elif data is not None:
        split = load_data(data, weights=opts["weights"], input_size=size, holdout=opts["holdout"],
                          seed=opts["seed"], eval_data=opts["eval_data"])
        train, description = split.train, split.description
        heldout = _stack(split.heldout, MAX_HELDOUT_VIEWS) if split.heldout is not None else torch.empty(0)
        groups = [str(i) for i in range(len(heldout))]
        if not isinstance(data, DataSplit) and opts["eval_data"] is None:
            warnings.append("the held-out items are a split of the dataset's items; if several items come from "
                            "one photo, the held-out agreement flatters the result: pass eval_data with other photos")
    else:
        train, description = None, "no real images"
        heldout, groups = _eval_views(opts["eval_data"], opts, size) if opts["eval_data"] is not None else \
            (torch.empty(0), [])
    if synthetic:
        images = synthesise(synthetic, train)
        if train is None and not len(heldout):
            train_idx, held_idx = split_indices(len(images), opts["holdout"], opts["seed"])
            resized = torch.nn.functional.interpolate(images[held_idx], size=(size, size), mode="bilinear",
                                                      antialias=True)
            heldout, groups = resized.cpu(), [f"synthetic-{i}" for i in held_idx]
            images = images[train_idx]
            warnings.append("no real held-out images: agreement is measured on synthetic ones and says little "
                            "about photos; pass eval_data with real photos")
        extra = AugmentedTensors(images, size)
        train = extra if train is None else ConcatDataset([LabelledItems(train), extra])
        description += f" + {len(images)} synthetic images"
    assert train is not None  # real images, synthetic ones, or both
    fit = fresh_views(train, min(FIT_VIEWS, max(len(heldout), 32)), opts["seed"])
    photos = len(set(groups))
    if 0 < photos < FEW_PHOTOS:
        warnings.append(f"only {photos} held-out photos: the held-out agreement is a coarse estimate; pass eval_data "
                        "with more photos of other scenes")
    return RecoveryData(train, heldout, groups, fit, size, description, warnings,
                        synthetic_heldout=bool(groups) and groups[0].startswith("synthetic-"))


def same_scene_share(teacher: nn.Module, heldout: torch.Tensor, groups: list[str], fit: torch.Tensor) -> float | None:
    """The share of held-out photos whose centre view looks like a view of a training photo: the
    cosine similarity of the teacher's pooled features (the input of its last linear layer) to
    some training view is above :data:`SAME_SCENE`. None when those features carry no information:
    the typical held-out photo looks as much like one of :data:`NOISE_VIEWS` images of random pixels."""
    linear = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    if not linear or not len(heldout) or not len(fit):
        return 0.0
    seen: list[torch.Tensor] = []
    handle = linear[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(1).float()))
    first = sorted({g: i for i, g in reversed(list(enumerate(groups)))}.values())
    noise = torch.randn((NOISE_VIEWS, *heldout.shape[1:]), generator=torch.Generator().manual_seed(0))
    device = next(teacher.parameters()).device
    try:
        with torch.no_grad():
            for x in (heldout[first], fit, noise):
                teacher(x.to(device))
    finally:
        handle.remove()
    held, train, random_pixels = (torch.nn.functional.normalize(t, dim=1) for t in seen[:3])
    if float((held @ random_pixels.T).max(1).values.median()) > SAME_SCENE:
        return None
    return float(((held @ train.T).max(1).values > SAME_SCENE).float().mean())


def same_scene_warnings(teacher: nn.Module, found: RecoveryData) -> list[str]:
    """The warning when many held-out photos look like views of training photos (none for synthetic held-out
    images, which have their own, nor where the teacher's features cannot tell photos from noise)."""
    if found.synthetic_heldout:
        return []
    share = same_scene_share(teacher, found.heldout, found.groups, found.fit)
    if share is None:
        log.info("same-scene check skipped: the teacher's features find the held-out photos as alike to random "
                 "pixels as to anything")
        return []
    if share < SAME_SCENE_WARNING:
        return []
    return [f"{share:.0%} of the held-out photos look like views of training photos (many files, few scenes?): "
            "the held-out agreement flatters the result; pass eval_data (--eval-data) with photos of other scenes"]


def endless_batches(dataset: Dataset, batch_size: int, device: torch.device, seed: int,
             rank: int = 0) -> Iterator[torch.Tensor]:
    """Shuffled batches of ``dataset``, epoch after epoch (a smaller last batch only when it is all there is);
    each process of a distributed run draws its own order (``rank``)."""
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise OptionError("recover has no training image left after the held-out split; add data")
    gen = torch.Generator().manual_seed(ddp.mix_seed(seed, rank) if rank else seed)
    while True:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=size >= batch_size,
                                generator=gen):
            yield split_batch(batch)[0].to(device)
