"""Parity of a detection model: every GroupNorm layer and the detections, under onnxruntime against PyTorch.

A detection model's outputs are boxes, labels and scores (masks, keypoints) whose number depends on
the data, after non-maximum suppression: they cannot be compared position by position. On pictures
(real photos where scikit-learn is installed, else seeded noise images) the check

1. compares the output of every GroupNorm layer of the file as written (each exposed as an extra
   graph output, :func:`gn_convert.parity.localise.localise`) with the PyTorch layer's: the backbone
   and FPN features the conversion changed, each within the provider's float32 tolerance; the first
   layer off is named;
2. matches each PyTorch detection to an onnxruntime detection of the same label by IoU, for the file
   as written, and for a copy exported with score threshold 0 (at most :data:`DETECTIONS` a picture),
   so that an untrained head's low-scored detections are compared too (that copy checks the export
   path on this model; the file as written is checked by 1 and by its own detections).

A picture passes when at least :data:`MIN_MATCHED` of the PyTorch detections are matched with IoU
at least :data:`MIN_IOU`, each matched score within :data:`SCORE_TOLERANCE`. Measured on a converted
Faster R-CNN (docs/PARITY.md): every one of 50 detections matched and scores within 7e-4, while the
BatchNorm original's own export agrees to 1e-5; the difference grows from the features through the
box regression and RoIAlign's sampling positions.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_IOU = 0.9
MIN_MATCHED = 0.9
SCORE_TOLERANCE = 5e-3
DETECTIONS = 50
PICTURES = 3


@dataclass
class DetectionRow:
    """One picture on one provider: how the file's detections match the model's."""

    provider: str
    variant: str
    picture: int
    torch_count: int
    onnx_count: int
    matched: int
    score_max_abs: float

    @property
    def passed(self) -> bool:
        """Enough of PyTorch's detections matched, with scores within tolerance (none on both sides passes)."""
        if self.torch_count == 0:
            return self.onnx_count == 0
        return self.matched >= MIN_MATCHED * self.torch_count and self.score_max_abs <= SCORE_TOLERANCE


@dataclass
class LayerRow:
    """Every GroupNorm layer of the file on one picture and provider: the worst relative error."""

    provider: str
    picture: int
    layers: int
    max_rel: float
    tolerance: float
    first_failing: str | None

    @property
    def passed(self) -> bool:
        """Every layer compared, within tolerance (NaN fails)."""
        return self.layers > 0 and self.max_rel <= self.tolerance


