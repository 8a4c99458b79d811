"""Grouping channels by similarity instead of by index: the question Wu & He left open, on a real network.

GroupNorm normalises channels ``[k*C/G, (k+1)*C/G)`` together, whatever they compute. Here the
expanded channels of every MBConv block of ImageNet EfficientNet-Lite0 are regrouped so that each
group holds channels whose activations are correlated on training photos: a balanced clustering
(k-means on the rows of the channels' correlation matrix, with each cluster's size fixed at C/G by
an optimal assignment) gives each channel a group, and a permutation applied to the expand
convolution's outputs, ``_bn0``, the depthwise convolution, ``_bn1`` and the project
convolution's inputs moves each group's channels next to each other. The permuted BatchNorm
network computes exactly what the original does (checked), so converting it to GroupNorm at G=32
differs from converting the original only in which channels share a group.

Rows: ``index`` (GroupNorm's own grouping) and ``correlation``; zero-shot (bn-stats init) and after
``recover`` for ``--budget`` seconds on the photo pool's train split; scored on its ``dev`` split
(the test split stays for the final study) with the teacher's agreement metrics.

Usage::

    python scripts/grouping_study.py --budget 300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gn_convert
from gn_convert.fidelity.metrics import agreement_metrics, logits
from gn_convert.fidelity.recover.data import SeededViews
from gn_convert.fidelity.recover.engine import recover

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study_models import efficientnet_lite0  # noqa: E402
from photo_pool import build_pool  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "grouping_study.json"
GROUPS = 32
MIN_CHANNELS = 1
"""Wu & He's question is about the grouping at G=32 itself: every layer gets min(32, C) groups."""


def views(folder: Path, per: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``per`` fixed views of every photo in ``folder`` and each view's photo."""
    files = sorted(folder.iterdir())
    data = SeededViews(files, per, 224, seed)
    return torch.stack([data[i][0] for i in range(len(data))]), [f.name for f in files for _ in range(per)]


def correlations(model: Any, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per MBConv block with an expansion: the channel correlation of the inputs of ``_bn0`` and ``_bn1``
    (averaged), over every position of every image."""
    sums: dict[str, list[np.ndarray]] = {}
    handles = []
    for index, block in enumerate(model._blocks):
        if block._block_args.expand_ratio == 1:
            continue
        for bn in (block._bn0, block._bn1):
            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = str(index)) -> None:
                x = args[0].detach().transpose(0, 1).flatten(1).double()
                sums.setdefault(name, []).append(torch.corrcoef(x).nan_to_num().numpy())
            handles.append(bn.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in images.split(16):
            model(batch)
    for handle in handles:
        handle.remove()
    return {name: np.mean(mats, axis=0) for name, mats in sums.items()}


def balanced_groups(corr: np.ndarray, groups: int, seed: int = 0, rounds: int = 10) -> np.ndarray:
    """A channel order whose consecutive blocks of C/G channels are clusters of correlated channels."""
    from scipy.optimize import linear_sum_assignment

    channels = corr.shape[0]
    size = channels // groups
    rng = np.random.default_rng(seed)
    features = corr / np.linalg.norm(corr, axis=1, keepdims=True).clip(1e-8)
    centres = features[rng.choice(channels, groups, replace=False)]
    for _ in range(rounds):
        cost = -(features @ centres.T)                     # (C, G): high similarity, low cost
        slots = np.repeat(np.arange(groups), size)         # each group has exactly `size` slots
        rows, cols = linear_sum_assignment(cost[:, slots])
        assign = slots[cols[np.argsort(rows)]]
        centres = np.stack([features[assign == g].mean(0) for g in range(groups)])
    return np.argsort(assign, kind="stable")


def permute_block(block: Any, order: torch.Tensor) -> None:
    """Reorder a block's expanded channels (function-preserving for the BatchNorm network)."""
    with torch.no_grad():
        block._expand_conv.weight.copy_(block._expand_conv.weight[order])
        block._depthwise_conv.weight.copy_(block._depthwise_conv.weight[order])
        block._project_conv.weight.copy_(block._project_conv.weight[:, order])
        for bn in (block._bn0, block._bn1):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(bn, name)[order])


def regrouped(teacher: Any, images: torch.Tensor, groups: int) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``teacher`` with every expanded layer's channels regrouped by correlation."""
    import copy

    model: Any = copy.deepcopy(teacher)
    gain = {}
    for name, corr in correlations(teacher, images).items():
        block = model._blocks[int(name)]
        plan = gn_convert.plan(nn.Sequential(block._bn0), groups, min_channels_per_group=MIN_CHANNELS)
        g = plan.converted[0].num_groups  # what the plan gives it
        order = balanced_groups(corr, g)
        before = _within(corr, np.arange(len(corr)), g)
        permute_block(block, torch.as_tensor(order))
        gain[name] = {"groups": g, "within_corr_index": before, "within_corr_clustered": _within(corr, order, g)}
    with torch.no_grad():
        error = float((teacher(images[:8]) - model(images[:8])).abs().max())
    assert error < 1e-3, f"the permutation changed the BatchNorm network's output ({error})"
    return model, gain


def _within(corr: np.ndarray, order: np.ndarray, groups: int) -> float:
    size = len(order) // groups
    blocks = [order[k * size:(k + 1) * size] for k in range(groups)]
    return float(np.mean([corr[np.ix_(b, b)][~np.eye(size, dtype=bool)].mean() for b in blocks if size > 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="recover's budget per row (wall seconds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    pool = build_pool()
    teacher = efficientnet_lite0()
    train_views, _ = views(pool / "train", 2, seed=11)
    dev, groups = views(pool / "dev", 12, seed=1234)
    reference = logits(teacher, dev)
    permuted, gain = regrouped(teacher, train_views, GROUPS)
    rows = []
    for grouping, model in (("index", teacher), ("correlation", permuted)):
        converted = gn_convert.convert(model, GROUPS, min_channels_per_group=MIN_CHANNELS)
        zero = agreement_metrics(logits(converted, dev), reference, groups)
        result = recover(model, pool / "train", budget=args.budget, seed=args.seed,
                         min_channels_per_group=MIN_CHANNELS)
        after = agreement_metrics(logits(result.model, dev), reference, groups)
        rows.append({"grouping": grouping, "zero_shot": zero, "recovered": after, "budget_s": args.budget})
        print(f"{grouping:12} zero-shot top-1 {zero['top1']:.3f} conf {zero['confident']:.3f} KL {zero['kl']:.2f} | "
              f"recovered top-1 {after['top1']:.3f} conf {after['confident']:.3f} KL {after['kl']:.2f}", flush=True)
    RESULTS.write_text(json.dumps({"rows": rows, "within_group_correlation": gain}, indent=1))


if __name__ == "__main__":
    main()
