"""Detection recovery study: does a converted detector find what its BatchNorm original finds?

A detector with a real pretrained BatchNorm backbone is trained here, then converted three ways and scored
on photos that neither its training nor any recovery saw:

- teacher: EfficientNet-Lite0 with its ImageNet weights (the ``realnet`` extra) to stride 16 (33 BatchNorm
  layers), torchvision's ``FeaturePyramidNetwork`` on its stride-8 and stride-16 features and torchvision's
  ``FCOS`` head (its own GroupNorm), trained for ``--steps`` steps on shapes with exact boxes drawn onto the
  photo pool's ``train`` photos (``gn_convert.testing.shape_masks``; a box is a shape's drawn pixels);
- ``identity``: every BatchNorm replaced by GroupNorm with weight 1 and bias 0 (what Opacus's
  ``ModuleValidator.fix`` does);
- ``bn-stats``: ``gn_convert.convert``'s data-free initialisation from the BatchNorm statistics;
- ``recovered``: ``gn_convert.recover`` with the time budget ``--budget`` on the training images (a folder
  of PNGs, as a user gives it), distilling the backbone and FPN features.

Scored on shapes drawn onto the pool's ``test`` photos (``--eval-split dev`` while tuning): box agreement with
the teacher (:func:`gn_convert.fidelity.boxes.box_agreement`: the teacher's detections scored 0.5 or more
that the student finds, the student's that the teacher has) and each model's recall of the true boxes
(IoU 0.5, score 0.5), with a bootstrap interval over photos.

Usage::

    python scripts/detection_recovery_study.py              # writes docs/detection_recovery_study.json
    python scripts/detection_recovery_study.py --fast       # bundled photos, few steps (a quick look)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study_models import efficientnet_lite0  # noqa: E402
from _study_photos import study_photos  # noqa: E402

from gn_convert import convert, recover  # noqa: E402
from gn_convert.atomic import atomic_file  # noqa: E402
from gn_convert.fidelity.boxes import PictureCounts, detections, greedy_pairs, picture_counts, summarize  # noqa: E402
from gn_convert.testing.shape_masks import CLASSES, ShapeSet, build_shape_set  # noqa: E402

log = logging.getLogger("detection_recovery_study")
LOW_BLOCK, LAST_BLOCK = 4, 10  # Lite0's last block at stride 8 (40 channels) and at stride 16 (112 channels)


class Lite0Pyramid(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights) to stride 16 and an FPN: normalised images in, two levels out."""

    out_channels = 64

    def __init__(self) -> None:
        super().__init__()
        lite0: Any = efficientnet_lite0()
        self.stem = nn.Sequential(lite0._conv_stem, lite0._bn0, lite0._swish)
        self.blocks = nn.ModuleList(lite0._blocks[:LAST_BLOCK + 1])
        low, high = (lite0._blocks[i]._project_conv.out_channels for i in (LOW_BLOCK, LAST_BLOCK))
        self.fpn = FeaturePyramidNetwork([low, high], self.out_channels)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1  # the port keeps TensorFlow's 0.01

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:  # noqa: D102
        features, low = self.stem(images), images
        for index, block in enumerate(self.blocks):
            features = block(features)
            if index == LOW_BLOCK:
                low = features
        return self.fpn(OrderedDict([("0", low), ("1", features)]))


def detector(size: int) -> FCOS:
    """The teacher's architecture: Lite0-FPN and torchvision's FCOS head, images kept at ``size``."""
    anchors = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)))
    return FCOS(Lite0Pyramid(), num_classes=len(CLASSES), min_size=size, max_size=size, anchor_generator=anchors,
                score_thresh=0.05, detections_per_img=20)


def shape_targets(shapes: ShapeSet) -> list[dict[str, torch.Tensor]]:
    """Each image's true boxes (the extent of each shape's drawn pixels) and labels."""
    size = shapes.labels.shape[-1]
    rows, cols = np.mgrid[0:size, 0:size]
    targets = []
    for labels, drawn in zip(shapes.labels, shapes.shapes):
        boxes = []
        for shape in drawn:
            inside = (rows - shape.centre[0]) ** 2 + (cols - shape.centre[1]) ** 2 <= (shape.radius + 1) ** 2
            ys, xs = np.nonzero(inside & (labels == shape.label))
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([s.label for s in drawn], dtype=torch.int64)})
    return targets


def pictures(shapes: ShapeSet) -> list[torch.Tensor]:
    """The images as ``(3, S, S)`` floats in [0, 1] (what a torchvision detector takes)."""
    return list(torch.from_numpy(shapes.images).permute(0, 3, 1, 2).float().div(255.0).unbind())


def train(model: FCOS, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], steps: int,
          batch: int, lr: float, seed: int) -> list[float]:
    """SGD with momentum, the learning rate on a cosine to 0; BatchNorm in training mode. The losses per step."""
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    model.train()
    losses = []
    for step in range(steps):
        chosen = torch.randint(len(images), (batch,), generator=gen).tolist()
        loss = sum(model([images[i] for i in chosen], [targets[i] for i in chosen]).values())
        optimiser.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))  # type: ignore[union-attr]
        if step % 50 == 0 or step == steps - 1:
            log.info("teacher step %d/%d: loss %.3f", step + 1, steps, float(loss))
    return losses


