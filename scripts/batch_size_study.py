"""Batch-size study: a BatchNorm network against its GroupNorm conversion, 1 to 32 images a batch.

Reproduces, at small scale and on real data that ships in a package, the headline of Wu & He
(2018), Figure 1: BatchNorm's error grows as the batch shrinks, GroupNorm's does not. And asks
the product's question: once a pretrained BatchNorm model is converted with
``gn_convert.convert`` (data-free ``bn-stats`` init), can it be fine-tuned at the small batches
a task forces, where the BatchNorm original degrades?

Protocol (scikit-learn's 8x8 digits at their native size, via ``gn_convert.testing.digits.digits``):

- One seeded split: 900 training and 897 held-out digits. The *pretraining* task is the
  training digits 0-4; the *target* task is digits 5-9 (disjoint classes: about 450 training
  digits), evaluated on the about 440 held-out digits 5-9.
- Per seed, a small BatchNorm ResNet (``scripts/_study_models.py``) is pretrained on digits
  0-4 at batch 32. Its head is replaced by a fresh 5-way head; that model is fine-tuned three
  ways at batch sizes 1, 2, 4, 8, 16 and 32 (the paper's figure stops at 2; batch 1 is what
  per-sample work such as DP-SGD or very large inputs forces): as is, BatchNorm in train mode
  (BN); with BatchNorm frozen in eval mode at its pretrained statistics, the usual
  small-batch workaround (BN-frozen); and after ``convert(model, groups, init="bn-stats")``
  (GN). BN and GN are also trained from scratch on the target task (GN is the conversion of
  the same untrained BN network, so both start from the same convolution weights).
- Every run sees the same samples in the same order (seeded; only their grouping into batches
  differs): SGD with momentum 0.9, learning rate scaled linearly with the batch (the paper's
  rule), cosine decay, weight decay 1e-4.
- BatchNorm in train mode normalises each layer with the statistics of the batch: of two
  images at batch 2, of the image itself at batch 1. It is evaluated in eval mode with its
  running statistics (an exponential average of those batch statistics), which is what the
  paper measures. The JSON and the table also give BN's error after its statistics are
  recomputed on the whole training set (precise BN), to separate noisy running statistics
  from the training itself.

Usage::

    python scripts/batch_size_study.py            # full study, writes docs/batch_size_study.{png,json}
    python scripts/batch_size_study.py --fast     # fewer steps, one seed (the test runs this)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study_models import small_resnet  # noqa: E402
from _study_protocol import sample_order, seed_stats, train_linear_scaled  # noqa: E402

from gn_convert import convert  # noqa: E402
from gn_convert.atomic import atomic_file  # noqa: E402
from gn_convert.testing.bn_stats import estimate_batchnorm_stats  # noqa: E402
from gn_convert.testing.digits import digits  # noqa: E402

log = logging.getLogger("batch_size_study")

REGIMES: tuple[str, ...] = ("finetune", "scratch")
NORMS: dict[str, tuple[str, ...]] = {"finetune": ("BN", "BN-frozen", "GN"), "scratch": ("BN", "GN")}
REFERENCE_BATCH = 32


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines one study.

    Attributes:
        batch_sizes: images per batch to compare.
        seeds: one run per seed, regime, norm and batch size.
        size: image side in pixels (the digits are 8x8; a larger size upscales them).
        width: channels of the network's first stage (later stages 2x, 4x).
        groups: GroupNorm groups (largest divisor of each layer's channels at most this).
        heldout: held-out digits (all classes; the target task uses its digits 5-9).
        pretrain_epochs: epochs over the pretraining digits (0-4), at batch 32.
        finetune_epochs: epochs over the target digits (5-9) when fine-tuning.
        scratch_epochs: epochs over the target digits when training from scratch.
        lr_pretrain: learning rate of pretraining, at batch 32.
        lr_finetune: fine-tuning learning rate at batch 32 (scaled linearly with the batch).
        lr_scratch: from-scratch learning rate at batch 32 (scaled linearly).
        weight_decay: SGD weight decay.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    size: int = 8
    width: int = 16
    groups: int = 8
    heldout: int = 897
    pretrain_epochs: float = 6.0
    finetune_epochs: float = 3.0
    scratch_epochs: float = 6.0
    lr_pretrain: float = 0.1
    lr_finetune: float = 0.05
    lr_scratch: float = 0.1
    weight_decay: float = 1e-4

    @classmethod
    def fast(cls, seed: int = 0) -> StudyConfig:
        """The test's version: one seed, a third of the fine-tuning and scratch steps."""
        return cls(seeds=(seed,), pretrain_epochs=3.0, finetune_epochs=1.0, scratch_epochs=2.0)


