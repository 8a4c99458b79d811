"""Greedy calibration: per layer, keep whichever affine makes the network's output closest.

Closed-form fits (:mod:`gn_convert.fidelity.calibrate.moments`) optimise each layer alone; on the digits
ResNet-18 neither the independent nor the sequential fit beat the data-free bn-stats init
reliably. The greedy order walks the GroupNorm layers in execution order and, for each,
scores three candidate affines on a few calibration batches: the layer's current affine (its
init), the variance fit and the least-squares fit, both fitted on the student's own input to
the layer (as ``sequential`` does). It keeps the candidate with the lowest KL divergence
between the teacher's and the student's outputs. The score never rises above the init's, so
calibration cannot make the network's output on the calibration data worse than bn-stats.
"""

from __future__ import annotations

import torch
from torch import nn

from gn_convert.fidelity.calibrate.moments import FITS, LayerFit, Moments
from gn_convert.fidelity.distill.losses import kl_loss
from gn_convert.fidelity.pairs import NormPair, capture, execution_order, normalised

#: calibration batches the candidates are scored on (the statistics use all of them)
SCORE_BATCHES = 4


def _score(student: nn.Module, images: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    return sum(float(kl_loss(student(x), t, 1.0)) * x.shape[0] for x, t in zip(images, targets))


def fit_greedy(pairs: list[NormPair], student: nn.Module, teacher: nn.Module,
               images: list[torch.Tensor]) -> list[LayerFit]:
    """Calibrate layer by layer, keeping the affine that scores best (see the module docstring).

    Args:
        pairs: the student/teacher layer pairs.
        student: the converted model, in eval mode; its GroupNorm affines change in place.
        teacher: its BatchNorm original, in eval mode.
        images: the calibration batches (at least one).

    Returns:
        One :class:`LayerFit` per pair, in the order of ``pairs``.
    """
    scored = images[:SCORE_BATCHES]
    with torch.no_grad():
        targets = [teacher(x) for x in scored]
        fits = {}
        for pair in execution_order(pairs, teacher, images[0]):
            moments = Moments(pair.student.num_channels, images[0].device)
            for x in images:
                u = normalised(pair.student, capture(student, pair.student, x, want_input=True))
                moments.update(u, capture(teacher, pair.teacher, x, want_input=False))
            fits[pair.name] = _choose(pair, moments, student, scored, targets)
    return [fits[p.name] for p in pairs]


def _choose(pair: NormPair, moments: Moments, student: nn.Module, scored: list[torch.Tensor],
            targets: list[torch.Tensor]) -> LayerFit:
    gn = pair.student
    if not gn.affine:
        return LayerFit(pair.name, gn.num_channels, gn.num_groups, float("nan"), float("nan"), False)
    best = (_score(student, scored, targets), gn.weight.detach().clone(), gn.bias.detach().clone(), "init")
    for method in FITS:
        slope, intercept, _ = moments.fit(method)
        gn.weight.copy_(slope.to(gn.weight))
        gn.bias.copy_(intercept.to(gn.bias))
        score = _score(student, scored, targets)
        if score < best[0]:
            best = (score, gn.weight.detach().clone(), gn.bias.detach().clone(), method)
    gn.weight.copy_(best[1])
    gn.bias.copy_(best[2])
    r2 = moments.r2(best[1], best[2])
    return LayerFit(pair.name, gn.num_channels, gn.num_groups, float(r2.mean()), float(r2.min()), True, best[3])
