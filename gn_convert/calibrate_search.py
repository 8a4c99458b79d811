"""Greedy calibration: per layer, keep whichever affine makes the network's output closest.

Closed-form fits (:mod:`gn_convert.calibrate`) optimise each layer alone; on the digits
ResNet-18 neither the independent nor the sequential fit beat the data-free bn-stats init
reliably. The greedy order walks the GroupNorm layers in execution order and, for each,
scores three candidate affines on a few calibration batches: the layer's current affine (its
init), the variance fit and the least-squares fit, both fitted on the student's own input to
the layer (as ``sequential`` does). It keeps the candidate with the lowest KL divergence
between the teacher's and the student's outputs. The score never rises above the init's, so
calibration cannot make the network's output on the calibration data worse than bn-stats.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .calibrate import LayerFit, Moments, NormPair, _capture, _execution_order, _images, _normalised
from .kd_loss import kl_loss

#: calibration batches the candidates are scored on (the statistics use all of them)
SCORE_BATCHES = 4
CANDIDATES: tuple[str, ...] = ("variance", "least-squares")


def _score(student: nn.Module, images: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    return sum(float(kl_loss(student(x), t, 1.0)) * x.shape[0] for x, t in zip(images, targets))


def _r2(moments: Moments, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-channel R^2 of an arbitrary affine ``u -> weight * u + bias`` from the moments."""
    n = max(moments.count, 1)
    w, b = weight.double(), bias.double()
    residual = (moments.syy - 2 * w * moments.suy - 2 * b * moments.sy + w * w * moments.suu
                + 2 * w * b * moments.su) / n + b * b
    vy = (moments.syy / n - (moments.sy / n) ** 2).clamp_min(1e-12)
    return 1 - residual / vy


def fit_greedy(pairs: list[NormPair], student: nn.Module, teacher: nn.Module, loader: Any, batches: int,
               device: torch.device) -> tuple[list[LayerFit], int, int]:
    """Calibrate layer by layer, keeping the affine that scores best (see the module docstring).

    Returns:
        (one :class:`LayerFit` per pair in module order, batches seen, images seen).
    """
    images = list(_images(loader, batches, device))
    scored = images[:SCORE_BATCHES]
    with torch.no_grad():
        targets = [teacher(x) for x in scored]
        fits = {}
        for pair in _execution_order(pairs, teacher, loader, device):
            moments = Moments(pair.student.num_channels, device)
            for x in images:
                u = _normalised(pair.student, _capture(student, pair.student, x, want_input=True))
                moments.update(u, _capture(teacher, pair.teacher, x, want_input=False))
            fits[pair.name] = _choose(pair, moments, student, scored, targets)
    return [fits[p.name] for p in pairs], len(images), sum(x.shape[0] for x in images)


def _choose(pair: NormPair, moments: Moments, student: nn.Module, scored: list[torch.Tensor],
            targets: list[torch.Tensor]) -> LayerFit:
    gn = pair.student
    if not gn.affine:
        return LayerFit(pair.name, gn.num_channels, gn.num_groups, float("nan"), float("nan"), False)
    best = (_score(student, scored, targets), gn.weight.detach().clone(), gn.bias.detach().clone(), "init")
    for method in CANDIDATES:
        slope, intercept, _ = moments.fit(method)
        gn.weight.copy_(slope.to(gn.weight))
        gn.bias.copy_(intercept.to(gn.bias))
        score = _score(student, scored, targets)
        if score < best[0]:
            best = (score, gn.weight.detach().clone(), gn.bias.detach().clone(), method)
    gn.weight.copy_(best[1])
    gn.bias.copy_(best[2])
    r2 = _r2(moments, best[1], best[2])
    return LayerFit(pair.name, gn.num_channels, gn.num_groups, float(r2.mean()), float(r2.min()), True, best[3])
