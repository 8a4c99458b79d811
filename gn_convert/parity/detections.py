"""Parity of a detection model: every GroupNorm layer and the detections, under onnxruntime against PyTorch.

A detection model's outputs are boxes, labels and scores (masks, keypoints) whose number depends on
the data, after non-maximum suppression: they cannot be compared position by position. On pictures
(real photos where scikit-learn is installed, else seeded noise images) the check

1. compares the output of every GroupNorm layer of the backbone and FPN in the file as written (each
   exposed as an extra graph output, :func:`gn_convert.parity.localise.localise`) with the PyTorch
   layer's, each within the provider's float32 tolerance or :data:`NOISE_FACTOR` times PyTorch's own
   float32 error at that layer (deep layers drift in both); the first layer off is named (the heads'
   layers run on boxes that depend on the data, and are judged by the detections);
2. matches each PyTorch detection to an onnxruntime detection of the same label by IoU, for the file
   as written, and for a copy exported with score threshold 0 (at most :data:`DETECTIONS` a picture),
   so that an untrained head's low-scored detections are compared too (that copy checks the export
   path on this model; the file as written is checked by 1 and by its own detections).

A picture passes when both find as many detections, their sorted scores agree within
:data:`SCORE_TOLERANCE`, and at least :data:`MIN_MATCHED` of the PyTorch detections, and of those whose score
is not tied with another PyTorch detection's, are matched with IoU at least :data:`MIN_IOU` (two boxes of no
area when they coincide), each matched score within :data:`SCORE_TOLERANCE` (an untrained head scores many
boxes alike, and which of two tied boxes is kept is decided by rounding: the share of all detections may
lose a few; until 8 Dec 2026 only the untied ones were required, so a row of tied scores never judged its
boxes). Measured on a converted
Faster R-CNN (docs/PARITY.md): every one of 50 detections matched and scores within 7e-4, while the
BatchNorm original's own export agrees to 1e-5; the difference grows from the features through the
box regression and RoIAlign's sampling positions.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gn_convert.modes import eval_mode

MIN_IOU = 0.9
MIN_MATCHED = 0.9
SCORE_TOLERANCE = 5e-3
DETECTIONS = 50
PICTURES = 3


@dataclass
class DetectionRow:
    """One picture on one provider: how the file's detections match the model's.

    A detection whose score lies within :data:`SCORE_TOLERANCE` of another PyTorch detection's is *tied*:
    which of the two the top-k and the threshold keep is decided by rounding, so it counts only through the
    scores (``score_gap``: the largest difference between the two sorted score lists). Its own counterpart in
    the file does not make it tied (until 8 Dec 2026 it did, so a file whose scores agreed passed whatever
    its boxes were)."""

    provider: str
    variant: str
    picture: int
    torch_count: int
    onnx_count: int
    matched: int
    score_max_abs: float
    distinct: int = 0
    matched_distinct: int = 0
    score_gap: float = 0.0

    @property
    def passed(self) -> bool:
        """As many detections, their sorted scores within tolerance, and enough of PyTorch's detections, and of its
        untied ones, matched by label and IoU, each matched score within tolerance (none on both sides passes)."""
        if self.torch_count == 0:
            return self.onnx_count == 0
        return self.onnx_count == self.torch_count and self.score_gap <= SCORE_TOLERANCE \
            and self.matched >= MIN_MATCHED * self.torch_count \
            and self.matched_distinct >= MIN_MATCHED * self.distinct and self.score_max_abs <= SCORE_TOLERANCE


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
        """Every layer compared, each within its bound (NaN fails)."""
        return self.layers > 0 and self.first_failing is None and self.max_rel <= self.tolerance


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
            f"{r.provider} {r.variant} picture {r.picture}: {r.matched_distinct} of {r.distinct} untied detections "
            f"matched ({r.matched} of {r.torch_count} in all; onnxruntime found {r.onnx_count}), matched scores within "
            f"{r.score_max_abs:.1e}, sorted scores within {r.score_gap:.1e}" for r in self.rows if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``passed`` included)."""
        return {"passed": self.passed, "onnx_path": self.onnx_path, "pictures": self.pictures,
                "rows": [{**asdict(r), "passed": r.passed} for r in self.layers],
                "detections": [{**asdict(r), "passed": r.passed} for r in self.rows],
                "skipped": dict(self.skipped), "failures": self.failures()}


NOISE_FACTOR = 4.0
"""A layer passes within this many times PyTorch's own float32 error at that layer (against float64), when
that is above the provider's tolerance: deep in a network both float32 implementations drift from the exact
value, and two such drifts differ by up to their sum."""


def _backbone(layer: str) -> bool:
    return layer.startswith("backbone.")  # the heads run on boxes that depend on the data: matched by IoU instead


def _own_noise(model: nn.Module, layers: list[str], image: torch.Tensor) -> dict[str, float]:
    """Each layer's float32 output against the same model in float64, relative (PyTorch's own error)."""
    from gn_convert.parity.localise import torch_layer_outputs
    from gn_convert.parity.metrics import compare

    exact = copy.deepcopy(model).double().eval()
    call = lambda m, x: m([x])  # noqa: E731 - a detection model takes a list of images
    single, double = (torch_layer_outputs(m, layers, x, call) for m, x in ((model, image), (exact, image.double())))
    return {layer: compare(double[layer], single[layer]).max_rel for layer in layers if layer in single
            and layer in double}


def _limit(bound: float, noise: float) -> float:
    """A layer's bound: the provider's, or :data:`NOISE_FACTOR` times PyTorch's own error there when that is
    larger and finite (a layer that overflows in float32 says nothing about float32's error)."""
    return max(bound, NOISE_FACTOR * noise) if math.isfinite(noise) else bound


