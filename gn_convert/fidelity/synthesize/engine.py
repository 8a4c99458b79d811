"""Images synthesised from the teacher itself, for recovery without data (or with too little).

A BatchNorm network remembers the statistics of its training data: every BN layer holds the
mean and variance of its input over the training set. Starting from noise, a batch of images
is optimised (Adam) so that, at every BN layer, the **batch's** channel means and variances
match the running ones (ZeroQ, DeepInversion), under image priors: random jitter and flips of
the batch at every step, total variation and an L2 penalty, pixels kept in the valid range.
Matching the statistics of the batch, not of each image, leaves the images free to differ from
one another as real ones do; an image whose own statistics equalled the population's would hide
exactly the per-sample variation that GroupNorm has to reproduce.

This must run on the BatchNorm teacher, before the statistics are removed by conversion.
:func:`write_pngs` saves the images as a folder a user can look at (and use as ``--data``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD, unnormalise
from gn_convert.errors import OptionError
from gn_convert.fidelity.pairs import forward_hooks
from gn_convert.modes import eval_mode
from gn_convert.output_folder import staged_folder

log = logging.getLogger(__name__)


@dataclass
class SynthesisReport:
    """What :func:`synthesize` did.

    Attributes:
        images: images made.
        size: their side in pixels.
        steps: optimisation steps per batch.
        seconds: wall time.
        completed: whether every batch ran all its steps (False: the budget cut some short).
        stat_error: per BatchNorm layer, the relative error of the synthetic images' channel
            statistics against the running ones (``|mean - running_mean| / sqrt(running_var)``
            and ``|var - running_var| / running_var``, averaged over channels, then the larger
            of the two), measured on all images together after synthesis.
    """

    images: int
    size: int
    steps: int
    seconds: float
    completed: bool = True
    stat_error: dict[str, float] = field(default_factory=dict)

    @property
    def worst_stat_error(self) -> float:
        """The largest per-layer statistics error."""
        return max(self.stat_error.values(), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**asdict(self), "worst_stat_error": self.worst_stat_error}


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


class _StatTaps:
    """Forward hooks that record each BN layer's input channel mean and variance over the batch."""

    def __init__(self, layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> None:
        self.layers = layers
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self) -> list[tuple[nn.Module, Any]]:
        def hook_for(name: str) -> Any:
            def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
                x = inputs[0].float().transpose(0, 1).flatten(1)
                self.seen[name] = (x.mean(1), x.var(1, unbiased=False))
            return hook
        return [(m, hook_for(n)) for n, m in self.layers]

    def loss(self) -> torch.Tensor:
        """DeepInversion's feature loss: sum over layers of ||mean - rm|| + ||var - rv||."""
        terms = []
        for name, bn in self.layers:
            if name in self.seen:
                mean, var = self.seen[name]
                running_mean, running_var = _running(bn)
                terms.append(torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var))
        self.seen.clear()
        return torch.stack(terms).sum()

    def errors(self) -> dict[str, float]:
        """Relative statistics error per layer (see :class:`SynthesisReport`)."""
        found = {}
        for name, bn in self.layers:
            if name in self.seen:
                mean, var = self.seen[name]
                running_mean, running_var = _running(bn)
                std = running_var.clamp_min(1e-8).sqrt()
                found[name] = max(float(((mean - running_mean).abs() / std).mean()),
                                  float(((var - running_var).abs() / running_var.clamp_min(1e-8)).mean()))
        self.seen.clear()
        return found


