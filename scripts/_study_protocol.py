"""The training protocol the batch-size studies share (``batch_size_study.py``, ``seg_batch_study.py``).

Wu & He (2018) compare batch sizes at a fixed number of epochs with the learning rate scaled
linearly with the batch (Goyal et al., 2017). Here every run sees the same samples in the same
seeded order, grouped into batches of different sizes (:func:`sample_order`); SGD with momentum
at ``lr * batch_size / reference_batch``, cosine decay to zero over the run
(:func:`train_linear_scaled`). :func:`freeze_batchnorm` is the usual small-batch workaround,
and :func:`seed_stats` summarises a measure over seeds; :func:`crossings` finds where two curves cross.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: indices of a batch -> (inputs, targets)
Fetch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample_order(count: int, samples: int, seed: int) -> torch.Tensor:
    """Indices of ``samples`` training samples: seeded epochs of ``range(count)``, concatenated.

    The order depends only on the seed, so runs at different batch sizes see the same samples
    in the same sequence, grouped differently.
    """
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(samples / count)
    return torch.cat([torch.randperm(count, generator=gen) for _ in range(epochs)])[:samples]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer of ``model`` in eval mode: running statistics fixed, affine still trained
    (detectron2's FrozenBN without freezing the affine)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_linear_scaled(model: nn.Module, fetch: Fetch, order: torch.Tensor, *, batch_size: int, lr: float,
                        reference_batch: int, weight_decay: float, momentum: float = 0.9,
                        frozen_bn: nn.Module | None = None) -> nn.Module:
    """Train ``model`` with cross-entropy on ``order`` split into batches; returns it in eval mode.

    Args:
        model: the network; modified in place.
        fetch: indices -> (inputs, targets); targets are class indices (per image or per pixel).
        order: the samples, in order (see :func:`sample_order`); ``len(order) // batch_size`` steps.
        batch_size: samples per step.
        lr: learning rate at ``reference_batch``, scaled by ``batch_size / reference_batch``.
        reference_batch: the batch size ``lr`` is given for.
        weight_decay: SGD weight decay.
        momentum: SGD momentum (default 0.9).
        frozen_bn: ``model`` or a part of it whose BatchNorm layers stay in eval mode (see
            :func:`freeze_batchnorm`); default none.
    """
    steps = len(order) // batch_size
    opt = torch.optim.SGD(model.parameters(), lr=lr * batch_size / reference_batch, momentum=momentum,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    if frozen_bn is not None:
        freeze_batchnorm(frozen_bn)
    for k in range(steps):
        inputs, targets = fetch(order[k * batch_size:(k + 1) * batch_size])
        loss = F.cross_entropy(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of one measure over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def crossings(summary: Sequence[dict], first: str, second: str, key: str = "miou_mean") -> list[float]:
    """Batch sizes where two variants' curves of ``key`` cross, interpolated linearly on a log2 batch axis.

    Args:
        summary: rows with ``variant``, ``batch_size`` and ``key``.
        first, second: the two variants.
        key: the measure compared.
    """
    a = {r["batch_size"]: r[key] for r in summary if r["variant"] == first}
    b = {r["batch_size"]: r[key] for r in summary if r["variant"] == second}
    sizes = sorted(set(a) & set(b))
    found = []
    for low, high in zip(sizes, sizes[1:]):
        d_low, d_high = a[low] - b[low], a[high] - b[high]
        if d_low * d_high < 0:
            t = d_low / (d_low - d_high)
            found.append(2 ** (math.log2(low) + t * (math.log2(high) - math.log2(low))))
    return found