def truth_recall(found: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> list[float]:
    """Per picture, the share of true boxes a detection scored 0.5 or more finds (label, IoU 0.5)."""
    shares = []
    for mine, truth in zip(found, targets):
        sure = {k: mine[k][mine["scores"] >= 0.5] for k in ("boxes", "labels", "scores")}
        truth = {**truth, "scores": torch.ones(len(truth["labels"]))}
        shares.append(len(greedy_pairs(truth, sure, 0.5)) / max(len(truth["labels"]), 1))
    return shares


def interval(counts: list[PictureCounts], groups: list[int], key: str, resamples: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of a box-agreement share, resampling the photos (pictures of one photo together)."""
    gen = np.random.default_rng(0)
    photos = sorted(set(groups))
    members = {p: [k for k, g in enumerate(groups) if g == p] for p in photos}
    values = []
    for _ in range(resamples):
        value = summarize([counts[k] for p in gen.choice(photos, len(photos)) for k in members[int(p)]])[key]
        if math.isfinite(value):
            values.append(value)
    low, high = np.quantile(values, [0.025, 0.975]) if values else (math.nan, math.nan)
    return float(low), float(high)


def write_folder(images: list[torch.Tensor], folder: Path) -> Path:
    """The training images as PNG files (what a user hands ``recover``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"train{k:04d}.png")
    return folder


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the teacher, make the students, score them; the study's document."""
    start = time.perf_counter()
    train_photos, eval_photos, source = study_photos(args.fast, args.eval_split)
    train_set = build_shape_set(train_photos, args.train_images, args.size, seed=0)
    eval_set = build_shape_set(eval_photos, args.eval_images, args.size, seed=1)
    train_images, eval_images = pictures(train_set), pictures(eval_set)
    eval_targets = shape_targets(eval_set)
    torch.manual_seed(args.seed)
    teacher = detector(args.size)
    losses = train(teacher, train_images, shape_targets(train_set), args.steps, args.batch, args.lr, args.seed)
    teacher.eval()
    students: dict[str, nn.Module] = {"identity": convert(teacher, args.groups, init="identity"),
                                      "bn-stats": convert(teacher, args.groups)}
    recovery: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gn-detection-study-") as scratch:
        folder = write_folder(train_images[:args.recover_images], Path(scratch) / "train")
        for budget in args.budgets:
            result = recover(copy.deepcopy(teacher), str(folder), budget=budget, input_size=args.size,
                             batch_size=args.batch, groups=args.groups, holdout=args.holdout, seed=args.seed)
            students[f"recovered {budget:.0f} s"] = result.model.eval()
            recovery[f"{budget:.0f}"] = result.to_dict()
            log.info("%s", result.summary())
    reference = detections(teacher, eval_images)
    rows = [{"model": "teacher (BatchNorm)", "truth_recall": float(np.mean(truth_recall(reference, eval_targets)))}]
    for name, student in students.items():
        found = detections(student, eval_images)
        counts = picture_counts(reference, found)
        scores = summarize(counts)
        for key in ("box_recall", "box_f1"):
            scores[f"{key}_low"], scores[f"{key}_high"] = interval(counts, eval_set.backgrounds, key)
        rows.append({"model": name, **scores, "truth_recall": float(np.mean(truth_recall(found, eval_targets)))})
    return {"source": source, "config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
            "teacher_loss_first_last": [losses[0], float(np.mean(losses[-20:]))], "recovery": recovery,
            "seconds": time.perf_counter() - start, "torch": torch.__version__}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The study's table: agreement with the teacher (95% interval over photos) and recall of the true boxes."""
    lines = ["| model | boxes found | F1 with the teacher | right | median IoU | true boxes found |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "box_recall" not in r:
            lines.append(f"| {r['model']} | - | - | - | - | {r['truth_recall']:.3f} |")
            continue
        lines.append(f"| {r['model']} | {r['box_recall']:.3f} [{r['box_recall_low']:.2f}-{r['box_recall_high']:.2f}] "
                     f"| {r['box_f1']:.3f} [{r['box_f1_low']:.2f}-{r['box_f1_high']:.2f}] | {r['box_precision']:.3f} "
                     f"| {r['box_iou']:.3f} | {r['truth_recall']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study, print its table, write ``detection_recovery_study.json`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--fast", action="store_true", help="bundled photos, few steps, small budget")
    parser.add_argument("--eval-split", choices=("test", "dev"), default="test")
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--recover-images", type=int, default=400, help="training images given to recover")
    parser.add_argument("--steps", type=int, default=600, help="teacher training steps (default 600)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[120.0, 300.0], help="recovery budgets (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.fast:
        args.train_images, args.eval_images, args.recover_images, args.steps, args.budgets = 96, 48, 48, 30, [20.0]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gn_convert").setLevel(logging.WARNING)
    document = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("detection_recovery_study_fast.json" if args.fast else "detection_recovery_study.json")
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(document, indent=1, default=float) + "\n")
    print(f"{document['source']}; {args.eval_images} scored images of {args.size} px; {document['seconds']:.0f} s")
    print(table(document["rows"]))
    print(f"wrote {out}")
    return document


if __name__ == "__main__":
    main()