def _running(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm layer's running mean and variance (:func:`_batchnorms` keeps only layers that track them)."""
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean, bn.running_var


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def synthesize(
    teacher: nn.Module,
    count: int = 64,
    *,
    size: int = 64,
    batch_size: int = 32,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-2,
    l2_weight: float = 1e-5,
    jitter: int = 4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
    budget_s: float | None = None,
    init: torch.Tensor | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, SynthesisReport]:
    """Synthesise ``count`` images whose batch statistics match the teacher's BatchNorm layers.

    Args:
        teacher: the BatchNorm model (eval mode; never changed).
        count: images to make.
        size: their side in pixels (small is fast; the statistics are per channel, so any size
            the network accepts works).
        batch_size: images optimised together (the statistics matched are the batch's).
        steps: Adam steps per batch.
        lr: Adam's learning rate (on normalised pixels).
        tv_weight, l2_weight: weights of the total-variation and L2 image priors.
        jitter: the largest random shift, in pixels, applied to the batch at each step.
        mean, std: the normalisation of the model's inputs (pixels are kept in [0, 1] before it).
        seed: seed of the initial noise and the jitter.
        budget_s: stop early (with fewer steps per batch) to stay within this many seconds.
        init: start from these images (normalised like model inputs, at least ``count``; resized
            to ``size``) instead of noise: inversion from real photos, which with few small
            steps stay natural while their statistics move towards the teacher's.
        callback: called with the number of batches done after each batch (progress).

    Returns:
        The images, normalised like model inputs, ``(count, 3, size, size)`` on the teacher's
        device, and the :class:`SynthesisReport`.

    Raises:
        OptionError: the teacher has no BatchNorm layer with running statistics, or a bad count.
    """
    layers = _batchnorms(teacher)
    if not layers:
        raise OptionError("synthesis needs the BatchNorm teacher (running statistics); convert after synthesising")
    if count < 1 or batch_size < 2 or steps < 1:
        raise OptionError("count must be >= 1, batch_size >= 2 and steps >= 1")
    if init is not None and len(init) < count:
        raise OptionError(f"init holds {len(init)} images, fewer than the {count} to make")
    device = next(teacher.parameters()).device
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    taps, start, made, completed = _StatTaps(layers), time.perf_counter(), [], True
    batches = [min(batch_size, count - k) for k in range(0, count, batch_size)]
    with eval_mode(teacher), forward_hooks(taps.hooks()):
        for k, n in enumerate(batches):
            n = max(n, 2)
            if init is None:
                x = torch.randn(n, 3, size, size, generator=gen).to(device).requires_grad_(True)
            else:
                x = upsample(init[k * batch_size:][:n].to(device), size).clone().requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            share = None if budget_s is None else (budget_s - (time.perf_counter() - start)) / (len(batches) - k)
            began = time.perf_counter()
            for step in range(steps):
                dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                view = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
                if torch.rand(1, generator=gen) < 0.5:
                    view = view.flip(3)
                teacher(view)
                loss = taps.loss() + tv_weight * _total_variation(x) + l2_weight * x.pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # keep pixels in [0, 1] before normalisation
                    x.copy_(torch.maximum(torch.minimum(x, (1 - m) / s), -m / s))
                if share is not None and time.perf_counter() - began > share:
                    completed = step == steps - 1
                    break
            made.append(x.detach())
            if callback is not None:
                callback(k + 1)
        images = torch.cat(made)[:count]
        with torch.no_grad():
            teacher(images)
        errors = taps.errors()
    report = SynthesisReport(len(images), size, steps, round(time.perf_counter() - start, 2), completed, errors)
    log.info("synthesised %d images at %dx%d in %.0f s; worst BatchNorm statistics error %.3f",
             len(images), size, size, report.seconds, report.worst_stat_error)
    return images, report


def write_pngs(images: torch.Tensor, folder: str | Path, *, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, force: bool = False) -> list[Path]:
    """Write normalised images as PNG files (``000000.png``, ...) into a new folder, atomically.

    Returns:
        The written paths.
    """
    from PIL import Image

    pixels = (unnormalise(images, mean, std) * 255).round().to(torch.uint8)
    names = []
    with staged_folder(folder, force) as tmp:
        for k, image in enumerate(pixels):
            name = f"{k:06d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / name)
            names.append(name)
    return [Path(folder) / name for name in names]


def grid(images: torch.Tensor, columns: int = 8, *, mean: Sequence[float] = IMAGENET_MEAN,
         std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """The images tiled into one ``(3, H, W)`` picture in [0, 1], for a README figure."""
    pixels = unnormalise(images, mean, std)
    rows = -(-len(pixels) // columns)
    pad = rows * columns - len(pixels)
    if pad:
        pixels = torch.cat([pixels, torch.ones(pad, *pixels.shape[1:])])
    _, c, h, w = pixels.shape
    return pixels.view(rows, columns, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, columns * w)


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Synthetic images resized to the model's input side (bilinear, antialiased)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