def layer_rows(model: nn.Module, path: Path, images: list[torch.Tensor], providers: tuple[str, ...],
               native_library: Any = None, tolerances: Any = None) -> tuple[list[LayerRow], dict[str, str]]:
    """Every backbone and FPN GroupNorm layer of the file against the model's, per picture and available
    provider (each within the provider's tolerance, or the user's ``tolerances`` taken literally, or
    :data:`NOISE_FACTOR` times PyTorch's own float32
    error there); and the providers skipped, with why."""
    from gn_convert.onnx.reading import read_model
    from gn_convert.parity.localise import localise
    from gn_convert.parity.providers import availability
    from gn_convert.parity.tolerances import tolerance_for

    onnx_model, rows, skipped = read_model(path), [], {}
    with eval_mode(model):  # the caller's modes come back
        for name in providers:
            found = availability(name, native_library)
            if not found.available:
                skipped[name] = found.reason
                continue
            bound = tolerance_for(name, "float32", tolerances).max_rel
            literal = (name, "float32") in (tolerances or {})
            for k, image in enumerate(images):
                compared = localise(model, onnx_model, image, found, "all", float("inf"), call=lambda m, x: m([x]),
                                    keep=_backbone).layers
                noise = {} if literal else _own_noise(model, [layer.layer for layer in compared], image)
                limits = {layer.layer: bound if literal else _limit(bound, noise.get(layer.layer, 0.0))
                          for layer in compared}
                worst = max(compared, key=lambda layer: layer.max_rel / limits[layer.layer], default=None)
                failing = next((layer.layer for layer in compared if not layer.max_rel <= limits[layer.layer]), None)
                rows.append(LayerRow(name, k, len(compared), worst.max_rel if worst else float("nan"),
                                     limits[worst.layer] if worst else bound, failing))
    return rows, skipped


def match(want: dict[str, torch.Tensor], got: dict[str, Any]) -> dict[str, Any]:
    """Greedy matching by descending PyTorch score: each PyTorch detection takes the unused onnxruntime
    detection of the same label with the highest IoU, when at least :data:`MIN_IOU`.

    Returns:
        :class:`DetectionRow` fields: ``matched``, ``score_max_abs`` (of a matched pair), ``distinct`` and
        ``matched_distinct`` (the untied detections, see :class:`DetectionRow`), ``score_gap``.
    """
    from gn_convert.fidelity.boxes import greedy_pairs

    scores = torch.as_tensor(np.asarray(got["scores"]))
    wanted = want["scores"].float()
    found = {"matched": 0, "score_max_abs": 0.0, "distinct": 0, "matched_distinct": 0, "score_gap": 0.0}
    if len(wanted) == len(scores) and len(scores):
        found["score_gap"] = float((wanted.sort().values - scores.float().sort().values).abs().max())
    if not len(wanted) or not len(scores):
        return found
    gaps = (wanted[:, None] - wanted[None, :]).abs()  # among PyTorch's own: its twin in the file is no tie
    gaps.fill_diagonal_(float("inf"))  # not itself
    tied = gaps.min(1).values <= SCORE_TOLERANCE if len(wanted) > 1 else torch.zeros(1, dtype=torch.bool)
    found["distinct"] = int((~tied).sum())
    for i, j, _ in greedy_pairs(want, {k: np.asarray(got[k]) for k in ("boxes", "labels", "scores")}, MIN_IOU):
        found["matched"] += 1
        found["matched_distinct"] += int(not tied[i])
        found["score_max_abs"] = max(found["score_max_abs"], abs(float(wanted[i]) - float(scores[j])))
    return found


def pictures(size: tuple[int, int], count: int = PICTURES) -> tuple[list[torch.Tensor], str]:
    """Images in [0, 1] of ``size``: crops of real photos where scikit-learn is installed, else noise."""
    from gn_convert.data.transforms import unnormalise

    try:
        from gn_convert.testing.photos import photo_crops

        crops = photo_crops(count, max(size), seed=1)[:, :, :size[0], :size[1]]
    except Exception:  # noqa: BLE001 - scikit-learn absent: noise images, said so in the report
        gen = torch.Generator().manual_seed(1)
        return [torch.rand(3, *size, generator=gen) for _ in range(count)], "noise"
    return list(unnormalise(crops).unbind()), "photos"


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
    from gn_convert.fidelity.boxes import detections
    from gn_convert.parity.providers import availability, session_kwargs
    from gn_convert.runtime import open_session, run_session

    wanted = detections(model, images)  # in eval mode; the caller's modes come back
    rows = []
    for name in providers:
        found = availability(name, native_library)
        if not found.available:
            continue
        sess = open_session(path, provider=name, **session_kwargs(found, "all"))
        feed, names = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
        for k, (image, want) in enumerate(zip(images, wanted)):
            got = dict(zip(names, run_session(sess, {feed: image.numpy()})))
            rows.append(DetectionRow(name, variant, k, len(want["boxes"]), len(got["boxes"]), **match(want, got)))
    return rows


def with_open_threshold(model: nn.Module, export: Any) -> tuple[nn.Module, Path, tempfile.TemporaryDirectory[str]]:
    """The open-threshold copy of ``model`` and its export (``export(model, path)``) in a temporary folder
    (the caller cleans it up)."""
    folder = tempfile.TemporaryDirectory(prefix="gn-convert-detections-")
    opened = open_threshold(model)
    path = Path(folder.name) / "open.onnx"
    export(opened, path)
    return opened, path, folder
