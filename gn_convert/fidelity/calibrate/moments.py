"""Per-channel sufficient statistics of (normalised input, teacher output), and affine fits.

Calibration never stores activations: :class:`Moments` accumulates, per channel and in float64,
the count, sums, sums of squares and cross products of ``u`` (the GroupNorm-normalised input,
no affine) and ``y`` (the teacher BatchNorm's output). Memory is six vectors per layer however
many batches are seen. The fits map ``u`` to ``y`` channel by channel:

- ``variance``: slope ``sign(cov) * std(y) / std(u)``, intercept from the means. It keeps the
  teacher's activation spread; least squares shrinks the slope by the correlation (regression
  dilution) and the shrinkage compounds through the network.
- ``least-squares``: slope ``cov / var(u)``, the best fit of each layer taken alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TINY = 1e-12


class Moments:
    """Per-channel float64 sufficient statistics of a pair (u, y) of (N, C, ...) tensors."""

    def __init__(self, channels: int, device: torch.device) -> None:
        zeros = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.count = 0
        self.su, self.sy, self.suu, self.syy, self.suy = (zeros() for _ in range(5))

    def update(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch (u and y of equal shape, channels on dim 1)."""
        u = u.detach().double().transpose(0, 1).reshape(u.shape[1], -1)
        y = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
        self.count += u.shape[1]
        self.su += u.sum(1)
        self.sy += y.sum(1)
        self.suu += (u * u).sum(1)
        self.syy += (y * y).sum(1)
        self.suy += (u * y).sum(1)

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean u, mean y, var u, var y, cov(u, y)) per channel."""
        n = max(self.count, 1)
        mu, my = self.su / n, self.sy / n
        vu = (self.suu / n - mu * mu).clamp_min(0)
        vy = (self.syy / n - my * my).clamp_min(0)
        return mu, my, vu, vy, self.suy / n - mu * my

    def fit(self, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel (slope, intercept, R^2) of the affine map u -> y by ``method`` (a key of :data:`FITS`)."""
        mu, my, vu, vy, cov = self.centred()
        slope = torch.where(vu > TINY, FITS[method](vu, vy, cov), torch.zeros_like(vu))
        intercept = my - slope * mu
        return slope, intercept, self.r2(slope, intercept)

    def r2(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-channel R^2 of the affine ``u -> weight * u + bias`` (1 = exact; can be negative)."""
        n = max(self.count, 1)
        w, b = weight.double(), bias.double()
        residual = (self.syy - 2 * w * self.suy - 2 * b * self.sy + w * w * self.suu + 2 * w * b * self.su) / n + b * b
        vy = (self.syy / n - (self.sy / n) ** 2).clamp_min(0)
        return torch.where(vy > TINY, 1 - residual / (vy + TINY), torch.ones_like(vy))


def _variance_slope(vu: torch.Tensor, vy: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    sign = torch.where(cov < 0, -1.0, 1.0).to(cov)
    return sign * torch.sqrt(vy) / torch.sqrt(vu + TINY)


def _least_squares_slope(vu: torch.Tensor, vy: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return cov / (vu + TINY)


#: calibration method name -> slope from (var u, var y, cov); the CLI's choices are its keys
FITS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "variance": _variance_slope,
    "least-squares": _least_squares_slope,
}


@dataclass
class LayerFit:
    """The fit of one GroupNorm layer.

    Attributes:
        name: qualified module name.
        channels: channel count.
        groups: GroupNorm groups.
        r2: variance of the teacher's output explained by the fitted affine, averaged over
            channels (1 = exact; below 0 means the affine is worse than predicting each
            channel's mean: per-channel instance norm layers often score that low).
        worst_r2: the lowest channel's R^2.
        fitted: False for layers without affine parameters (left as they were).
        choice: with ``order="greedy"``, the affine kept (``init``, ``variance`` or
            ``least-squares``); empty otherwise.
    """

    name: str
    channels: int
    groups: int
    r2: float
    worst_r2: float
    fitted: bool = True
    choice: str = ""
