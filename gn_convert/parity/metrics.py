"""Agreement metrics between a reference output and a candidate output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Metrics:
    """How closely one output matches the reference.

    Attributes:
        max_abs: largest absolute difference.
        max_rel: ``max_abs`` divided by the reference's largest magnitude.
        cosine: smallest per-sample cosine similarity.
        top1: fraction of samples whose arg-max class agrees (None for non-2-D outputs).
        top5: mean overlap of the top-5 class sets, 0..1 (None when fewer than 5 classes).
    """

    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    top5: float | None


def _topk(x: NDArray[Any], k: int) -> NDArray[Any]:
    return np.argsort(-x, axis=1)[:, :k]


def compare(reference: NDArray[Any], output: NDArray[Any]) -> Metrics:
    """Compare two outputs of shape (N, ...), in float64.

    Args:
        reference: the PyTorch output.
        output: the onnxruntime output.

    Returns:
        The metrics; NaN or inf in ``output``, or a shape other than the reference's, gives ``inf`` errors and
        cosine -1.
    """
    if reference.shape != output.shape:  # never broadcast: a wrong shape is a wrong output
        return Metrics(float("inf"), float("inf"), -1.0, None, None)
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    out = output.astype(np.float64).reshape(len(output), -1)
    if not np.isfinite(out).all():
        return Metrics(float("inf"), float("inf"), -1.0, None, None)
    diff = np.abs(out - ref)
    scale = max(float(np.abs(ref).max()), np.finfo(np.float64).tiny)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    dots = (ref * out).sum(axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 1.0)
    top1 = top5 = None
    if reference.ndim == 2 and ref.shape[1] >= 2:
        top1 = float((ref.argmax(1) == out.argmax(1)).mean())
    if reference.ndim == 2 and ref.shape[1] >= 5:
        a, b = _topk(ref, 5), _topk(out, 5)
        top5 = float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b)]))
    return Metrics(float(diff.max()), float(diff.max() / scale), float(cosine.min()), top1, top5)