@dataclass
class DetectionParityReport:
    """The per-layer rows and the detections' rows; ``passed`` is the verdict."""

    onnx_path: str
    pictures: str
    layers: list[LayerRow] = field(default_factory=list)
    rows: list[DetectionRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every layer within tolerance and every picture's detections matched."""
        return bool(self.layers) and all(r.passed for r in self.layers) and bool(self.rows) \
            and all(r.passed for r in self.rows)

    @property
    def worst_max_rel(self) -> float:
        """The worst relative error of a GroupNorm layer."""
        return max((row.max_rel for row in self.layers), default=float("nan"))

    def failures(self) -> list[str]:
        """One line per failed check."""
        return [f"{r.provider} picture {r.picture}: GroupNorm layers off by {r.max_rel:.2e} (<= {r.tolerance:.0e}); "
                f"first: {r.first_failing}" for r in self.layers if not r.passed] + [
            f"{r.provider} {r.variant} picture {r.picture}: {r.matched} of {r.torch_count} detections matched "
            f"(onnxruntime found {r.onnx_count}), scores within {r.score_max_abs:.1e}" for r in self.rows
            if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``passed`` included)."""
        return {"passed": self.passed, "onnx_path": self.onnx_path, "pictures": self.pictures,
                "rows": [{**asdict(r), "passed": r.passed} for r in self.layers],
                "detections": [{**asdict(r), "passed": r.passed} for r in self.rows],
                "skipped": dict(self.skipped), "failures": self.failures()}


def layer_rows(model: nn.Module, path: Path, images: list[torch.Tensor], providers: tuple[str, ...],
               native_library: Any = None) -> tuple[list[LayerRow], dict[str, str]]:
    """Every GroupNorm layer of the file against the model's, per picture and available provider;
    and the providers skipped, with why."""
    from gn_convert.onnx.reading import read_model
    from gn_convert.parity.localise import localise
    from gn_convert.parity.providers import availability
    from gn_convert.parity.tolerances import tolerance_for

    onnx_model, rows, skipped = read_model(path), [], {}
    for name in providers:
        found = availability(name, native_library)
        if not found.available:
            skipped[name] = found.reason
            continue
        bound = tolerance_for(name, "float32", None).max_rel
        for k, image in enumerate(images):
            found_layers = localise(model.eval(), onnx_model, image, found, "all", bound,
                                    call=lambda m, x: m([x]))
            worst = max((layer.max_rel for layer in found_layers.layers), default=float("nan"))
            rows.append(LayerRow(name, k, len(found_layers.layers), worst, bound, found_layers.first_failing))
    return rows, skipped


def match(want: dict[str, torch.Tensor], got: list[Any]) -> tuple[int, float]:
    """Greedy matching by descending PyTorch score: each PyTorch detection takes the unused onnxruntime
    detection of the same label with the highest IoU, when at least :data:`MIN_IOU`.

    Returns:
        (matched count, largest score difference of a matched pair).
    """
    from torchvision.ops import box_iou

    boxes, labels, scores = (torch.as_tensor(np.asarray(v)) for v in got[:3])
    if not len(want["boxes"]) or not len(boxes):
        return 0, 0.0
    iou = box_iou(want["boxes"].float(), boxes.float())
    iou[want["labels"][:, None] != labels[None, :]] = 0.0
    used: set[int] = set()
    matched, worst = 0, 0.0
    for i in torch.argsort(want["scores"], descending=True).tolist():
        candidates = [j for j in torch.argsort(iou[i], descending=True).tolist() if j not in used]
        if candidates and iou[i, candidates[0]] >= MIN_IOU:
            used.add(candidates[0])
            matched += 1
            worst = max(worst, abs(float(want["scores"][i]) - float(scores[candidates[0]])))
    return matched, worst


def pictures(size: tuple[int, int], count: int = PICTURES) -> tuple[list[torch.Tensor], str]:
    """Images in [0, 1] of ``size``: crops of real photos where scikit-learn is installed, else noise."""
    from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    try:
        from gn_convert.testing.photos import photo_crops

        crops = photo_crops(count, max(size), seed=1)[:, :, :size[0], :size[1]]
    except Exception:  # noqa: BLE001 - scikit-learn absent: noise images, said so in the report
        gen = torch.Generator().manual_seed(1)
        return [torch.rand(3, *size, generator=gen) for _ in range(count)], "noise"
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return [(c * std + mean).clamp(0, 1) for c in crops], "photos"


def open_threshold(model: nn.Module) -> nn.Module:
    """A copy of a detection model that keeps every detection (score threshold 0), at most
    :data:`DETECTIONS` a picture."""
    opened = copy.deepcopy(model)
    for part in (opened, getattr(opened, "roi_heads", None)):
        if part is None:
            continue
        for name in ("score_thresh", "box_score_thresh"):
            if hasattr(part, name):
                setattr(part, name, 0.0)
        if hasattr(part, "detections_per_img"):
            part.detections_per_img = min(int(getattr(part, "detections_per_img")), DETECTIONS)  # noqa: B009
    return opened


def detection_rows(model: nn.Module, path: Path, images: list[torch.Tensor], providers: tuple[str, ...],
                   variant: str, native_library: Any = None) -> list[DetectionRow]:
    """Each picture's detections by the file on each available provider, matched with the model's."""
    from gn_convert.parity.providers import availability, session_kwargs
    from gn_convert.runtime import open_session, run_session

    with torch.no_grad():
        wanted = [model.eval()([image])[0] for image in images]
    rows = []
    for name in providers:
        found = availability(name, native_library)
        if not found.available:
            continue
        sess = open_session(path, provider=name, **session_kwargs(found, "all"))
        feed = sess.get_inputs()[0].name
        for k, (image, want) in enumerate(zip(images, wanted)):
            got = run_session(sess, {feed: image.numpy()})
            matched, worst = match(want, got)
            rows.append(DetectionRow(name, variant, k, len(want["boxes"]), len(got[0]), matched, worst))
    return rows


def with_open_threshold(model: nn.Module, export: Any) -> tuple[nn.Module, Path, tempfile.TemporaryDirectory[str]]:
    """The open-threshold copy of ``model`` and its export (``export(model, path)``) in a temporary folder
    (the caller cleans it up)."""
    folder = tempfile.TemporaryDirectory(prefix="gn-convert-detections-")
    opened = open_threshold(model)
    path = Path(folder.name) / "open.onnx"
    export(opened, path)
    return opened, path, folder