@dataclass
class Task:
    """Training and held-out tensors of one classification task (labels renumbered from 0)."""

    images: torch.Tensor
    labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


@dataclass
class Run:
    """One training run.

    Attributes:
        regime, norm, batch_size, seed: what was run (see :data:`NORMS`).
        error: held-out top-1 error in eval mode, in percent.
        error_precise_bn: for BN, the error after recomputing its statistics; else None.
        seconds: training wall time (for orientation only; it varies with machine load).
    """

    regime: str
    norm: str
    batch_size: int
    seed: int
    error: float
    error_precise_bn: float | None
    seconds: float


def _select(images: torch.Tensor, labels: torch.Tensor, classes: range) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (labels >= classes.start) & (labels < classes.stop)
    return images[keep], labels[keep] - classes.start


def make_tasks(cfg: StudyConfig) -> tuple[Task, Task]:
    """The pretraining task (digits 0-4) and the target task (digits 5-9) of one digits split.

    Args:
        cfg: the study's configuration (image size and held-out count).

    Returns:
        (pretraining task, target task).
    """
    split = digits(size=cfg.size, heldout=cfg.heldout, seed=0)
    images, labels = split.train.tensors  # type: ignore[attr-defined]
    held_images, held_labels = split.heldout.tensors  # type: ignore[union-attr]
    tasks = []
    for classes in (range(0, 5), range(5, 10)):
        tasks.append(Task(*_select(images, labels, classes), *_select(held_images, held_labels, classes)))
    return tasks[0], tasks[1]


def train(model: nn.Module, task: Task, *, batch_size: int, epochs: float, lr: float,
          weight_decay: float, seed: int, freeze_bn: bool = False) -> nn.Module:
    """Train ``model`` in train mode with SGD on ``task``; returns it in eval mode.

    Args:
        model: the network; modified in place.
        task: its training tensors are used.
        batch_size: images per step.
        epochs: passes over the training set; the step count is samples // batch_size.
        lr: learning rate at batch 32, scaled by ``batch_size / 32`` (linear scaling rule).
        weight_decay: SGD weight decay.
        seed: seed of the sample order.
        freeze_bn: keep BatchNorm layers in eval mode (their running statistics fixed, their
            affine still trained), the usual small-batch workaround (detectron2's FrozenBN).
    """
    order = sample_order(len(task.labels), int(epochs * len(task.labels)), seed)
    return train_linear_scaled(model, lambda idx: (task.images[idx], task.labels[idx]), order,
                               batch_size=batch_size, lr=lr, reference_batch=REFERENCE_BATCH,
                               weight_decay=weight_decay, frozen_bn=model if freeze_bn else None)


@torch.no_grad()
def error_percent(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 error of ``model`` in eval mode (BatchNorm uses its running statistics), in percent."""
    model.eval()
    predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return 100.0 * float((predicted != labels).float().mean())


def precise_bn_error(model: nn.Module, task: Task) -> float:
    """Held-out error after recomputing a copy's BatchNorm statistics on the whole training set."""
    copied = estimate_batchnorm_stats(copy.deepcopy(model), task.images.split(REFERENCE_BATCH))
    return error_percent(copied, task.heldout_images, task.heldout_labels)


def pretrain(task: Task, cfg: StudyConfig, seed: int) -> nn.Module:
    """The 'pretrained' BatchNorm model: trained on the pretraining task at batch 32."""
    torch.manual_seed(seed)
    model = small_resnet(int(task.labels.max()) + 1, cfg.width)
    train(model, task, batch_size=REFERENCE_BATCH, epochs=cfg.pretrain_epochs, lr=cfg.lr_pretrain,
          weight_decay=cfg.weight_decay, seed=seed)
    log.info("seed %d: pretrained BN model, error %.1f%% on held-out digits 0-4", seed,
             error_percent(model, task.heldout_images, task.heldout_labels))
    return model


def starting_points(regime: str, pretrained: nn.Module, num_classes: int, cfg: StudyConfig,
                    seed: int) -> dict[str, nn.Module]:
    """The models that one run starts from, by norm (see :data:`NORMS`).

    For ``finetune``, a copy of the pretrained model with a fresh seeded head (``BN`` and
    ``BN-frozen`` are two copies of it); for ``scratch``, a freshly initialised network. The
    GN model is ``convert`` of the BN one.
    """
    torch.manual_seed(1000 + seed)
    if regime == "finetune":
        bn: Any = copy.deepcopy(pretrained)
        bn[-1] = nn.Linear(bn[-1].in_features, num_classes)
    else:
        bn = small_resnet(num_classes, cfg.width)
    models = {"BN": bn, "GN": convert(bn, cfg.groups, init="bn-stats")}
    if "BN-frozen" in NORMS[regime]:
        models["BN-frozen"] = copy.deepcopy(bn)
    return models


def _one_run(regime: str, norm: str, model: nn.Module, target: Task, cfg: StudyConfig,
             batch_size: int, seed: int) -> Run:
    finetune = regime == "finetune"
    start = time.perf_counter()
    train(model, target, batch_size=batch_size, epochs=cfg.finetune_epochs if finetune else cfg.scratch_epochs,
          lr=cfg.lr_finetune if finetune else cfg.lr_scratch, weight_decay=cfg.weight_decay, seed=seed,
          freeze_bn=norm == "BN-frozen")
    seconds = time.perf_counter() - start
    error = error_percent(model, target.heldout_images, target.heldout_labels)
    precise = precise_bn_error(model, target) if norm == "BN" else None
    log.info("%-8s %-9s batch %2d seed %d: error %5.2f%%%s (%.1f s)", regime, norm, batch_size, seed, error,
             "" if precise is None else f", precise BN {precise:5.2f}%", seconds)
    return Run(regime, norm, batch_size, seed, error, precise, seconds)


def run_study(cfg: StudyConfig) -> list[Run]:
    """Run every (seed, regime, batch size, norm) of the study.

    Args:
        cfg: the configuration.

    Returns:
        One :class:`Run` each.
    """
    pretrain_task, target = make_tasks(cfg)
    num_classes = int(target.labels.max()) + 1
    runs = []
    for seed in cfg.seeds:
        pretrained = pretrain(pretrain_task, cfg, seed)
        for regime in REGIMES:
            for batch_size in cfg.batch_sizes:
                models = starting_points(regime, pretrained, num_classes, cfg, seed)
                for norm in NORMS[regime]:
                    runs.append(_one_run(regime, norm, models[norm], target, cfg, batch_size, seed))
    return runs


def summarize(runs: Sequence[Run]) -> list[dict]:
    """Mean, standard deviation, min and max of the error over seeds, per regime, norm and batch.

    Returns:
        One dict per (regime, norm, batch size), in that order; BN rows also give the mean
        error with precise (recomputed) statistics.
    """
    rows = []
    for regime in REGIMES:
        for norm in NORMS[regime]:
            for batch_size in sorted({r.batch_size for r in runs}):
                group = [r for r in runs if (r.regime, r.norm, r.batch_size) == (regime, norm, batch_size)]
                if not group:
                    continue
                stats = seed_stats([r.error for r in group])
                precise = [r.error_precise_bn for r in group if r.error_precise_bn is not None]
                rows.append({"regime": regime, "norm": norm, "batch_size": batch_size, "seeds": len(group),
                             **{f"error_{key}": value for key, value in stats.items()},
                             "error_precise_bn_mean": seed_stats(precise)["mean"] if precise else None})
    return rows


def spread_across_batches(summary: Sequence[dict], regime: str, norm: str) -> float:
    """Max minus min, over batch sizes, of the mean error of one regime and norm (points)."""
    means = [row["error_mean"] for row in summary if (row["regime"], row["norm"]) == (regime, norm)]
    return max(means) - min(means)


def write_json(path: Path, cfg: StudyConfig, runs: Sequence[Run], summary: Sequence[dict]) -> None:
    """Write the configuration, every run and the summary to ``path`` (atomically)."""
    spreads = {f"{regime}/{norm}": spread_across_batches(summary, regime, norm)
               for regime in REGIMES for norm in NORMS[regime]}
    document = {"config": asdict(cfg), "summary": list(summary), "spread_across_batches": spreads,
                "runs": [asdict(r) for r in runs], "torch": torch.__version__}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")


TITLES = {"finetune": "fine-tuned from a BN model pretrained on digits 0-4",
          "scratch": "trained from scratch"}
COLOURS = {"BN": "#1f77b4", "BN-frozen": "#2ca02c", "GN": "#d62728"}
LABELS = {"BN": "BN (train mode)", "BN-frozen": "BN frozen (eval mode, pretrained statistics)",
          "GN": "GN (gn_convert.convert, bn-stats init)"}


def plot(summary: Sequence[dict], path: Path) -> None:
    """Error against batch size, BN and GN, one panel per regime, in the style of the paper's
    Figure 1 (batch size decreasing left to right); bars span min to max over seeds.

    Written atomically to ``path`` (PNG).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(REGIMES), figsize=(10, 3.8), sharey=False)
    for ax, regime in zip(axes, REGIMES):
        for norm in NORMS[regime]:
            rows = sorted((r for r in summary if (r["regime"], r["norm"]) == (regime, norm)),
                          key=lambda r: -r["batch_size"])
            x = range(len(rows))
            mean = [r["error_mean"] for r in rows]
            low = [r["error_mean"] - r["error_min"] for r in rows]
            high = [r["error_max"] - r["error_mean"] for r in rows]
            ax.errorbar(x, mean, yerr=[low, high], color=COLOURS[norm], marker="o", capsize=3,
                        linewidth=2, label=LABELS[norm])
            if norm == "BN":
                ax.plot(x, [r["error_precise_bn_mean"] for r in rows], color=COLOURS[norm], linestyle=":",
                        marker=".", label="BN, statistics recomputed (precise BN)")
            ax.set_xticks(list(x), [str(r["batch_size"]) for r in rows])
        ax.set_title(TITLES[regime], fontsize=10)
        ax.set_xlabel("batch size (images per batch)")
        ax.set_ylabel("held-out error (%)")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: "precise" in labels[i])  # the dotted line last
    axes[0].legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper left")
    seeds = summary[0]["seeds"] if summary else 0
    fig.suptitle(f"Held-out digits 5-9, small ResNet: BatchNorm vs its GroupNorm conversion "
                 f"(mean of {seeds} seeds, bars min-max)",
                 fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table(summary: Sequence[dict]) -> str:
    """The summary as a markdown table: one row per regime and norm, one column per batch size."""
    sizes = sorted({r["batch_size"] for r in summary}, reverse=True)
    lines = ["| regime | norm | " + " | ".join(f"batch {b}" for b in sizes) + " | spread |",
             "| --- | --- |" + " ---: |" * (len(sizes) + 1)]
    for regime in REGIMES:
        for norm in NORMS[regime]:
            cells = {r["batch_size"]: r for r in summary if (r["regime"], r["norm"]) == (regime, norm)}
            text = [f"{cells[b]['error_mean']:.1f} ± {cells[b]['error_std']:.1f}" for b in sizes]
            lines.append(f"| {regime} | {norm} | " + " | ".join(text)
                         + f" | {spread_across_batches(summary, regime, norm):.1f} |")
            if norm == "BN":
                text = [f"{cells[b]['error_precise_bn_mean']:.1f}" for b in sizes]
                lines.append(f"| {regime} | BN, precise stats | " + " | ".join(text) + " | |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                        help="folder for the PNG and JSON (default: the repository's docs/)")
    parser.add_argument("--fast", action="store_true", help="fewer steps and one seed (for the test)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --fast: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, comparable runs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the study, print the table, write ``batch_size_study.{png,json}`` under ``--out``.

    Returns:
        The summary rows.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gn_convert").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = StudyConfig.fast() if args.fast else StudyConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    start = time.perf_counter()
    runs = run_study(cfg)
    summary = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "batch_size_study.json", cfg, runs, summary)
    plot(summary, args.out / "batch_size_study.png")
    print(f"held-out error (%), mean ± std over seeds {list(cfg.seeds)}; {time.perf_counter() - start:.0f} s")
    print(table(summary))
    print(f"wrote {args.out / 'batch_size_study.png'} and {args.out / 'batch_size_study.json'}")
    return summary


if __name__ == "__main__":
    main()
